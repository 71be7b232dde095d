"""What several commands share: the `error: ...` line, numeric option types, the refusal of an output that is an
input, file sizes, EraseKit's warnings printed once, the trainers' progress lines and the options every trainer on a
pipeline takes."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

from ..erasers.errors import NumberError, check_number
from ..erasers.files import refuse_inputs

MAX_SEED = 2**32 - 1  # torch, numpy and the trainers' generators all take it
MAX_FOLDER_FILES = 100_000  # files of an input folder compared with the outputs; a model or data folder has fewer


def error(message: object) -> int:
    """Print `error: MESSAGE` on stderr; return 2, the exit code of bad input."""
    print(f"error: {message}", file=sys.stderr)
    return 2


class NumberOptionError(argparse.ArgumentTypeError):
    """A numeric option outside its range; `Parser` turns it into a NumberError, an `error: ...` line and exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, except that a numeric option out of its range raises a NumberError naming the option and
    the range (main prints it as one `error: ...` line, exit code 2) instead of exiting from inside the parser."""

    def error(self, message: str):
        handled = sys.exc_info()[1]
        if isinstance(getattr(handled, "__context__", None), NumberOptionError):
            raise NumberError(message) from None
        super().error(message)


def number(low: float | None = None, high: float | None = None, *, integer: bool = False,
           low_inclusive: bool = True):
    """An argparse `type`: the option's text as a finite number (an exact int if `integer`) in [low, high] (low
    excluded unless `low_inclusive`), else a NumberOptionError saying what was expected and found."""

    def parse(text: str):
        value: object = text
        if integer:
            try:
                value = int(text)  # exact, where float() would round a large seed
            except ValueError:
                pass
        if isinstance(value, int) and _within(value, low, high, low_inclusive):
            return value  # compared exactly: as a float, 2**64 - 1 would be 2**64, above the top seed
        try:
            checked = check_number("option", value, low=low, high=high, low_inclusive=low_inclusive,
                                   integer=integer)
        except NumberError as err:
            raise NumberOptionError(f"expected {err.expected}, found {err.found}") from None
        if isinstance(value, int):  # out of range exactly, though not as a float
            raise NumberOptionError(f"expected a number in [{low}, {high}], found {value}")
        return checked

    parse.__name__ = "integer" if integer else "number"  # argparse names the type in its own messages
    return parse


def _within(value: int, low, high, low_inclusive: bool) -> bool:
    above_low = low is None or value > low or (low_inclusive and value == low)
    return above_low and (high is None or value <= high)


def refuse_outputs(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None], *,
                   option: str = "--out") -> None:
    """Refuse, before any work, a command whose output would replace one of its inputs: the same path, a hard link
    or a symlink to it, or a file inside an input folder (a model or data folder is compared file by file)."""
    sources = [path for source in inputs if source is not None for path in _with_files(Path(source))]
    for out in outputs:
        if out is not None:
            refuse_inputs(out, sources, option=option)


def _with_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    found = [path]
    for root, folders, names in os.walk(path):
        found += [Path(root) / name for name in (*folders, *names)]
        if len(found) > MAX_FOLDER_FILES:
            break
    return found


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
    train.add_argument("--seed", type=number(0, MAX_SEED, integer=True), default=None,
                       help=f"0 to {MAX_SEED} (default 0)")
    train.add_argument("--device", default="cpu", help="where to train (cpu, cuda, cuda:1, mps)")
    train.add_argument("--fresh", action="store_true", help="ignore a resume checkpoint from an earlier run")
