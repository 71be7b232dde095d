"""The one error family of EraseKit, and the checks of numbers and tensors that raise it.

Every problem with what a user gave us (a file, a key in it, a strength, a prompt list, a limit) is an `InputError`,
a `ValueError`, whose message names the thing that is wrong, what was expected, what was found and the fix where
there is one. Loaders raise nothing else: a caller (a ComfyUI node, a CLI command, a script) catches `InputError`
and shows its text; any other exception is a bug in EraseKit.

    InputError
    ├── FileError      a file the pack reads or writes: missing, unreadable, corrupt, or not the layout expected
    ├── NumberError    a numeric input that is not finite or not in its range
    └── LimitError     work above a limit (concepts, prompts, tokens) that the user can raise on purpose

The method-specific errors (ErasureFileError, CheckpointError, PromptListError, ...) derive from these.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InputError(ValueError):
    """Bad input, named: ``<file>: <key>: expected <expected>, found <found>. <fix>``, or a message as given."""

    def __init__(self, message: str | None = None, *, file: str | os.PathLike | None = None, key: str | None = None,
                 expected: str | None = None, found: str | None = None, fix: str | None = None):
        self.file = str(file) if file is not None else None
        self.key, self.expected, self.found, self.fix = key, expected, found, fix
        super().__init__(message if message is not None else self._compose())

    def _compose(self) -> str:
        where = ": ".join(part for part in (self.file, repr(self.key) if self.key is not None else None) if part)
        what = ", ".join(part for part in (
            f"expected {self.expected}" if self.expected else None,
            f"found {self.found}" if self.found else None,
        ) if part) or "invalid"
        text = f"{where}: {what}" if where else what
        return f"{text}. {self.fix}" if self.fix else text


class FileError(InputError):
    """A file is missing, unreadable, corrupt, changed since EraseKit wrote it, or not the layout expected."""


class NumberError(InputError):
    """A numeric input is not finite or outside its range."""


class LimitError(InputError):
    """Work above a limit that protects the machine; the message says which limit and how to raise it."""


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, integer: bool = False, fix: str | None = None) -> float:
    """`value` as a float (an int if `integer`), finite and in [low, high] (low excluded unless `low_inclusive`)."""
    kind = "an integer" if integer else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise NumberError(key=name, expected=kind, found=repr(value)[:80], fix=fix) from None
    bounds = _bounds(low, high, low_inclusive)
    if not math.isfinite(number):
        raise NumberError(key=name, expected=f"a finite number{bounds}", found=repr(value)[:80], fix=fix)
    if integer and number != int(number):
        raise NumberError(key=name, expected="an integer", found=repr(value)[:80], fix=fix)
    too_low = low is not None and (number < low or (not low_inclusive and number == low))
    if too_low or (high is not None and number > high):
        raise NumberError(key=name, expected=f"a number{bounds}", found=repr(value)[:80], fix=fix)
    return int(number) if integer else number


def _bounds(low, high, low_inclusive) -> str:
    if low is not None and high is not None:
        return f" in {'[' if low_inclusive else '('}{low:g}, {high:g}]"
    if low is not None:
        return f" {'≥' if low_inclusive else '>'} {low:g}"
    if high is not None:
        return f" ≤ {high:g}"
    return ""


def check_limit(what: str, count: int, limit: int, *, setting: str) -> None:
    """Refuse `count` items of `what` above `limit` before any work starts; `setting` names how to raise it."""
    if count > limit:
        raise LimitError(f"{count} {what} is more than the limit of {limit}: split the work, or raise the limit on "
                         f"purpose with {setting}")


def check_tensor(file, key: str, tensor, *, shape: Sequence[int | None] | None = None, ndim: int | None = None,
                 max_abs: float | None = None) -> torch.Tensor:
    """`tensor` read from `file` under `key`: a torch floating-point tensor, of `ndim` dimensions or `shape` (None
    matches any size), every value finite and, where `max_abs` is given, no larger in magnitude than it."""
    if not isinstance(tensor, torch.Tensor):
        raise FileError(file=file, key=key, expected="a tensor", found=type(tensor).__name__)
    if tensor.dtype not in FLOAT_DTYPES:
        raise FileError(file=file, key=key, expected="a floating-point tensor (float16, bfloat16, float32, float64)",
                        found=str(tensor.dtype).replace("torch.", ""),
                        fix="the file is corrupt or not of this kind: write it again")
    if ndim is None and shape is not None:
        ndim = len(shape)
    if ndim is not None and tensor.ndim != ndim:
        raise FileError(file=file, key=key, expected=f"{ndim} dimensions", found=f"shape {list(tensor.shape)}")
    if shape is not None and any(want is not None and want != got for want, got in zip(shape, tensor.shape)):
        wanted = "×".join("*" if want is None else str(want) for want in shape)
        raise FileError(file=file, key=key, expected=f"shape {wanted}", found=f"shape {list(tensor.shape)}")
    if tensor.numel() == 0:
        raise FileError(file=file, key=key, expected="a non-empty tensor", found=f"shape {list(tensor.shape)}")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise FileError(file=file, key=key, expected="finite values", found=f"{bad} NaN or infinite value(s)",
                        fix="the file is corrupt or came from a diverged run: write or download it again")
    if max_abs is not None:
        largest = float(tensor.detach().abs().max())
        if largest > max_abs:
            raise FileError(file=file, key=key, expected=f"magnitudes ≤ {max_abs:g}", found=f"{largest:.3g}",
                            fix="the file is corrupt or not of this kind")
    return tensor


def retyped(err: InputError, kind: type[InputError]) -> InputError:
    """`err` as a `kind` (a subclass naming the kind of file), same message and fields, so callers that catch the
    method's error also catch what the shared readers raised."""
    if isinstance(err, kind):
        return err
    new = kind(str(err))
    new.file, new.key, new.expected, new.found, new.fix = err.file, err.key, err.expected, err.found, err.fix
    return new


def check_json(file, key: str, text, kind: type, what: str):
    """`text` (metadata under `key`) parsed as JSON into a value of Python type `kind`; a FileError otherwise."""
    if not isinstance(text, str):
        raise FileError(file=file, key=key, expected=what, found=type(text).__name__)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise FileError(file=file, key=key, expected=f"{what} (JSON)", found=f"text that is not JSON: {text[:60]!r}",
                        fix="the file is corrupt: write it again") from None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise FileError(file=file, key=key, expected=what, found=f"{type(value).__name__} {text[:60]!r}",
                        fix="the file is corrupt: write it again")
    return value


def check_strings(file, key: str, text) -> list[str]:
    """A metadata JSON list of strings."""
    value = check_json(file, key, text, list, "a JSON list of strings")
    bad = [item for item in value if not isinstance(item, str)]
    if bad:
        raise FileError(file=file, key=key, expected="a JSON list of strings", found=f"an item {bad[0]!r}",
                        fix="the file is corrupt: write it again")
    return value
