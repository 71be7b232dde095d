"""The pack is an installable library that never imports ComfyUI, and a node pack ComfyUI can read."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch

import erasekit

ROOT = Path(erasekit.__file__).resolve().parent
COMFY_MODULES = ("comfy", "comfy_extras", "folder_paths", "nodes", "execution", "server", "node_helpers")


def _run(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_erasekit_imports_nothing_from_comfyui(tmp_path):
    result = _run(
        "import sys, erasekit, erasekit.cli.main, erasekit.erasers.families\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {COMFY_MODULES!r})\n"
        "print(len(erasekit.NODE_CLASS_MAPPINGS), bad)",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    count, bad = result.stdout.split(" ", 1)
    assert int(count) >= 1 and bad.strip() == "[]"


def test_version_is_the_one_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "comfyui-erasekit"
    assert erasekit.__version__ == project["version"]


def test_every_node_is_a_complete_v1_node(comfy):  # some INPUT_TYPES list ComfyUI's model folders
    for name, cls in erasekit.NODE_CLASS_MAPPINGS.items():
        assert name in erasekit.NODE_DISPLAY_NAME_MAPPINGS
        inputs = cls.INPUT_TYPES()
        assert set(inputs) <= {"required", "optional", "hidden"} and inputs["required"]
        assert callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
        assert cls.CATEGORY.startswith("EraseKit")


def test_cli_help_lists_the_subcommands():
    exe = Path(sys.executable).parent / "erasekit"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("selfcheck", "inspect", "erase", "apply", "bench"):
        assert command in result.stdout


@pytest.mark.slow
def test_wheel_installs_and_imports_without_the_checkout(tmp_path):
    """`pip install .` builds a wheel holding the package (not tests/) that imports from anywhere."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("comfyui_erasekit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "erasekit/__init__.py" in names and "erasekit/erasers/families.py" in names
    assert "erasekit/nodes/inspect_model.py" in names
    assert not any(n.startswith(("erasekit/tests/", "erasekit/.venv", "erasekit/scripts/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    result = _run("import erasekit, sys; print(erasekit.__file__)", cwd=tmp_path, env={"PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(target))


def test_requirements_txt_agrees_with_pyproject():
    """ComfyUI-Manager installs requirements.txt; it must ask for what pyproject.toml asks for."""
    deps = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and set(lines) <= deps


@pytest.mark.slow
def test_bench_closed_form_prints_ours_reference_and_ratio(capsys):
    from erasekit.cli.main import main

    assert main(["bench", "closed-form", "--family", "sd15", "--concepts", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "per-layer" in out and "read-once" in out
    row = next(line for line in out.splitlines() if line.startswith("sd15"))
    assert row.count("x") >= 4  # speed-ups and ratios are printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_bench_closed_form_refuses_a_missing_gpu(capsys):
    from erasekit.cli.main import main

    assert main(["bench", "closed-form", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
