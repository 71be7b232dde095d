"""Official UCE, RECE and TRCE releases as EraseKit erasures: the difference against the user's base weights.

The official code ships edited weights, not edits:

- UCE (2025 code): a ``.safetensors`` holding only the edited cross-attention weights W*, diffusers names
  (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``; 32 tensors on SD1.x, 140 on SDXL);
- UCE (2023 code) and RECE: ``torch.save(unet.state_dict())``, every UNet tensor in diffusers names, of which only
  the attn2 to_k/to_v weights differ from the base. The two cannot be told apart by content;
- TRCE: ``unet.save_pretrained(dir)``, a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.*``).
  Stage 1 changes the attn2 to_k/to_v weights, stage 2 every ``attn1.*`` parameter and ``attn2.to_q``.

`convert` reads any of them (pickles only with ``weights_only=True``), subtracts the base and keeps the layers that
changed. A closed-form K/V edit has rank at most the number of erased token vectors, so each K/V delta is stored as
factors ``up @ down`` of the smallest rank whose relative reconstruction error is at most `tol`; TRCE's stage-2
deltas and all biases stay dense. A closed-form edit's K/V deltas share their row space (the erased keys'), so a
K/V layer first tries the ``down`` of an earlier layer of its context width and stores only its ``up`` where that
is within `tol`, as EraseKit's own closed-form edits do. Ranks are found with a randomised range finder whose
residual is measured, and every reported error is that of the stored float32 factors (exact to about 1e-6).

Precision: a float16/bfloat16 base (or file) differs from the float32 weights the file was made from by rounding
alone, up to half a unit in the last place of every element. Layers whose difference is within one unit are
unchanged, and the factor rank is chosen so that the reconstruction error stays within max(tol·‖ΔW‖, u_base·‖W₀‖ +
u_file·‖W*‖), u being the unit roundoff: below that the difference is the weights' own rounding noise.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..erasure import Erasure, LayerDelta, compact, fingerprint
from ..families import FamilyError, family_from_context_dim
from ..io.checkpoints import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    CheckpointError,
    read_checkpoint,
    read_checkpoint_shapes,
)

UCE_2025 = "uce-2025"
UNET_STATE_DICT = "unet-state-dict"
DIFFUSERS_UNET = "diffusers-unet"
ERASEKIT = "erasekit"  # already an EraseKit erasure: detect_format names it, convert refuses it

FORMATS = {
    UCE_2025: "UCE (2025 code): a .safetensors holding only the edited attn2.to_k/to_v weights, diffusers names",
    UNET_STATE_DICT: "UCE (2023 code) or RECE: a full UNet state dict (torch.save, .pt/.pth/.bin/.ckpt, or "
                     ".safetensors), diffusers names",
    DIFFUSERS_UNET: "TRCE: a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors or .bin)",
}
# Method names when the caller gives none: what each format is released by.
DEFAULT_METHODS = {UCE_2025: "uce-2025", UNET_STATE_DICT: "uce-2023-or-rece", DIFFUSERS_UNET: "trce"}

ACCEPTED = "EraseKit converts:\n" + "\n".join(f"  - {text}" for text in FORMATS.values())

DEFAULT_TOL = 1e-4
# A difference below this share of the weight's Frobenius norm is no edit.
UNCHANGED_RELATIVE = 1e-7

_KV = re.compile(r"^(?:down_blocks|mid_block|up_blocks)\.[\w.]*\.attn2\.to_[kv]\.weight$")
_TRCE_STAGE2 = re.compile(
    r"^(?:down_blocks|mid_block|up_blocks)\.[\w.]*\.(?:attn1\.(?:to_q|to_k|to_v|to_out\.0)|attn2\.to_q)\.(?:weight|bias)$"
)
_UNET_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)


class ConversionError(CheckpointError):
    """A file is not an official erasure EraseKit converts, or does not fit the base weights given."""


# ---------------------------------------------------------------------------------------------------------------
# Formats


@dataclass(frozen=True)
class _Source:
    format: str
    path: Path  # the file, or the UNet folder
    files: tuple[Path, ...]  # weight files to read


def detect_format(path: str | os.PathLike) -> str:
    """``"uce-2025"``, ``"unet-state-dict"`` (UCE 2023 / RECE), ``"diffusers-unet"`` (TRCE) or ``"erasekit"``.

    safetensors files are told apart by their keys (header only); PyTorch pickles are taken to be full UNet state
    dicts without being read, and `convert` checks their keys. Anything else raises ConversionError naming the
    accepted formats; a truncated safetensors file raises CheckpointError.
    """
    return _locate(path).format


def _locate(path: str | os.PathLike) -> _Source:
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        return _locate_folder(path)
    suffix = path.suffix.lower()
    if path.name.startswith("diffusion_pytorch_model") and (path.parent / "config.json").is_file():
        return _locate_folder(path.parent)
    if suffix in SAFETENSORS_SUFFIXES:
        shapes = read_checkpoint_shapes(path)  # a clear CheckpointError for truncated files
        if _safetensors_metadata(path).get("erasekit_format"):
            return _Source(ERASEKIT, path, (path,))
        keys = list(shapes)
        if keys and all(_KV.match(k) for k in keys):
            return _Source(UCE_2025, path, (path,))
        if _looks_like_unet(keys):
            return _Source(UNET_STATE_DICT, path, (path,))
        raise ConversionError(f"{path.name}: {_describe_unknown(keys)}.\n{ACCEPTED}")
    if suffix in PICKLE_SUFFIXES:
        return _Source(UNET_STATE_DICT, path, (path,))
    raise ConversionError(f"{path.name}: not a file type EraseKit converts ({suffix or 'no suffix'!r}).\n{ACCEPTED}")


def _locate_folder(folder: Path) -> _Source:
    unet = folder
    if not (unet / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        unet = folder / "unet"  # a whole diffusers pipeline: its UNet
    config_path = unet / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder}: a folder without config.json, so not a diffusers UNet folder.\n{ACCEPTED}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{config_path}: not a readable JSON config ({exc})") from exc
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind not in (None, "UNet2DConditionModel"):
        raise ConversionError(f"{unet}: a diffusers {kind} folder, not a UNet2DConditionModel.\n{ACCEPTED}")
    for name in _UNET_WEIGHT_FILES:
        candidate = unet / name
        if candidate.is_file():
            return _Source(DIFFUSERS_UNET, unet, _shards(candidate) if name.endswith(".json") else (candidate,))
    variants = (sorted(unet.glob("diffusion_pytorch_model.*.safetensors"))
                + sorted(unet.glob("diffusion_pytorch_model.*.bin")))
    if variants:  # e.g. diffusion_pytorch_model.fp16.safetensors
        return _Source(DIFFUSERS_UNET, unet, (variants[0],))
    raise ConversionError(f"{unet}: config.json but no diffusion_pytorch_model.safetensors or .bin beside it: "
                          "the download may be incomplete")


def _shards(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"{index}: not a readable shard index ({exc})") from exc
    files = tuple(index.parent / name for name in dict.fromkeys(weight_map.values()))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"{index.parent}: shard {missing[0]} listed in {index.name} is missing")
    return files


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _looks_like_unet(keys: Sequence[str]) -> bool:
    return "conv_in.weight" in keys and any(_KV.match(k) for k in keys)


def _describe_unknown(keys: Sequence[str]) -> str:
    if not keys:
        return "it holds no tensors"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return ("a single-file (LDM) model checkpoint, not an official erasure release; give it as the base model "
                "instead")
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "a LoRA-style file (kohya names, as SPM releases), which this converter does not read"
    return f"its {len(keys)} tensors (e.g. {keys[0]!r}) are not UCE/RECE/TRCE UNet weights in diffusers names"


def _read(source: _Source) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for file in source.files:
        tensors.update(read_checkpoint(file))  # weights_only for pickles; clear errors for truncated files
    keys = list(tensors)
    if source.format == UCE_2025:
        return tensors
    if not any(_KV.match(k) for k in keys):
        where = source.path.name
        raise ConversionError(f"{where}: {_describe_unknown(keys)}.\n{ACCEPTED}")
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# Report


@dataclass
class LayerReport:
    name: str  # erasure layer name (``unet.`` + diffusers parameter name)
    shape: tuple[int, ...]
    stored: str  # "factors", "shared factors" or "dense"
    rank: int | None  # of the factors; None for dense
    error: float  # ‖ΔW − stored‖ / ‖ΔW‖, ΔW the exact difference against the base
    bound: float  # the relative error the rank was allowed (tol, or the weights' rounding where larger)


@dataclass
class ConversionReport:
    source: str
    source_format: str
    method: str
    family: str
    tol: float
    layers: list[LayerReport] = field(default_factory=list)
    unchanged: int = 0  # tensors equal to the base (within rounding), dropped
    not_compared: int = 0  # file tensors the base given lacks, outside the layers the method edits
    source_bytes: int = 0  # the file(s) on disk
    dense_bytes: int = 0  # the changed layers as dense float32 deltas
    erasure_bytes: int = 0  # what the erasure stores (float32; a shared `down` once)
    warnings: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((layer.error for layer in self.layers), default=0.0)

    def text(self, per_layer: bool = False) -> str:
        factored = [layer for layer in self.layers if layer.rank is not None]
        dense = len(self.layers) - len(factored)
        lines = [
            f"{self.source}: {FORMATS.get(self.source_format, self.source_format)}",
            f"method {self.method}, family {self.family}: {len(self.layers)} layers differ from the base "
            f"({self.unchanged} unchanged, dropped"
            + (f"; {self.not_compared} not in the base given, not compared" if self.not_compared else "") + ")",
        ]
        if factored:
            ranks = sorted({layer.rank for layer in factored})
            shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
            shared = sum(layer.stored == "shared factors" for layer in factored)
            lines.append(f"  {len(factored)} as factors ({shown}"
                         f"{f'; {shared} sharing a down with other layers' if shared else ''}), {dense} dense")
        else:
            lines.append(f"  {dense} dense")
        line = f"  max reconstruction error {self.max_error:.2e} (tolerance {self.tol:.0e}"
        rounded = [layer for layer in self.layers if layer.bound > self.tol * 1.001]
        if rounded:
            line += (f"; {len(rounded)} layers allowed up to {max(r.bound for r in rounded):.1e}, the float16/bfloat16 "
                     "rounding of the weights")
        lines.append(line + ")")
        lines.append(f"size: source {_mb(self.source_bytes)}, dense deltas {_mb(self.dense_bytes)}, "
                     f"erasure {_mb(self.erasure_bytes)}")
        if per_layer:
            for layer in self.layers:
                rank = f"rank {layer.rank}" if layer.rank is not None else "dense"
                lines.append(f"  {layer.name} {list(layer.shape)}: {layer.stored}, {rank}, error {layer.error:.2e}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def convert(
    path: str | os.PathLike,
    base: Mapping[str, Tensor],
    *,
    tol: float = DEFAULT_TOL,
    method: str | None = None,
    concepts: Sequence[str] | None = None,
    strict: bool = True,
) -> tuple[Erasure, ConversionReport]:
    """An official UCE/RECE/TRCE release as an Erasure against `base`, and a report of the conversion.

    `base`: the model the file was made from, as diffusers UNet parameter names (optionally ``unet.``-prefixed) →
    tensors: the whole UNet state dict, or at least every tensor the method edits (attn2.to_k/to_v; for TRCE also
    attn1.* and attn2.to_q). `tol`: the largest relative Frobenius error of a factorised delta. `method`: recorded
    instead of the format's default (UCE 2023 and RECE files look alike). With `strict`, a full-UNet file whose
    other layers differ from the base is refused (the base is another model); without it those layers are kept
    dense and the report warns.
    """
    if not 0 < tol < 1:
        raise ValueError(f"tol is a relative error in (0, 1), got {tol}")
    source = _locate(path)
    if source.format == ERASEKIT:
        raise ConversionError(f"{source.path.name} is already an EraseKit erasure: load it with Erasure.load "
                              "(the Load Erasure node), no conversion needed")
    tensors = _read(source)
    base = _normalise_base(base)
    editable = _KV.match if source.format != DIFFUSERS_UNET else (lambda k: _KV.match(k) or _TRCE_STAGE2.match(k))
    order = sorted(tensors, key=_natural_key)
    family = _check_fits(source, tensors, base, order, editable)
    _check_values(source, tensors, base, editable)

    name = source.path.name
    # Tensors outside the method's layers first (cheap when equal), so that a wrong base is refused before the work.
    unexpected, unchanged, not_compared = [], 0, 0
    for key in order:
        if editable(key):
            continue
        if key not in base:
            not_compared += 1  # _check_fits let only non-editable keys through
        elif _unchanged(tensors[key], _cpu(base[key])):
            unchanged += 1
        else:
            unexpected.append(key)
    warnings = []
    if unexpected:
        first = unexpected[0]
        rel = _relative(tensors[first], _cpu(base[first]))
        what = "attn2.to_k/to_v" if source.format != DIFFUSERS_UNET else "attn2.to_k/to_v/to_q and attn1"
        message = (f"{len(unexpected)} tensors outside the {what} layers that {DEFAULT_METHODS[source.format]} "
                   f"edits differ from the base (first {first}, relative difference {rel:.1e}): the base is not the "
                   f"model {name} was made from (the official releases are made from SD1.4)")
        if strict:
            raise ConversionError(message + "; give that model as the base, or pass strict=False to keep every "
                                  "difference as a dense delta")
        warnings.append(message + "; kept as dense deltas")

    layers: dict[str, LayerDelta] = {}
    reports: list[LayerReport] = []
    keep = set(unexpected)
    widths: dict[int, _Width] = {}  # per context width: the `down` K/V layers try first
    for key in order:
        if key in base and (editable(key) or key in keep):
            compressed = _compress(key, tensors[key], _cpu(base[key]), tol, widths)
            if compressed is None:
                unchanged += 1
            else:
                layers["unet." + key], report = compressed
                reports.append(report)
    if not layers:
        raise ConversionError(
            f"{name}: no tensor differs from the base: the file equals the base model. Either the base given is the "
            "erased model itself rather than the original it was made from, or the file is not an erasure"
        )
    _mark_shared(layers, reports)
    dense_kv = [r for r in reports if _KV.match(r.name[len("unet."):]) and r.stored == "dense"]
    kv = [r for r in reports if _KV.match(r.name[len("unet."):])]
    if dense_kv and len(dense_kv) * 2 > len(kv):
        warnings.append(f"{len(dense_kv)} of {len(kv)} attn2.to_k/to_v deltas are not low rank (kept dense); a "
                        "closed-form erasure changes them by a low-rank edit, so the base is probably not the model "
                        "the file was made from")
    over = [r for r in reports if r.error > r.bound * 1.01 and r.error > 1e-6]
    if over:
        warnings.append(f"{over[0].name}: reconstruction error {over[0].error:.1e} is above the tolerance "
                        "(float32 factors cannot be more exact than about 1e-7)")

    kept = {key: base[key] for key in (r.name[len("unet."):] for r in reports)}
    params = {"source_format": source.format, "source_file": name, "svd_tol": tol}
    if source.format == DIFFUSERS_UNET:
        params["trce_stage2"] = any(_TRCE_STAGE2.match(k) for k in kept)
    erasure = Erasure(
        layers=layers,
        method=method or DEFAULT_METHODS[source.format],
        family=family,
        concepts=list(concepts or []),
        params=params,
        base_fingerprint=fingerprint(kept),
    )
    report = ConversionReport(
        source=name,
        source_format=source.format,
        method=erasure.method,
        family=family,
        tol=tol,
        layers=reports,
        unchanged=unchanged,
        not_compared=not_compared,
        source_bytes=sum(f.stat().st_size for f in source.files),
        dense_bytes=sum(base[k].numel() for k in kept) * 4,
        erasure_bytes=_stored_bytes(layers),
        warnings=warnings,
    )
    return erasure, report


def _normalise_base(base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not base:
        raise ValueError("the base weights are empty: pass the base UNet's state dict (diffusers names)")
    return {(k[len("unet."):] if k.startswith("unet.") else k): v for k, v in base.items()}


def _natural_key(name: str) -> list:
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return [(0, int(p), "") if p.isdigit() else (1, order.get(p, 3), p) for p in name.split(".")]


def _widths(shapes: Mapping[str, Sequence[int]]) -> set[int]:
    return {int(shape[1]) for key, shape in shapes.items() if _KV.match(key) and len(shape) == 2}


def _check_fits(source: _Source, tensors: Mapping[str, Tensor], base: Mapping[str, Tensor], order: list[str],
                editable: Callable[[str], object]) -> str:
    """The file's family; raise if the base lacks a tensor the method edits, or a shape differs."""
    name = source.path.name
    file_widths = _widths({k: t.shape for k, t in tensors.items()})
    if len(file_widths) != 1:
        raise ConversionError(f"{name}: cross-attention layers of context widths {sorted(file_widths)}: "
                              "not an SD-style UNet")
    try:
        file_family = family_from_context_dim(file_widths.pop())
    except FamilyError as exc:
        raise ConversionError(f"{name}: {exc}") from None
    base_widths = _widths({k: t.shape for k, t in base.items()})
    base_family = None
    if len(base_widths) == 1:
        try:
            base_family = family_from_context_dim(next(iter(base_widths)))
        except FamilyError:
            pass
    if base_family is not None and base_family != file_family:
        hint = (f": {name} is for {file_family.label} (context width {file_family.context_dim}) and the base is "
                f"{base_family.label} ({base_family.context_dim}); give the {file_family.label} model it was made from")
    else:
        hint = (f": {name} is for another model family or UNet layout than the base; give the "
                f"{file_family.label} model it was made from")
    for key in order:
        if key not in base:
            if not editable(key):
                continue
            if base_family == file_family and not _KV.match(key) and any(_KV.match(k) for k in base):
                raise ConversionError(f"the base weights given lack {key}, which {name} may change: pass the whole "
                                      "base UNet state dict")
            raise ConversionError(f"the base has no {key}, which {name} holds{hint}")
        if tuple(tensors[key].shape) != tuple(base[key].shape):
            raise ConversionError(f"{key} is {list(tensors[key].shape)} in {name} but {list(base[key].shape)} in the "
                                  f"base{hint}")
    return file_family.name


def _check_values(source: _Source, tensors: Mapping[str, Tensor], base: Mapping[str, Tensor],
                  editable: Callable[[str], object]) -> None:
    """Raise naming the first tensor that is not floating point or holds NaN/Inf: in the file, any tensor (a
    non-finite difference would otherwise count as "not low rank" or be dropped); in the base, the layers compared."""
    for where, weights, wanted in ((source.path.name, tensors, lambda key: True),
                                   ("the base", base, lambda key: editable(key) and key in tensors)):
        for key, tensor in weights.items():
            if not wanted(key) or tensor.is_meta:
                continue
            if not tensor.is_floating_point():
                raise ConversionError(file=where, key=key, expected="a floating-point tensor",
                                      found=str(tensor.dtype).replace("torch.", ""),
                                      fix="the file is damaged or not a model's weights")
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ConversionError(file=where, key=key, expected="finite values",
                                      found=f"{bad} NaN or infinite value(s)",
                                      fix="the file is damaged or came from a diverged run: download it again")


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Half a unit in the last place (relative), for the half-precision types whose rounding shows in a difference."""
    return torch.finfo(dtype).eps / 2 if dtype in (torch.float16, torch.bfloat16) else 0.0


def _norm(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double()))


def _relative(new: Tensor, old: Tensor) -> float:
    return _norm(new.double().sub_(old)) / max(_fast_norm(old), _fast_norm(new), 1e-30)


def _unchanged(new: Tensor, old: Tensor) -> bool:
    """Equal, or different by rounding only: below 1e-7 of the norm, or within one unit in the last place of the
    lower of the two precisions (float16/bfloat16) in every element."""
    if new.dtype == old.dtype and torch.equal(new, old):
        return True
    if not (new.is_floating_point() and old.is_floating_point()):
        return False
    if _within_rounding(new, old):
        return True
    size = _norm(new.double().sub_(old))
    return size <= UNCHANGED_RELATIVE * max(_fast_norm(old), _fast_norm(new))


def _within_rounding(new: Tensor, old: Tensor) -> bool:
    """Every element within one unit in the last place of float16/bfloat16, where either tensor is one."""
    low = [d for d in (new.dtype, old.dtype) if _unit_roundoff(d)]
    if not low:
        return False
    # One unit in the last place of float16/bfloat16 is far above float32's rounding of the difference.
    dtype = max(low, key=_unit_roundoff)
    if torch.equal(new.to(dtype), old.to(dtype)):  # the common case, and the cheap test: equal once rounded
        return True
    info = torch.finfo(dtype)
    a, b = new.float(), old.float()
    return bool(((a - b).abs() <= info.eps * torch.maximum(a.abs(), b.abs()) + info.tiny * info.eps).all())


def _fast_norm(x: Tensor) -> float:
    """A Frobenius norm for thresholds: float32 accumulation, no float64 copy."""
    return float(torch.linalg.vector_norm(x if x.dtype == torch.float32 else x.float()))


def _compress(key: str, new: Tensor, old: Tensor, tol: float,
              widths: dict[int, "_Width"]) -> tuple[LayerDelta, LayerReport] | None:
    """The delta of one tensor, as factors (attn2 K/V weights, where smaller) or dense; None if unchanged.

    K/V layers first try the `down` of an earlier layer of their context width (`widths`, updated here): a
    closed-form edit's deltas share their row space (the erased keys'), so one `down` serves them all. After two
    K/V layers of a width came out dense and none factorised, the rest are not factorised either (a wrong base
    makes every K/V delta full rank, and searching each one for a rank would take minutes on SDXL).
    """
    if not new.is_floating_point():
        if torch.equal(new, old):
            return None
        raise ConversionError(f"{key}: a {new.dtype} tensor that differs from the base cannot be a weight delta")
    delta = new.double().sub_(old)
    size = _norm(delta)
    old_norm, new_norm = _fast_norm(old), _fast_norm(new)
    if size <= UNCHANGED_RELATIVE * max(old_norm, new_norm) or _within_rounding(new, old):
        return None
    floor = _unit_roundoff(old.dtype) * old_norm + _unit_roundoff(new.dtype) * new_norm
    allowed = max(tol * size, floor)
    name, shape = "unet." + key, tuple(delta.shape)
    if _KV.match(key):
        d, n = shape
        width = widths.setdefault(n, _Width())
        fit = None
        if width.down is not None and width.down.shape[0] * (d + n) < d * n:
            fit = _project(delta, size, width.down)
            if fit[1] > allowed:
                fit = None
        if fit is None and (width.down is not None or width.dense < 2):
            down = _factorise(delta, size, allowed)
            if down is not None:
                down = down.float().contiguous()
                fit = _project(delta, size, down)
                if width.down is None or down.shape[0] >= width.down.shape[0]:
                    width.down = down
        if fit is not None:
            layer = compact(fit[0], fit[2])
            if layer.dense is None:
                return layer, LayerReport(name, shape, "factors", layer.rank, fit[1] / size, allowed / size)
        width.dense += 1
    dense = delta.float()
    error = _norm(delta - dense.double()) / size
    return LayerDelta(dense=dense), LayerReport(name, shape, "dense", None, error, allowed / size)


@dataclass
class _Width:
    down: Tensor | None = None
    dense: int = 0  # K/V layers of this width stored dense


def _cpu(tensor: Tensor) -> Tensor:
    return tensor.detach() if tensor.device.type == "cpu" else tensor.detach().cpu()


def _project(delta: Tensor, size: float, down: Tensor) -> tuple[Tensor, float, Tensor]:
    """up = Δ·downᵀ (float32) and the exact Frobenius error ‖Δ − up·down‖ of the stored (float32) factors.

    With U = Δ·downᵀ and G = down·downᵀ: ‖Δ − up·down‖² = ‖Δ‖² − 2⟨up, U⟩ + ⟨up·G, up⟩, which needs no d×n
    product beyond U (down's rows are orthonormal up to float32 rounding; G accounts for the rest).
    """
    basis = down.double()
    exact = delta @ basis.T
    up = exact.float().contiguous()
    stored = up.double()
    gram = basis @ basis.T
    squared = size**2 - 2 * float((stored * exact).sum()) + float(((stored @ gram) * stored).sum())
    return up, math.sqrt(max(squared, 0.0)), down


def _factorise(delta: Tensor, size: float, allowed: float) -> Tensor | None:
    """down (r×n, orthonormal rows, float64): the leading right singular vectors of Δ, of the smallest rank r with
    ‖Δ − Δ·downᵀ·down‖ ≤ `allowed`; None where factors of that rank would not be smaller than Δ. `size`: ‖Δ‖.

    A randomised range finder with a growing sketch (k = 32, 64, ...): the residual of the sketch's range is
    measured, and the SVD runs on a k×k matrix (P = QᵀΔ, Pᵀ = Q₂R, SVD of Rᵀ) instead of d×n.
    """
    d, n = delta.shape
    breakeven = (d * n) // (d + n)  # rank at which factors stop being smaller (erasure.compact's rule)
    generator = torch.Generator().manual_seed(0)
    k = min(32, d, n)
    while True:
        sketch = delta @ torch.randn(n, k, generator=generator, dtype=torch.float64)
        q = torch.linalg.qr(sketch).Q  # d×k
        projected = q.T @ delta  # k×n
        # ‖Δ − QQᵀΔ‖² = ‖Δ‖² − ‖QᵀΔ‖² (Q orthonormal); the caller measures the final error of the stored factors.
        residual = math.sqrt(max(size**2 - float((projected**2).sum()), 0.0))
        if residual <= allowed:
            q2, r = torch.linalg.qr(projected.T)  # n×k, k×k
            _, s, wh = torch.linalg.svd(r.T)
            # error² of rank j = residual² + Σ_{i≥j} s_i²; tails[j] = Σ_{i≥j} s_i².
            tails = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0]).tolist() + [0.0]
            rank = max(1, next(j for j in range(len(tails)) if math.sqrt(residual**2 + tails[j]) <= allowed))
            if rank * (d + n) >= d * n:
                return None
            return (q2 @ wh.T[:, :rank]).T
        if k >= min(d, n) or k > breakeven:
            return None
        k = min(2 * k, d, n)


def _mark_shared(layers: Mapping[str, LayerDelta], reports: list[LayerReport]) -> None:
    users: dict[int, int] = {}
    for delta in layers.values():
        if delta.down is not None:
            users[id(delta.down)] = users.get(id(delta.down), 0) + 1
    for report in reports:
        delta = layers[report.name]
        if delta.down is not None and users[id(delta.down)] > 1:
            report.stored = "shared factors"


def _stored_bytes(layers: Mapping[str, LayerDelta]) -> int:
    downs: dict[int, int] = {}
    total = 0
    for delta in layers.values():
        if delta.dense is not None:
            total += delta.dense.numel()
        else:
            total += delta.up.numel()
            downs[id(delta.down)] = delta.down.numel()
    return (total + sum(downs.values())) * 4
