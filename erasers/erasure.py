"""The one object every method produces: an Erasure, a set of per-layer weight deltas with its provenance.

A delta is ΔW = up @ down (rank r) or, where that is smaller, dense. Closed-form edits share one `down` across all
layers of a context width (the solve is shared), so several layers may hold the same `down` tensor; the file stores
it once. Layers are named by diffusers parameter names prefixed by the model part (``unet.``), e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``; a bias delta is a dense vector.

File format (.safetensors, format version 1):
- tensors ``<layer>.up`` (out×r) with ``groups.<g>.down`` (r×in), or ``<layer>.diff`` (out×in) for dense deltas;
- metadata (strings): ``erasekit_format``, ``method``, ``family``, ``concepts``/``guide``/``preserve``/``params``
  (JSON), ``base_fingerprint`` (JSON list: the Frobenius norm of each edited base weight, in layer order),
  ``layer_groups`` (JSON {layer: g}).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import FileError, InputError, check_json, check_strings, check_tensor, retyped
from .files import HASHED_FORMAT, read_safetensors, write_safetensors

# 2: written with the content hash (erasers/files.py), which a format-2 file must carry; 1 loads as before.
FORMAT_VERSION = HASHED_FORMAT
# Relative difference of base-weight norms above which the base is another model (fp16 rounding stays far below).
FINGERPRINT_TOLERANCE = 1e-3


class ErasureFileError(FileError):
    """An erasure file is missing, corrupt, or not an EraseKit erasure."""


class BaseMismatchWarning(UserWarning):
    """An erasure is applied to another fine-tune of the family it was computed on."""


@dataclass
class LayerDelta:
    """ΔW of one weight: `up @ down`, or `dense`."""

    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.up.shape[0], self.down.shape[1])

    @property
    def rank(self) -> int:
        return min(self.shape) if self.dense is not None else self.up.shape[1]

    def materialize(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.to(device=device, dtype=dtype)
        up = self.up.to(device=device, dtype=torch.float32)
        return (up @ self.down.to(device=device, dtype=torch.float32)).to(dtype)


def compact(up: torch.Tensor, down: torch.Tensor) -> LayerDelta:
    """Keep factors when they are smaller than the dense matrix, else materialise (rank near full)."""
    out, rank = up.shape
    if rank * (out + down.shape[1]) >= out * down.shape[1]:
        return LayerDelta(dense=up @ down)
    return LayerDelta(up=up, down=down)


@dataclass
class Erasure:
    layers: dict[str, LayerDelta]
    method: str
    family: str
    concepts: list[str]
    guide: list[str] = field(default_factory=list)
    preserve: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    base_fingerprint: list[float] = field(default_factory=list)
    source: str | None = field(default=None, compare=False, repr=False)  # the file it was loaded from

    def check_base(self, family: str, base_weights: Mapping[str, torch.Tensor]) -> None:
        """Raise if `family` differs or the erasure does not fit `base_weights` (every layer it edits, by erasure
        layer name); warn if the base weights are not the ones this erasure was computed on."""
        if family != self.family:
            raise FamilyMismatchError(
                f"{self._name()}was made for the {self.family} family and cannot apply to a {family} "
                f"model: compute or load an erasure for {family}"
            )
        self.check_fits({name: tuple(weight.shape) for name, weight in base_weights.items()})
        if not self.base_fingerprint:
            return
        names = list(self.layers)
        missing = [n for n in names if n not in base_weights]
        if missing:
            raise FamilyMismatchError(f"the model has no layer {missing[0]!r} that this erasure edits")
        theirs = fingerprint({n: base_weights[n] for n in names})
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(theirs, self.base_fingerprint))
        if worst > FINGERPRINT_TOLERANCE:
            warnings.warn(
                f"this erasure was computed on other {self.family} weights (a different fine-tune: base weight norms "
                f"differ by up to {worst:.1%}); it still applies, but its effect may differ. Recompute it on this "
                "model for an exact edit.",
                BaseMismatchWarning,
                stacklevel=2,
            )

    def check_fits(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise ErasureMisfitError naming the first layer the model (`shapes`: weight shapes by erasure layer name)
        lacks or whose shape differs from the erasure's delta: applied anyway, such a delta is dropped with only a
        log line and the image is not erased at all."""
        for name, delta in self.layers.items():
            if name not in shapes:
                raise ErasureMisfitError(
                    f"{self._name()}edits layer {name!r}, which the model does not have: the erasure was made for "
                    "another model architecture; compute or load an erasure for this model")
            if tuple(shapes[name]) != tuple(delta.shape):
                raise ErasureMisfitError(
                    f"{self._name()}does not fit the model: layer {name!r} is {_shape(delta.shape)} in the erasure "
                    f"but {_shape(shapes[name])} in the model (the erasure was made for another model, e.g. another "
                    "context width); compute or load an erasure for this model")

    def _name(self) -> str:
        return f"erasure {self.source} " if self.source else f"this {self.method} erasure "

    def save(self, path: str | Path, *, inputs=()) -> Path:
        """Write the erasure (atomically, with its content hash); `inputs` are files the write must not replace."""
        tensors: dict[str, torch.Tensor] = {}
        groups: dict[int, int] = {}  # id(down) -> group index
        layer_groups: dict[str, int] = {}
        for name, delta in self.layers.items():
            if delta.dense is not None:
                tensors[f"{name}.diff"] = delta.dense.contiguous()
                continue
            if id(delta.down) not in groups:
                groups[id(delta.down)] = len(groups)
                tensors[f"groups.{groups[id(delta.down)]}.down"] = delta.down.contiguous()
            tensors[f"{name}.up"] = delta.up.contiguous()
            layer_groups[name] = groups[id(delta.down)]
        metadata = {
            "erasekit_format": str(FORMAT_VERSION),
            "method": self.method,
            "family": self.family,
            "concepts": json.dumps(self.concepts),
            "guide": json.dumps(self.guide),
            "preserve": json.dumps(self.preserve),
            "params": json.dumps(self.params),
            "base_fingerprint": json.dumps(self.base_fingerprint),
            "layer_groups": json.dumps(layer_groups),
            "layers": json.dumps(list(self.layers)),
        }
        # What load refuses is never written: a diverged solve must fail here, not in the user's next session.
        try:
            _check_layout(path, metadata, tensors)
        except InputError as err:
            raise retyped(err, ErasureFileError) from None
        return write_safetensors(path, tensors, metadata, inputs=inputs)

    @classmethod
    def load(cls, path: str | Path) -> "Erasure":
        """An erasure file, checked whole: metadata keys and types, every tensor float, finite, of sane magnitude,
        factors paired and rank-consistent, no stray tensors. Any problem is an ErasureFileError naming it."""
        if isinstance(path, (str, os.PathLike)) and not os.path.lexists(path):
            raise ErasureFileError(f"{path}: no such erasure file")
        try:
            meta, tensors = read_safetensors(path, "erasure file")
            if "erasekit_format" not in meta:
                raise ErasureFileError(
                    f"{path}: a .safetensors file without EraseKit metadata. If it is an official UCE, RECE, TRCE or "
                    "SPM file, convert it with `erasekit convert` (or the Load Official Erasure node)."
                )
            fields, layers = _check_layout(path, meta, tensors)
        except InputError as err:
            raise retyped(err, ErasureFileError) from None
        return cls(layers=layers, source=str(path), **fields)


def _shape(shape) -> str:
    return "×".join(str(int(n)) for n in shape)


# Largest |value| an erasure tensor may hold: deltas of attention weights (|W| ~ 1) are far smaller; beyond this the
# file is corrupt, and float16 ComfyUI weights (max 65504) would turn it into Inf.
MAX_ABS = 1e4
_STRING_LISTS = ("concepts", "guide", "preserve", "layers")


def _check_layout(path, meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor]):
    """(fields for Erasure, layers) of an erasure's metadata and tensors, or a FileError naming the first problem."""
    _check_format(path, meta)
    for key in ("method", "family"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise FileError(file=path, key=key, expected="a non-empty string",
                            found=repr(meta.get(key)) if key in meta else "no such metadata key",
                            fix="the file is corrupt or not an EraseKit erasure: write it again")
    for key in (*_STRING_LISTS, "params", "base_fingerprint", "layer_groups"):
        if key not in meta:
            raise FileError(file=path, key=key, expected="this metadata key", found="none",
                            fix="the file is corrupt or not an EraseKit erasure: write it again")
    lists = {key: check_strings(path, key, meta[key]) for key in _STRING_LISTS}
    params = check_json(path, "params", meta["params"], dict, "a JSON object")
    names = lists.pop("layers")
    groups = _check_groups(path, meta["layer_groups"], names)
    fingerprint_ = _check_fingerprint(path, meta["base_fingerprint"], len(names))
    layers = _layers(path, names, groups, tensors)
    fields = dict(method=meta["method"], family=meta["family"], params=params, base_fingerprint=fingerprint_, **lists)
    return fields, layers


def _check_format(path, meta: Mapping[str, str]) -> None:
    raw = meta.get("erasekit_format")
    if not isinstance(raw, str) or not raw.isdigit() or not 1 <= int(raw) <= 10**6:
        raise FileError(file=path, key="erasekit_format", expected=f"a format version 1..{FORMAT_VERSION}",
                        found=repr(raw), fix="the file is corrupt: write it again")
    if int(raw) > FORMAT_VERSION:
        raise FileError(f"{path}: erasure format {raw} is newer than this EraseKit reads ({FORMAT_VERSION}): "
                        "upgrade erasekit")


def _check_groups(path, text, names: list[str]) -> dict[str, int]:
    if not names:
        raise FileError(file=path, key="layers", expected="at least one layer", found="[]",
                        fix="the file is corrupt: write it again")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise FileError(file=path, key="layers", expected="each layer once", found=f"{twice!r} twice")
    groups = check_json(path, "layer_groups", text, dict, "a JSON object {layer: group number}")
    for name, group in groups.items():
        if name not in names:
            raise FileError(file=path, key="layer_groups", expected="only layers listed under 'layers'",
                            found=f"{name!r}", fix="the file is corrupt: write it again")
        if not isinstance(group, int) or isinstance(group, bool) or not 0 <= group < len(names):
            raise FileError(file=path, key="layer_groups", expected=f"group numbers 0..{len(names) - 1}",
                            found=f"{group!r} for {name!r}", fix="the file is corrupt: write it again")
    return groups


def _check_fingerprint(path, text, count: int) -> list[float]:
    norms = check_json(path, "base_fingerprint", text, list, "a JSON list of numbers")
    if norms and len(norms) != count:
        raise FileError(file=path, key="base_fingerprint", expected=f"{count} norms (one per layer) or none",
                        found=f"{len(norms)}", fix="the file is corrupt: write it again")
    for norm in norms:
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not math.isfinite(norm) or norm < 0:
            raise FileError(file=path, key="base_fingerprint", expected="finite norms ≥ 0", found=repr(norm),
                            fix="the file is corrupt: write it again")
    return [float(norm) for norm in norms]


def _layers(path, names: list[str], groups: Mapping[str, int],
            tensors: Mapping[str, torch.Tensor]) -> dict[str, LayerDelta]:
    used: set[str] = set()

    def tensor(key: str, ndim: int | tuple[int, ...], role: str) -> torch.Tensor:
        if key not in tensors:
            raise FileError(file=path, key=key, expected=f"the {role} tensor", found="no such tensor",
                            fix="the file is incomplete or corrupt: write it again")
        value = tensors[key]
        dims = (ndim,) if isinstance(ndim, int) else ndim
        check_tensor(path, key, value, max_abs=MAX_ABS)
        if value.ndim not in dims:
            raise FileError(file=path, key=key, expected=f"{' or '.join(map(str, dims))} dimensions ({role})",
                            found=f"shape {list(value.shape)}", fix="the file is corrupt: write it again")
        used.add(key)
        return value

    layers: dict[str, LayerDelta] = {}
    for name in names:
        if name in groups:
            up = tensor(f"{name}.up", 2, f"up factor (out×rank) of {name}")
            down = tensor(f"groups.{groups[name]}.down", 2, f"shared down factor (rank×in) of {name}")
            if up.shape[1] != down.shape[0]:
                raise FileError(file=path, key=f"{name}.up",
                                expected=f"rank {down.shape[0]} (the rows of groups.{groups[name]}.down)",
                                found=f"shape {list(up.shape)}, rank {up.shape[1]}",
                                fix="the file is corrupt: write it again")
            layers[name] = LayerDelta(up=up, down=down)
        else:
            layers[name] = LayerDelta(dense=tensor(f"{name}.diff", (1, 2), f"dense delta of {name}"))
    stray = sorted(set(tensors) - used)
    if stray:
        raise FileError(file=path, key=stray[0], expected="only tensors of the layers listed under 'layers'",
                        found=f"{len(stray)} other tensor(s)", fix="the file is corrupt: write it again")
    return layers


class FamilyMismatchError(InputError):
    """An erasure made for one model family was applied to another."""


class ErasureMisfitError(FamilyMismatchError):
    """An erasure's layers are not the model's: missing, or of another shape."""


def fingerprint(base_weights: Mapping[str, torch.Tensor]) -> list[float]:
    """Frobenius norms of the base weights, in the given order: equal across dtypes, different across fine-tunes."""
    return [float(f"{torch.linalg.vector_norm(w.detach().float()).item():.7g}") for w in base_weights.values()]

