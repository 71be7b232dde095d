"""What several commands share: the `error: ...` line, file sizes, EraseKit's warnings printed once, the trainers'
progress lines and the options every trainer on a pipeline takes."""
from __future__ import annotations

import argparse
import sys
import time
import warnings


def error(message: object) -> int:
    """Print `error: MESSAGE` on stderr; return 2, the exit code of bad input."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def size(nbytes: float) -> str:
    """A file size for people: 512 B, 1.5 KB, 3.2 MB, 2.0 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""  # pragma: no cover


class PrintedWarnings:
    """While a command runs, print EraseKit's warnings (a cut concept, another fine-tune) as `warning: ...` lines on
    stderr as they occur, each once; other warnings are shown as usual."""

    def __enter__(self):
        from ..erasers.erasure import BaseMismatchWarning  # both modules import torch
        from ..erasers.text import TruncationWarning

        self._ours = (TruncationWarning, BaseMismatchWarning)
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        for category in self._ours:
            warnings.simplefilter("always", category)
        self._show, self._seen = warnings.showwarning, set()
        warnings.showwarning = self._print
        return self

    def _print(self, message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, self._ours):
            return self._show(message, category, filename, lineno, file, line)
        if str(message) not in self._seen:
            self._seen.add(str(message))
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)  # restores the filters and showwarning
        return False


def training_progress(iterations: int):
    """progress(step, total, losses) for the trainers: about 20 lines a run, with the rate since this start."""
    every = max(1, iterations // 20)
    clock = {"start": time.perf_counter(), "first": None}

    def progress(step: int, total: int, losses) -> None:
        if clock["first"] is None:
            clock["first"] = step - 1  # a resumed run starts past 0
        if step % every and step != total:
            return
        rate = (step - clock["first"]) / max(time.perf_counter() - clock["start"], 1e-9)
        terms = "  ".join(f"{name} {value:.3e}" for name, value in losses.items())
        print(f"step {step}/{total}  {terms}  ({rate:.2f} it/s)", flush=True)

    return progress


def add_run_arguments(train: argparse.ArgumentParser) -> None:
    """What every trainer on a pipeline takes: the model, seed, device and --fresh."""
    train.add_argument("--model", default=None, metavar="DIR",
                       help="a shapes-world folder or a diffusers SD1.x/SD2.x folder (default: the shipped shapes "
                            "world)")
    train.add_argument("--seed", type=int, default=None, help="default 0")
    train.add_argument("--device", default="cpu", help="where to train (cpu, cuda, cuda:1, mps)")
    train.add_argument("--fresh", action="store_true", help="ignore a resume checkpoint from an earlier run")
