"""The `erasekit` command (main.py, one module per subcommand in commands/) and what only the command needs:
helpers the commands share (common.py), device parsing and pipeline loading (pipelines.py), batch generation over
ComfyUI servers or an in-process pipeline (batch.py), a real ComfyUI server runner (comfy_server.py), tiny model
files for workflows (fixtures.py) and the benchmarks (bench/)."""
from .main import main

__all__ = ["main"]
