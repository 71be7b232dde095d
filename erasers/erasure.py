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
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import FileError, InputError

FORMAT_VERSION = 1
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

    def check_base(self, family: str, base_weights: Mapping[str, torch.Tensor]) -> None:
        """Raise if `family` differs; warn if the base weights are not the ones this erasure was computed on."""
        if family != self.family:
            raise FamilyMismatchError(
                f"this {self.method} erasure was made for the {self.family} family and cannot apply to a {family} "
                f"model: compute or load an erasure for {family}"
            )
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

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
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
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Erasure":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ErasureFileError(f"{path}: no such erasure file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise ErasureFileError(f"{path}: not a readable .safetensors file ({err}); the file may be truncated: "
                                   "copy or download it again") from None
        if "erasekit_format" not in meta:
            raise ErasureFileError(
                f"{path}: a .safetensors file without EraseKit metadata. If it is an official UCE, RECE, TRCE or SPM "
                "file, convert it with `erasekit convert` (or the Load Official Erasure node)."
            )
        if int(meta["erasekit_format"]) > FORMAT_VERSION:
            raise ErasureFileError(f"{path}: erasure format {meta['erasekit_format']} is newer than this EraseKit "
                                   f"reads ({FORMAT_VERSION}): upgrade erasekit")
        layer_groups = json.loads(meta["layer_groups"])
        layers = {}
        for name in json.loads(meta["layers"]):
            if name in layer_groups:
                layers[name] = LayerDelta(up=tensors[f"{name}.up"], down=tensors[f"groups.{layer_groups[name]}.down"])
            else:
                layers[name] = LayerDelta(dense=tensors[f"{name}.diff"])
        return cls(
            layers=layers,
            method=meta["method"],
            family=meta["family"],
            concepts=json.loads(meta["concepts"]),
            guide=json.loads(meta["guide"]),
            preserve=json.loads(meta["preserve"]),
            params=json.loads(meta["params"]),
            base_fingerprint=json.loads(meta["base_fingerprint"]),
        )


class FamilyMismatchError(InputError):
    """An erasure made for one model family was applied to another."""


def fingerprint(base_weights: Mapping[str, torch.Tensor]) -> list[float]:
    """Frobenius norms of the base weights, in the given order: equal across dtypes, different across fine-tunes."""
    return [float(f"{torch.linalg.vector_norm(w.detach().float()).item():.7g}") for w in base_weights.values()]

