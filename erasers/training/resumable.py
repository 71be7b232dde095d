"""The training loop every EraseKit trainer shares: step until done, with a resume checkpoint now and then.

A trainer has `step_count`, `step() -> losses`, `state_dict()` and `load_state_dict(state)` (which raises ValueError
for a checkpoint of another run). The checkpoint is written beside the output as ``<out>.resume.pt`` (under a
temporary name, then renamed, by files.write_stream, so an interruption never leaves half a file, only a temporary
file the next write removes) and deleted by the caller once the
result is written.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..files import write_stream

Progress = Callable[[int, int, Mapping[str, float]], None]


def resume_path(out: str | Path) -> Path:
    """Where a run writing `out` keeps its resume checkpoint: ``<out>.resume.pt``."""
    out = Path(out)
    return out.with_name(out.name + ".resume.pt")


def run(trainer, iterations: int, checkpoint: Path | None, every: int, resume: bool = True,
        progress: Progress | None = None) -> None:
    """Step `trainer` to `iterations`, from `checkpoint` if it exists and `resume`; write it every `every` steps."""
    if checkpoint is not None and resume and checkpoint.is_file():
        try:
            trainer.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        except ValueError as err:
            raise ValueError(f"{checkpoint}: {err}; delete it or train with resume=False (--fresh)") from None
    while trainer.step_count < iterations:
        losses = trainer.step()
        if checkpoint is not None and every and trainer.step_count % every == 0 and trainer.step_count < iterations:
            _save(checkpoint, trainer.state_dict())
        if progress is not None:
            progress(trainer.step_count, iterations, losses)


def _save(checkpoint: Path, state: Mapping) -> None:
    write_stream(checkpoint, lambda out: torch.save(state, out))
