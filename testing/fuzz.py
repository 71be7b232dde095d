"""A seeded mutation fuzzer over every file format EraseKit reads (issue #22, Build 8).

Each `Format` writes a tiny valid seed with EraseKit's own writers or the official layouts (`build`), names the
files in it that may be mutated (`targets`) and loads the folder as a user's call would (`load`). A `Case` is a
format and a seed: the seed alone picks the file, the mutation and its parameters, so ``<format>#<seed>`` replays
it exactly. Each case's outcome is one of:

- ``typed``: an `InputError` (the one error family): the loader refused the file and said why;
- ``equal``: it loaded, equal to what the unmutated seed loads to (the edit did not matter);
- ``changed``: it loaded, different, finite; allowed only for files from other tools, which carry nothing to check;
- ``changed-undetected`` (FAILURE): the same for a file EraseKit wrote (its metadata has the content hash or an
  ``erasekit_`` key), whose content hash must refuse any change;
- ``nan-accepted`` (FAILURE): it loaded with a NaN or infinite value anywhere in the result;
- ``untyped`` (FAILURE): any other exception, a bug in the loader;
- ``timeout`` / ``crash`` (FAILURE): the case ran past its limit or killed its process (the isolated runner in
  cli/fuzz.py tells these; in-process runs stop a Python-level hang with SIGALRM).

The mutations are those a damaged download, a hand edit or a hostile file makes: bit flips, truncation, byte
insertion/deletion, safetensors header edits (shape, dtype, offsets, tensor names), metadata key deletion / rename /
value edits, tensors re-saved with NaN/Inf, another dtype or another shape, pickle-level edits of ``.pt`` files
(keys, values, the pickle stream, a forbidden global), and line / cell / record edits of text, CSV, JSON and JSONL.
"""
from __future__ import annotations

import io
import json
import math
import random
import shutil
import signal
import struct
import threading
import traceback
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import torch

from ..erasers.errors import InputError
from ..erasers.files import HASH_KEY

OUTCOMES = ("typed", "equal", "changed", "changed-undetected", "nan-accepted", "untyped", "timeout", "crash")
FAILURES = frozenset({"changed-undetected", "nan-accepted", "untyped", "timeout", "crash"})
SAFETENSORS = (".safetensors",)
PICKLES = (".pt", ".pth", ".ckpt", ".bin")


@dataclass(frozen=True)
class Format:
    name: str
    build: Callable[[Path], None]  # writes the seed's files into an empty folder
    targets: tuple[str, ...]  # files of the folder a case mutates; the first is picked most often
    load: Callable[[Path], object]  # the folder's files as the pack reads them
    owned: bool | None = None  # EraseKit wrote it; None: read off the target's safetensors metadata


@dataclass(frozen=True)
class Case:
    format: str
    seed: int

    @property
    def replay(self) -> str:
        return f"{self.format}#{self.seed}"

    @classmethod
    def parse(cls, text: str) -> Case:
        name, _, seed = text.rpartition("#")
        if not name or not seed.isdigit():
            raise ValueError(f"replay {text!r}: expected '<format>#<seed>', e.g. 'erasure#12345'")
        return cls(name, int(seed))


@dataclass(frozen=True)
class Result:
    case: Case
    target: str
    mutation: str
    outcome: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome in FAILURES

    def as_dict(self) -> dict:
        return {"replay": self.case.replay, "target": self.target, "mutation": self.mutation,
                "outcome": self.outcome, "detail": self.detail}


def cases(formats: Sequence[str], per_format: int, seed: int) -> list[Case]:
    """`per_format` cases per format; the run's seed and the format's name fix each case's own seed, so a format
    gets the same cases whichever others run beside it (``--format`` reruns a subset of a full run)."""
    out = []
    for name in formats:
        rng = random.Random(f"{seed}:{name}")
        out += [Case(name, rng.getrandbits(40)) for _ in range(per_format)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running and classifying


class _Timeout(BaseException):  # not an Exception: a loader's `except Exception` must not swallow it
    pass


class Fuzzer:
    """Builds each format's seed once under `work`, loads it once, then runs cases against it."""

    def __init__(self, formats: Sequence[Format], work: str | Path, timeout: float = 20.0):
        self.formats = {f.name: f for f in formats}
        self.work, self.timeout = Path(work), timeout
        self._seeds: dict[str, tuple[Path, object, dict[str, bool]]] = {}

    def seed(self, name: str) -> tuple[Path, object, dict[str, bool]]:
        """(seed folder, canonical loaded seed, owned per target) of format `name`, built on first use."""
        if name not in self._seeds:
            fmt = self.formats[name]
            folder = self.work / "seeds" / name
            if not (folder / ".complete").exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                fmt.build(folder)
                for target in fmt.targets:
                    if target.endswith(SAFETENSORS):
                        normalise_safetensors(folder / target)
                (folder / ".complete").touch()
            original = canonical(fmt.load(folder), folder)
            if has_nonfinite(original):
                raise AssertionError(f"the seed of {name} holds NaN/Inf: the fuzzer's seed is wrong")
            owned = {t: fmt.owned if fmt.owned is not None else erasekit_wrote(folder / t) for t in fmt.targets}
            self._seeds[name] = folder, original, owned
        return self._seeds[name]

    def prepare(self, case: Case) -> tuple[Path, str, str]:
        """Write the case's mutated copy of its format's seed; (its folder, the file mutated, the mutation)."""
        fmt = self.formats[case.format]
        folder, _, _ = self.seed(case.format)
        rng = random.Random(case.replay)
        target = fmt.targets[0] if len(fmt.targets) == 1 or rng.random() < 0.75 else rng.choice(fmt.targets[1:])
        mutation, data = mutate((folder / target).read_bytes(), target, rng)
        here = self.work / "case"
        shutil.rmtree(here, ignore_errors=True)
        shutil.copytree(folder, here)
        (here / target).write_bytes(data)
        return here, target, mutation

    def run(self, case: Case) -> Result:
        if case.format not in self.formats:
            raise ValueError(f"no format {case.format!r}; the formats: {', '.join(self.formats)}")
        here, target, mutation = self.prepare(case)
        _, original, owned = self.seed(case.format)
        load = self.formats[case.format].load
        outcome, detail = classify(lambda: load(here), original, here, owned[target], self.timeout)
        return Result(case, target, mutation, outcome, detail)


def classify(load: Callable[[], object], original, folder: Path, owned: bool,
             timeout: float = 20.0) -> tuple[str, str]:
    """(outcome, detail) of one load against the seed's `original` canonical form."""
    try:
        with _time_limit(timeout):
            loaded = load()
    except _Timeout:
        return "timeout", f"no answer within {timeout:g} s"
    except InputError as err:
        return "typed", f"{type(err).__name__}: {_first_line(err)}"
    except Exception as err:  # every other exception is what the fuzzer looks for
        return "untyped", f"{type(err).__name__}: {_first_line(err)} (at {_where(err)})"
    loaded = canonical(loaded, folder)
    if has_nonfinite(loaded):
        return "nan-accepted", "loaded with NaN or infinite values"
    difference = first_difference(loaded, original)
    if difference is None:
        return "equal", ""
    return ("changed-undetected" if owned else "changed"), difference


class _time_limit:
    """SIGALRM after `seconds`, in the main thread where signals can be had; elsewhere no limit."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._expire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False

    @staticmethod
    def _expire(signum, frame):
        raise _Timeout()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:240]


def _where(err: BaseException) -> str:
    """The innermost frame of the traceback inside erasekit, else the innermost frame: where to fix it."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "erasekit" in f.filename or "/erasers/" in f.filename]
    frame = (ours or frames or [None])[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" if frame else "?"


def erasekit_wrote(path: Path) -> bool:
    """Whether a safetensors file carries EraseKit's content hash or an ``erasekit_`` metadata key."""
    if path.suffix not in SAFETENSORS:
        return False
    header, _ = split_safetensors(path.read_bytes())
    return any(key == HASH_KEY or key.startswith("erasekit_") for key in header.get("__metadata__", {}))


# ---------------------------------------------------------------------------------------------------------------
# Comparing what was loaded


def canonical(obj, folder: Path):
    """Plain data of a loaded object (tensors kept): dataclasses, configs and objects as dicts; the case folder's path
    as ``<folder>`` so that a copy compares equal to its seed; the content hash left out (it is not content)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, str):
        return obj.replace(str(folder), "<folder>")
    if obj is None or isinstance(obj, (bool, int, float, complex, bytes)):
        return obj
    if isinstance(obj, Path):
        return canonical(str(obj), folder)
    if isinstance(obj, Mapping):
        return {canonical(k, folder): canonical(v, folder) for k, v in obj.items() if k != HASH_KEY}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [canonical(v, folder) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, (set, frozenset)) else items
    if is_dataclass(obj):
        return {"<type>": type(obj).__name__, **{f.name: canonical(getattr(obj, f.name), folder) for f in fields(obj)}}
    if hasattr(obj, "to_dict"):
        return {"<type>": type(obj).__name__, **canonical(obj.to_dict(), folder)}
    if hasattr(obj, "__dict__"):
        return {"<type>": type(obj).__name__, **canonical(vars(obj), folder)}
    return repr(obj)


def has_nonfinite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all())
    if isinstance(obj, (float, complex)):
        return not (math.isfinite(obj.real) and math.isfinite(obj.imag))
    if isinstance(obj, Mapping):
        return any(has_nonfinite(v) for v in obj.values())
    if isinstance(obj, list):
        return any(has_nonfinite(v) for v in obj)
    return False


def first_difference(a, b, where: str = "") -> str | None:
    """Where `a` and `b` (canonical forms) first differ, or None if equal: dtypes, shapes and bits of tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where or 'value'}: {type(a).__name__} instead of {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype} {list(a.shape)} instead of {b.dtype} {list(b.shape)}"
        return None if torch.equal(a, b) else f"{where}: values differ"
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            extra, missing = sorted(map(str, set(a) - set(b)))[:2], sorted(map(str, set(b) - set(a)))[:2]
            return f"{where or 'keys'}: extra {extra}, missing {missing}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}.{k}" if where else str(k)))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where or 'list'}: {len(a)} items instead of {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    if type(a) is not type(b) or a != b:
        return f"{where or 'value'}: {repr(a)[:60]} instead of {repr(b)[:60]}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Mutations


def mutate(data: bytes, name: str, rng: random.Random) -> tuple[str, bytes]:
    """(mutation name, mutated bytes) of file `name`'s `data`: structured for its kind, or a byte-level edit."""
    suffix = Path(name).suffix.lower()
    structured = (_SAFETENSORS_MUTATIONS if suffix in SAFETENSORS else _PICKLE_MUTATIONS if suffix in PICKLES
                  else _JSON_MUTATIONS if suffix == ".json" else _JSONL_MUTATIONS if suffix == ".jsonl"
                  else _TEXT_MUTATIONS)
    kinds = structured if rng.random() < 0.7 else _BYTE_MUTATIONS
    kind = rng.choice(sorted(kinds))
    return kind, kinds[kind](data, rng)


def _bitflip(data: bytes, rng) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 8))):
        at = _position(len(out), rng)
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out)


def _position(size: int, rng) -> int:
    """A byte position, half the time within the first 512 bytes, where the headers are."""
    return rng.randrange(min(size, 512)) if rng.random() < 0.5 else rng.randrange(size)


def _truncate(data: bytes, rng) -> bytes:
    return data[:rng.randrange(len(data))]


def _insert(data: bytes, rng) -> bytes:
    at = _position(len(data), rng)
    return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]


def _delete(data: bytes, rng) -> bytes:
    at = _position(len(data), rng)
    return data[:at] + data[at + rng.randint(1, 16):]


def _overwrite(data: bytes, rng) -> bytes:
    at, size = _position(len(data), rng), rng.randint(1, 64)
    return data[:at] + rng.randbytes(size) + data[at + size:]


_BYTE_MUTATIONS = {"bitflip": _bitflip, "truncate": _truncate, "insert-bytes": _insert, "delete-bytes": _delete,
                   "overwrite-bytes": _overwrite}

# Values a hand edit or a hostile file puts where a string, number or list was.
_ODD_STRINGS = ("", "nan", "NaN", "inf", "-inf", "-1", "0", "1e39", "1e309", "99999999999999999999", "[]", "{}",
                "null", "true", '"x"', "[1,2", "{\"a\":", "sd2", "sdxl", "x" * 300, "../../etc/passwd", "\u0000",
                "[null]", "[[1]]", "{\"a\": 1}", "1.5", "-0")
_ODD_VALUES = (None, [], {}, -1, 0, 1.5, 2**64, -(2**63), math.nan, math.inf, -math.inf, "", "x", True,
               "../../outside.png", "/etc/passwd", [1, [2]], {"a": None}, "nan", 1e308, [None])


def _odd_string(rng) -> str:
    return rng.choice(_ODD_STRINGS)


def _odd_value(rng):
    return rng.choice(_ODD_VALUES)


def _edit_json_text(text: str, rng) -> str:
    """A JSON-ish metadata value edited inside its structure when it parses, else replaced outright."""
    try:
        value = json.loads(text)
    except ValueError:
        return _odd_string(rng)
    if rng.random() < 0.3:
        return _odd_string(rng)
    return json.dumps(_edit_value(value, rng))


def _edit_value(value, rng):
    """One edit somewhere inside a JSON value: an element or key dropped, duplicated or replaced, a number moved."""
    if isinstance(value, list) and value:
        at = rng.randrange(len(value))
        choice = rng.randrange(4)
        if choice == 0:
            return value[:at] + value[at + 1:]
        if choice == 1:
            return value[:at] + [value[at]] + value[at:]
        if choice == 2:
            return value[:at] + [_edit_value(value[at], rng)] + value[at + 1:]
        return value[:at] + [_odd_value(rng)] + value[at + 1:]
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        edited = dict(value)
        choice = rng.randrange(4)
        if choice == 0:
            del edited[key]
        elif choice == 1:
            edited[key + "_"] = edited.pop(key)
        elif choice == 2:
            edited[key] = _edit_value(value[key], rng)
        else:
            edited[key] = _odd_value(rng)
        return edited
    if isinstance(value, bool) or value is None:
        return _odd_value(rng)
    if isinstance(value, (int, float)):
        return rng.choice((value + 1, -value, value * 1e30, math.nan, math.inf, 0, str(value), [value]))
    return _odd_value(rng)


# --- safetensors ------------------------------------------------------------------------------------------------

_DTYPES = ("F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "U64", "X")


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    """The file of `header` and `body`; the header's keys sorted, so that the same content gives the same bytes."""
    text = json.dumps(header, sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def normalise_safetensors(path: Path) -> None:
    """Rewrite a safetensors file with its header's keys sorted: the safetensors library orders metadata by a
    random hash seed, and a replay must mutate the very bytes the failing case mutated."""
    path.write_bytes(join_safetensors(*split_safetensors(path.read_bytes())))


def _header_edit(edit):
    """A mutation that edits the parsed header (`edit(header, rng)`) and keeps the data bytes."""

    def mutation(data: bytes, rng) -> bytes:
        header, body = split_safetensors(data)
        edit(header, rng)
        return join_safetensors(header, body)

    return mutation


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _edit_shape(header, rng):
    entry = header[rng.choice(_tensor_names(header))]
    shape = list(entry["shape"])
    choice = rng.randrange(6)
    if choice == 0 and len(shape) > 1:
        shape = shape[::-1]
    elif choice == 1:
        shape.insert(rng.randrange(len(shape) + 1), 1)
    elif choice == 2 and shape:
        shape = shape[:-1] or []
    elif choice == 3 and shape:
        at = rng.randrange(len(shape))
        shape[at] = max(0, shape[at] + rng.choice((-1, 1)))
    elif choice == 4 and shape:
        shape[rng.randrange(len(shape))] = rng.choice((0, 2**40, -1))
    else:
        shape = [math.prod(shape)] if shape else [1]
    entry["shape"] = shape


def _edit_dtype(header, rng):
    header[rng.choice(_tensor_names(header))]["dtype"] = rng.choice(_DTYPES)


def _edit_offsets(header, rng):
    names = _tensor_names(header)
    entry = header[rng.choice(names)]
    begin, end = entry["data_offsets"]
    choice = rng.randrange(4)
    if choice == 0 and len(names) > 1:
        other = header[rng.choice(names)]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif choice == 1:
        shift = rng.choice((-8, -2, 2, 8))
        entry["data_offsets"] = [begin + shift, end + shift]
    elif choice == 2:
        entry["data_offsets"] = [end, begin]
    else:
        entry["data_offsets"] = [begin, end + rng.choice((-4, 4, 2**40))]


def _rename_tensor(header, rng):
    name = rng.choice(_tensor_names(header))
    header[_renamed(name, rng)] = header.pop(name)


def _renamed(name: str, rng) -> str:
    choice = rng.randrange(4)
    if choice == 0:
        return name + "_"
    if choice == 1 and any(c.isdigit() for c in name):
        at = rng.choice([i for i, c in enumerate(name) if c.isdigit()])
        return name[:at] + str((int(name[at]) + 1) % 10) + name[at + 1:]
    if choice == 2 and "." in name:
        parts = name.split(".")
        del parts[rng.randrange(len(parts))]
        return ".".join(parts)
    return name.upper()


def _drop_tensor_entry(header, rng):
    names = _tensor_names(header)
    if len(names) > 1:
        del header[rng.choice(names)]


def _alias_tensor(header, rng):
    name = rng.choice(_tensor_names(header))
    header[_renamed(name, rng)] = dict(header[name])


def _metadata(header) -> dict:
    return header.setdefault("__metadata__", {})


def _delete_metadata(header, rng):
    meta = _metadata(header)
    if meta:
        del meta[rng.choice(sorted(meta))]


def _rename_metadata(header, rng):
    meta = _metadata(header)
    if meta:
        key = rng.choice(sorted(meta))
        meta[_renamed(key, rng)] = meta.pop(key)


def _edit_metadata(header, rng):
    meta = _metadata(header)
    if meta:
        key = rng.choice(sorted(meta))
        meta[key] = _edit_json_text(meta[key], rng)


def _add_metadata(header, rng):
    _metadata(header)[rng.choice(("erasekit_format", "erasekit_x", "rank", "alpha", "prompts", "format", "x"))] = \
        _odd_string(rng)


def _resaved(edit):
    """A mutation that loads the tensors, edits them (`edit(tensors, rng)`), and saves them with the same metadata:
    a well-formed file whose content changed (the content hash, if any, is kept as it was)."""

    def mutation(data: bytes, rng) -> bytes:
        from safetensors.torch import load, save

        header, _ = split_safetensors(data)
        tensors = load(data)
        edit(tensors, rng)
        return join_safetensors(*split_safetensors(save(tensors, metadata=header.get("__metadata__"))))

    return mutation


def _poison(tensor: torch.Tensor, rng) -> torch.Tensor:
    out = tensor.clone()
    if not out.is_floating_point() or out.numel() == 0:
        return out.float().fill_(math.nan) if out.numel() else out
    flat = out.view(-1)
    value = rng.choice((math.nan, math.inf, -math.inf))
    for _ in range(rng.choice((1, 3))):
        flat[rng.randrange(flat.numel())] = value
    if rng.random() < 0.2:
        flat.fill_(value)
    return out


def _nan_payload(tensors, rng):
    name = rng.choice(sorted(tensors))
    tensors[name] = _poison(tensors[name], rng)


def _retype(tensors, rng):
    name = rng.choice(sorted(tensors))
    dtype = rng.choice((torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.float16, torch.bfloat16,
                        torch.float64))
    tensors[name] = tensors[name].to(dtype)


def _reshape(tensor: torch.Tensor, rng) -> torch.Tensor:
    choice = rng.randrange(6)
    if choice == 0 and tensor.dim() >= 2:
        return tensor.transpose(0, 1).contiguous()
    if choice == 1:
        return tensor.reshape(-1).contiguous()
    if choice == 2:
        return tensor.unsqueeze(0).contiguous()
    if choice == 3 and tensor.dim() and tensor.shape[0] > 1:
        return tensor[:-1].contiguous()
    if choice == 4 and tensor.dim():
        return torch.cat([tensor, tensor[:1]]).contiguous()
    return tensor.reshape(-1)[:1].reshape(()).contiguous() if tensor.numel() else tensor


def _reshape_one(tensors, rng):
    name = rng.choice(sorted(tensors))
    tensors[name] = _reshape(tensors[name], rng)


def _nudge(tensor: torch.Tensor, rng) -> torch.Tensor:
    out = tensor.clone()
    if out.numel():
        flat = out.view(-1)
        at = rng.randrange(flat.numel())
        flat[at] = flat[at] * 1.5 + 0.25 if out.is_floating_point() else flat[at] ^ 1 if out.dtype == torch.bool \
            else flat[at] + 1
    return out


def _nudge_one(tensors, rng):
    name = rng.choice(sorted(tensors))
    tensors[name] = _nudge(tensors[name], rng)


def _drop_tensor(tensors, rng):
    if len(tensors) > 1:
        del tensors[rng.choice(sorted(tensors))]


def _scale_one(tensors, rng):
    name = rng.choice(sorted(tensors))
    if tensors[name].is_floating_point():
        tensors[name] = tensors[name] * rng.choice((1e4, 1e30, -1.0, 0.0))


_SAFETENSORS_MUTATIONS = {
    "header-shape": _header_edit(_edit_shape),
    "header-dtype": _header_edit(_edit_dtype),
    "header-offsets": _header_edit(_edit_offsets),
    "header-rename-tensor": _header_edit(_rename_tensor),
    "header-drop-tensor": _header_edit(_drop_tensor_entry),
    "header-alias-tensor": _header_edit(_alias_tensor),
    "meta-delete": _header_edit(_delete_metadata),
    "meta-rename": _header_edit(_rename_metadata),
    "meta-value": _header_edit(_edit_metadata),
    "meta-add": _header_edit(_add_metadata),
    "tensor-nan": _resaved(_nan_payload),
    "tensor-dtype": _resaved(_retype),
    "tensor-shape": _resaved(_reshape_one),
    "tensor-value": _resaved(_nudge_one),
    "tensor-scale": _resaved(_scale_one),
    "tensor-drop": _resaved(_drop_tensor),
}


# --- PyTorch pickles --------------------------------------------------------------------------------------------


def _pickled(edit):
    """A mutation that unpickles the file (weights only), edits the object and saves it again with torch.save."""

    def mutation(data: bytes, rng) -> bytes:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        out = io.BytesIO()
        torch.save(edit(obj, rng), out)
        return out.getvalue()

    return mutation


def _tensor_dict(obj) -> dict:
    """The dict of tensors inside a loaded checkpoint (under ``state_dict`` when there is one)."""
    return obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj


def _pickle_tensors(edit):
    def on_object(obj, rng):
        tensors = _tensor_dict(obj)
        names = sorted(k for k, v in tensors.items() if isinstance(v, torch.Tensor))
        edit(tensors, names, rng)
        return obj

    return _pickled(on_object)


def _p_delete(tensors, names, rng):
    del tensors[rng.choice(names)]


def _p_rename(tensors, names, rng):
    name = rng.choice(names)
    tensors[_renamed(name, rng)] = tensors.pop(name)


def _p_nan(tensors, names, rng):
    name = rng.choice(names)
    tensors[name] = _poison(tensors[name], rng)


def _p_dtype(tensors, names, rng):
    name = rng.choice(names)
    tensors[name] = tensors[name].to(rng.choice((torch.int8, torch.int64, torch.bool, torch.float16, torch.float64)))


def _p_shape(tensors, names, rng):
    name = rng.choice(names)
    tensors[name] = _reshape(tensors[name], rng)


def _p_value(tensors, names, rng):
    name = rng.choice(names)
    tensors[name] = _nudge(tensors[name], rng)


def _p_not_tensor(tensors, names, rng):
    tensors[rng.choice(names)] = rng.choice((1, 2.5, "x", None, [1, 2], {"a": 1}, math.nan, (torch.zeros(1),)))


def _p_wrap(obj, rng):
    return rng.choice(([obj], {"state_dict": 5}, {"state_dict": obj, "x": math.nan}, torch.zeros(2),
                       {"model": obj}, (obj,), None, {}, {"state_dict": {}}))


def _pickle_stream(edit):
    """A mutation of the pickle program inside the torch zip (``data.pkl``), the archive written again."""

    def mutation(data: bytes, rng) -> bytes:
        source = zipfile.ZipFile(io.BytesIO(data))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
            for info in source.infolist():
                content = source.read(info.filename)
                if info.filename.endswith("/data.pkl"):
                    content = edit(content, rng)
                target.writestr(info, content)
        return out.getvalue()

    return mutation


def _forbidden_global(program: bytes, rng) -> bytes:
    """The pickle made to call a global that is no tensor's (os.getcwd: harmless if a loader ever ran it)."""
    call = b"\x80\x02cos\ngetcwd\n)R."
    return call if rng.random() < 0.5 else program[:2] + b"cos\ngetcwd\n)R0" + program[2:]


def _pickle_bytes(program: bytes, rng) -> bytes:
    return rng.choice((_bitflip, _truncate, _insert, _delete))(program, rng)


_PICKLE_MUTATIONS = {
    "pickle-delete-key": _pickle_tensors(_p_delete),
    "pickle-rename-key": _pickle_tensors(_p_rename),
    "pickle-nan": _pickle_tensors(_p_nan),
    "pickle-dtype": _pickle_tensors(_p_dtype),
    "pickle-shape": _pickle_tensors(_p_shape),
    "pickle-value": _pickle_tensors(_p_value),
    "pickle-not-tensor": _pickle_tensors(_p_not_tensor),
    "pickle-wrap": _pickled(_p_wrap),
    "pickle-stream-bytes": _pickle_stream(_pickle_bytes),
    "pickle-forbidden-global": _pickle_stream(_forbidden_global),
}


# --- text, CSV, JSON, JSONL -------------------------------------------------------------------------------------

_ODD_LINES = ("", "nan", "inf", "-1", "1e309", "\u0000", "\ufeffprompt", '"', '"unclosed, quote', ",,,,",
              "a" * 200_000, "prompt,prompt", "x,nan,nan,x", "x,-5,1e39,x", "x,1.5,-inf,x",
              "x,99999999999999999999,1,x",
              "\u202e\u0301", "\r", "😀" * 10)


def _lines_edit(edit):
    def mutation(data: bytes, rng) -> bytes:
        lines = data.decode("utf-8", "surrogateescape").split("\n")
        edit(lines, rng)
        return "\n".join(lines).encode("utf-8", "surrogateescape")

    return mutation


def _line_delete(lines, rng):
    del lines[rng.randrange(len(lines))]


def _line_duplicate(lines, rng):
    at = rng.randrange(len(lines))
    lines.insert(at, lines[at])


def _line_swap(lines, rng):
    a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[a], lines[b] = lines[b], lines[a]


def _line_insert(lines, rng):
    lines.insert(rng.randrange(len(lines) + 1), rng.choice(_ODD_LINES))


def _cell_edit(lines, rng):
    at = rng.randrange(len(lines))
    cells = lines[at].split(",")
    cells[rng.randrange(len(cells))] = _odd_string(rng)
    lines[at] = ",".join(cells)


def _encoding_edit(data: bytes, rng) -> bytes:
    return rng.choice((b"\xef\xbb\xbf" + data, data.replace(b"\n", b"\r\n"), data + b"\xff\xfe",
                       b"\xff" + data, data.replace(b",", b";"), data.replace(b"\n", b"\x00\n", 1), b"", b"\n\n"))


_TEXT_MUTATIONS = {
    "line-delete": _lines_edit(_line_delete),
    "line-duplicate": _lines_edit(_line_duplicate),
    "line-swap": _lines_edit(_line_swap),
    "line-insert": _lines_edit(_line_insert),
    "cell-edit": _lines_edit(_cell_edit),
    "encoding": _encoding_edit,
}


def _json_edit(data: bytes, rng) -> bytes:
    return json.dumps(_edit_value(json.loads(data), rng)).encode()


def _record_edit(lines, rng):
    at = rng.randrange(len(lines))
    try:
        record = json.loads(lines[at])
    except ValueError:
        lines[at] = json.dumps(_odd_value(rng))
        return
    lines[at] = json.dumps(_edit_value(record, rng))


_JSON_MUTATIONS = {"json-edit": _json_edit, "json-replace": lambda data, rng: json.dumps(_odd_value(rng)).encode(),
                   "encoding": _encoding_edit}
_JSONL_MUTATIONS = {**_TEXT_MUTATIONS, "record-edit": _lines_edit(_record_edit),
                    "record-edit-2": _lines_edit(_record_edit)}
