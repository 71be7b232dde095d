"""The `erasekit` command (main.py) and what only the command needs: batch generation over ComfyUI servers or an
in-process pipeline (batch.py), a real ComfyUI server runner (comfy_server.py), tiny model files for workflows
(fixtures.py), pipeline loading (pipelines.py) and the benchmarks (bench/)."""
from .main import main

__all__ = ["main"]
