"""SPM membranes (Lyu et al., CVPR 2024): the file format and how membranes combine.

A membrane is a rank-r LoRA on every Linear/Conv2d inside the UNet's Transformer2D blocks (192 modules on SD1.x,
722 on SDXL): ``y = W x + m · (α/r) · U (D x)``, where the strength `m` comes from Facilitated Transport (FT), a
per-prompt similarity to the concepts the membrane erases (transport.py). This module is torch only, so the
diffusers adapter (hooks.py) and the ComfyUI one share it.

File format (the official one, which kohya-style LoRA loaders also read): per target module
``lora_unet_<diffusers module path, . → _>.lora_down.weight`` (r×in, or r×in×k×k for a conv), ``.lora_up.weight``
(out×r, or out×r×1×1) and ``.alpha`` (scalar); metadata (strings) ``prompts`` (the erased concepts, comma-joined),
``rank`` and ``alpha``.

Combining several membranes with strengths m_i (see methods.md §1.4):
- "additive" (default, what a LoRA loader does): ΔW = Σ_i m_i (α_i/r_i) U_i D_i, α_i the module's ``.alpha``.
- "official": what the reference ``infer_spm.py`` computes. It multiplies every tensor of membrane i by m_i, sums
  them across membranes and loads the sums into a network whose scale α/r was fixed when it was built from the
  first file's metadata (the loaded ``.alpha`` buffers are never read again). So U = Σ m_i U_i, D = Σ m_i D_i and
  ΔW = (α_1/r_1) U D, with cross terms m_i m_j U_i D_j, and for one membrane m² U D. All ranks must be equal.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..erasure import ErasureFileError, FamilyMismatchError
from ..errors import InputError, check_number, check_tensor, retyped
from ..families import FAMILIES, FamilyError, UNetLayout, kv_family
from ..files import read_safetensors, write_safetensors
from . import kernel as gated_lowrank

KOHYA_PREFIX = "lora_unet_"
Combine = Literal["additive", "official"]

# Every module SPM edits: the Linear/Conv2d layers of a Transformer2DModel, by diffusers module path. Knowing the
# vocabulary is what makes kohya names (all dots turned into underscores) invertible.
_TARGET = re.compile(
    r"(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\."
    r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
)
_UNDERSCORED = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k",
                "to_v", "to_out")
_TENSOR_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def is_target(module_path: str) -> bool:
    """Whether SPM edits the module at this diffusers path (a Linear/Conv2d of a Transformer2DModel)."""
    return _TARGET.fullmatch(module_path) is not None


class MembraneFileError(ErasureFileError):
    """An SPM file is missing, corrupt, or not in the official layout."""


class MissingConceptsError(MembraneFileError):
    """An SPM file has no ``prompts`` metadata and no concepts were given: Facilitated Transport has nothing to
    compare prompts with."""


# --- names ------------------------------------------------------------------------------------------------------


def kohya_name(module_path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


def module_path(kohya: str) -> str:
    """The diffusers module path of an SPM kohya name; ValueError if it names no Transformer2D Linear/Conv2d."""
    body = kohya.removeprefix(KOHYA_PREFIX).replace("_", ".")
    for word in _UNDERSCORED:
        body = body.replace(word.replace("_", "."), word)
    if not kohya.startswith(KOHYA_PREFIX) or not is_target(body):
        raise ValueError(f"{kohya!r} is not the kohya name of a UNet transformer layer (lora_unet_<diffusers path>)")
    return body


def ldm_key(module_path: str, layout: UNetLayout) -> str:
    """The weight's key in ComfyUI / single-file checkpoints: ``diffusion_model.input_blocks.1.1.proj_in.weight``."""
    return f"diffusion_model.{layout.to_ldm(module_path)}.weight"


def module_path_from_ldm_key(key: str, layout: UNetLayout) -> str:
    """Inverse of `ldm_key`; any prefix before ``diffusion_model.`` (``model.``) is allowed."""
    head, sep, rest = key.partition("diffusion_model.")
    if not sep or not rest.endswith(".weight"):
        raise ValueError(f"{key!r} is not an LDM UNet weight key (…diffusion_model.<block>.….weight)")
    return layout.to_diffusers(rest.removesuffix(".weight"))


# --- membranes and files ----------------------------------------------------------------------------------------


@dataclass
class MembraneLayer:
    """One target module's factors, in the shapes the file stores them."""

    down: Tensor  # [r, in] for a Linear, [r, in, k, k] for a Conv2d
    up: Tensor  # [out, r] for a Linear, [out, r, 1, 1] for a Conv2d
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this layer adds to."""
        return (self.up.shape[0], *self.down.shape[1:])

    def up_matrix(self) -> Tensor:
        return self.up.reshape(self.up.shape[0], self.rank)


@dataclass
class Membrane:
    """An SPM membrane: factors per target module and the concepts it erases. Its family follows from the context
    width its attn2.to_k/to_v layers read."""

    layers: dict[str, MembraneLayer]  # by diffusers module path
    concepts: list[str]  # what FT compares prompts to
    alpha: float  # file-level α: the official network is built with scale α / rank
    family: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a membrane needs at least one layer")
        if not self.concepts or any(not c.strip() for c in self.concepts):
            raise ValueError(f"a membrane needs non-empty concept names, got {self.concepts!r}")
        ranks = {layer.rank for layer in self.layers.values()}
        if len(ranks) > 1:
            raise ValueError(f"layers of mixed ranks {sorted(ranks)}: an SPM membrane has one rank")
        for path, layer in self.layers.items():
            if not is_target(path):
                raise ValueError(f"{path!r} is not a UNet transformer layer SPM edits")
            if layer.up.shape[1] != layer.rank or layer.up.shape[2:] not in ((), (1, 1)) or \
                    layer.down.dim() != layer.up.dim() or layer.down.dim() not in (2, 4):
                raise ValueError(f"{path}: up {tuple(layer.up.shape)} and down {tuple(layer.down.shape)} are not the "
                                 "factors of a LoRA (out×r and r×in, or out×r×1×1 and r×in×k×k)")
        kv = {p: layer.down for p, layer in self.layers.items() if p.endswith(("attn2.to_k", "attn2.to_v"))}
        if not kv:
            raise ValueError("no attn2.to_k/to_v layer: the model family (context width) cannot be told")
        self.family = kv_family(kv).name

    @property
    def rank(self) -> int:
        return next(iter(self.layers.values())).rank

    def check_targets(self, weight_shapes: Mapping[str, Sequence[int]]) -> None:
        """Raise FamilyMismatchError unless every layer has a module of the right weight shape in the model."""
        label = FAMILIES[self.family].label
        for path, layer in self.layers.items():
            if path not in weight_shapes:
                raise FamilyMismatchError(f"the model has no layer {path} that this membrane edits; the membrane "
                                          f"is for {label}: check the model is of that family")
            if tuple(weight_shapes[path]) != layer.weight_shape:
                raise FamilyMismatchError(
                    f"layer {path}: the membrane fits a {tuple(layer.weight_shape)} weight, the model's is "
                    f"{tuple(weight_shapes[path])}; the membrane is for {label}, a model of another shape")


def load_membrane(path: str | Path, concepts: Sequence[str] | None = None) -> Membrane:
    """Read an official SPM file; `concepts` replaces (or, when absent, supplies) its ``prompts`` metadata. Every
    problem (unreadable, changed since EraseKit wrote it, unknown layer, rank 0 or mismatched, non-float or
    non-finite values, α not > 0) is a MembraneFileError naming the file and the key."""
    try:
        meta, tensors = read_safetensors(path, "SPM file")
        return _membrane(path, meta, tensors, concepts)
    except (ValueError, FamilyError) as err:  # InputError is a ValueError; Membrane's own checks raise ValueError
        if isinstance(err, InputError):
            raise retyped(err, MembraneFileError) from None
        raise MembraneFileError(f"{path}: {err}") from None


def _membrane(path, meta: Mapping[str, str], tensors: Mapping[str, Tensor], concepts) -> Membrane:
    names = sorted({k[: -len(s)] for k in tensors for s in _TENSOR_SUFFIXES if k.endswith(s)})
    if not names:
        raise MembraneFileError(f"{path}: no SPM tensors (lora_unet_<layer>.lora_down.weight / .lora_up.weight) in "
                                f"its {len(tensors)} tensors: not an SPM membrane")
    stray = sorted(set(tensors) - {n + s for n in names for s in _TENSOR_SUFFIXES})
    if stray:
        raise MembraneFileError(f"{path}: tensor {stray[0]!r} is not part of the SPM layout "
                                "(lora_unet_<layer>.lora_down.weight / .lora_up.weight / .alpha)")
    if concepts is None:
        if not meta.get("prompts"):
            raise MissingConceptsError(f"{path}: no 'prompts' metadata naming the erased concepts, which "
                                       "Facilitated Transport needs; pass them explicitly: "
                                       "load_membrane(path, concepts=[...])")
        concepts = meta["prompts"].split(",")  # as infer_spm.py splits them: no stripping
    layers = {}
    for name in names:
        try:
            target = module_path(name)
        except ValueError as err:
            raise MembraneFileError(file=path, key=name, expected="the kohya name of a UNet transformer layer SPM "
                                    "edits (lora_unet_<diffusers path>)", found=str(err)[:160]) from None
        layers[target] = _layer(path, name, tensors)
    ranks = {layer.rank for layer in layers.values()}
    if "rank" in meta:
        rank = _meta_number(path, meta, "rank", integer=True, low=1)
        if ranks != {rank}:
            raise MembraneFileError(f"{path}: its metadata says rank {meta['rank']} but its layers have rank(s) "
                                    f"{sorted(ranks)}")
    alpha = _meta_number(path, meta, "alpha", low=0) if "alpha" in meta else next(iter(layers.values())).alpha
    return Membrane(layers, list(concepts), alpha)


# Largest |value| a membrane tensor may hold: trained LoRA factors are O(1); beyond this the file is corrupt.
MAX_ABS = 1e4


def _layer(path, name: str, tensors: Mapping[str, Tensor]) -> MembraneLayer:
    """One layer's factors, checked: float, finite, down r×in (or r×in×k×k), up out×r (or out×r×1×1), the same
    r ≥ 1 in both, α a finite scalar > 0 (α/r scales the delta: 0 would silently erase nothing)."""
    missing = [suffix for suffix in _TENSOR_SUFFIXES[:2] if name + suffix not in tensors]
    if missing:
        raise MembraneFileError(f"{path}: layer {name} has no {missing[0]} tensor; the file is incomplete")
    down_key, up_key = f"{name}.lora_down.weight", f"{name}.lora_up.weight"
    down = check_tensor(path, down_key, tensors[down_key], max_abs=MAX_ABS)
    up = check_tensor(path, up_key, tensors[up_key], max_abs=MAX_ABS)
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise MembraneFileError(file=path, key=up_key if down.ndim in (2, 4) else down_key,
                                expected="LoRA factors: down r×in and up out×r, or r×in×k×k and out×r×1×1",
                                found=f"down {list(down.shape)}, up {list(up.shape)}")
    if up.shape[1] != down.shape[0] or up.shape[2:] not in ((), (1, 1)):
        raise MembraneFileError(file=path, key=up_key, expected=f"shape out×{down.shape[0]}"
                                f"{'×1×1' if up.ndim == 4 else ''} (rank {down.shape[0]}, the rows of {down_key})",
                                found=f"shape {list(up.shape)}", fix="the file is corrupt: write it again")
    alpha_key = f"{name}.alpha"
    if alpha_key not in tensors:
        return MembraneLayer(down, up, float(down.shape[0]))
    alpha = check_tensor(path, alpha_key, tensors[alpha_key])
    if alpha.numel() != 1 or float(alpha) <= 0:
        raise MembraneFileError(file=path, key=alpha_key, expected="one number > 0",
                                found=f"shape {list(alpha.shape)}" if alpha.numel() != 1 else f"{float(alpha):g}",
                                fix="the file is corrupt: write it again")
    return MembraneLayer(down, up, float(alpha))


def _meta_number(path, meta: Mapping[str, str], key: str, *, low: float, integer: bool = False) -> float:
    try:
        return check_number(key, meta[key], low=low, low_inclusive=integer, integer=integer)
    except InputError as err:
        raise MembraneFileError(file=path, key=key, expected=err.expected, found=err.found,
                                fix="the file's metadata is corrupt: write it again") from None


def save_membrane(membrane: Membrane, path: str | Path, *, inputs=()) -> Path:
    """Write `membrane` in exactly the official layout (atomically, with EraseKit's content hash in its metadata);
    LoRA loaders (diffusers, A1111, ComfyUI) accept the file."""
    if any("," in c for c in membrane.concepts):
        raise ValueError(f"concepts {membrane.concepts!r}: the 'prompts' metadata is comma-joined, so a concept "
                         "cannot contain a comma")
    metadata = {"prompts": ",".join(membrane.concepts), "rank": str(membrane.rank), "alpha": str(membrane.alpha)}
    tensors = kohya_tensors(membrane)
    # What load refuses is never written: a diverged training run must fail here, not when the file is used.
    try:
        _membrane(path, metadata, tensors, None)
    except (ValueError, FamilyError) as err:
        raise (retyped(err, MembraneFileError) if isinstance(err, InputError) else
               MembraneFileError(f"{path}: {err}")) from None
    return write_safetensors(path, tensors, metadata, inputs=inputs)


def kohya_tensors(membrane: Membrane) -> dict[str, Tensor]:
    """The membrane's tensors under their file (kohya LoRA) names, as LoRA loaders read them."""
    tensors = {}
    for target, layer in membrane.layers.items():
        name = kohya_name(target)
        tensors[f"{name}.lora_down.weight"] = layer.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=layer.down.dtype)
    return tensors


# --- combination ------------------------------------------------------------------------------------------------


@dataclass
class MembraneStack:
    """All membranes' factors for one module, stacked so that one pair of matmuls applies them with per-sample
    strengths. Columns of `down`/`up` are the ranks of the membranes in turn; `owner` maps each to its membrane."""

    down: Tensor  # [R, in] or [R, in, k, k]
    up: Tensor  # [out, R]
    owner: Tensor  # [R] membrane index
    scale: Tensor  # [R]: α_i/r_i ("additive") or the official network's build-time α/r ("official")
    combine: Combine
    count: int  # membranes M (some may not edit this module)

    def to(self, device, dtype: torch.dtype) -> "MembraneStack":
        """On `device` in `dtype`; itself when it already is, as Tensor.to (the hooks call this on every forward)."""
        if (self.down.device, self.down.dtype) == (torch.device(device), dtype):
            return self
        return MembraneStack(self.down.to(device, dtype), self.up.to(device, dtype), self.owner.to(device),
                             self.scale.to(device, dtype), self.combine, self.count)

    def add_to(self, output: Tensor, x: Tensor, strengths: Tensor, stride=1, padding=0, dilation=1) -> Tensor:
        """`output` + ΔW applied to the module input `x` [B, …], sample b at strengths[b] ([B, M]; [1, M] for all
        samples). `output` is the base module's result for `x`; Conv2d stride/padding/dilation are the base module's
        (the down conv copies them, the up conv is 1×1). On CUDA, where nothing needs a gradient, "additive" runs
        as one fused kernel that adds into `output` in place (gated_lowrank.py); these torch operations are its
        reference."""
        if strengths.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"strengths for {strengths.shape[0]} samples but a batch of {x.shape[0]}")
        if self.combine == "additive":
            fused = gated_lowrank.add(output, x, self.down, self.up, strengths, self.owner, self.scale, stride,
                                      padding, dilation)
            if fused is not None:
                return fused
        conv = self.down.dim() == 4
        h = F.conv2d(x, self.down, None, stride, padding, dilation).movedim(1, -1) if conv else x @ self.down.T
        m = strengths.to(h.dtype).reshape(strengths.shape[0], *([1] * (h.dim() - 2)), strengths.shape[1])
        if self.combine == "additive":
            h = h * m[..., self.owner] * self.scale
        else:  # (Σ_i m_i U_i)(Σ_j m_j D_j) x = Σ_i m_i U_i y with y = Σ_j m_j D_j x: the ranks line up
            ranks = h.shape[-1] // self.count
            y = (h.unflatten(-1, (self.count, ranks)) * m[..., None]).sum(-2)
            h = (m[..., None] * y[..., None, :]).flatten(-2) * self.scale
        if conv:
            return output + (h @ self.up.T).movedim(-1, 1)
        # One GEMM that adds into a copy of `output`: the full-size delta is never written and read back, which
        # was most of a membrane's cost (the rank-R products are small).
        return torch.addmm(output.reshape(-1, output.shape[-1]), h.reshape(-1, h.shape[-1]),
                           self.up.T).view(output.shape)

    def dense(self, strengths: Tensor) -> Tensor:
        """The merged ΔW (shape of the base weight) at fixed strengths [M]."""
        m = strengths.to(self.up.dtype)
        down = self.down.flatten(1)
        if self.combine == "additive":
            delta = (self.up * (m[self.owner] * self.scale)) @ down
        else:
            ranks = self.up.shape[1] // self.count
            up = (self.up.unflatten(1, (self.count, ranks)) * m[:, None]).sum(1)
            delta = self.scale[0] * up @ (down.unflatten(0, (self.count, ranks)) * m[:, None, None]).sum(0)
        return delta.reshape(self.up.shape[0], *self.down.shape[1:])


def stack_membranes(membranes: Sequence[Membrane], combine: Combine = "additive") -> dict[str, MembraneStack]:
    """Per module path, the stack of the membranes that edit it.

    "official" needs equal ranks and treats a module a membrane does not edit as zero factors, as summing the
    official state dicts does.
    """
    if combine not in ("additive", "official"):
        raise ValueError(f"unknown combine {combine!r}: additive or official")
    if not membranes:
        raise ValueError("no membranes to combine")
    families = {m.family for m in membranes}
    if len(families) > 1:
        raise FamilyMismatchError(f"membranes for several model families {sorted(families)} cannot be combined")
    ranks = {m.rank for m in membranes}
    if combine == "official" and len(ranks) > 1:
        raise ValueError(f"the official combination sums factors, so every membrane needs the same rank (got "
                         f"{sorted(ranks)}); use combine='additive'")
    # SPMLayer builds its scale from the first file's metadata, reading α = 0 as α = rank.
    build_scale = (membranes[0].alpha or membranes[0].rank) / membranes[0].rank
    stacks = {}
    for path in dict.fromkeys(p for m in membranes for p in m.layers):
        present = [(i, m.layers[path]) for i, m in enumerate(membranes) if path in m.layers]
        shapes = {layer.weight_shape for _, layer in present}
        if len(shapes) > 1:
            raise ValueError(f"{path}: the membranes fit weights of different shapes {sorted(shapes)}")
        if combine == "official":  # zero factors for the membranes that leave this module alone
            given, template = dict(present), present[0][1]
            zero = MembraneLayer(torch.zeros_like(template.down), torch.zeros_like(template.up), template.alpha)
            present = [(i, given.get(i, zero)) for i in range(len(membranes))]
        stacks[path] = MembraneStack(
            down=torch.cat([layer.down.float() for _, layer in present]),
            up=torch.cat([layer.up_matrix().float() for _, layer in present], dim=1),
            owner=torch.cat([torch.full((layer.rank,), i) for i, layer in present]),
            scale=torch.cat([torch.full((layer.rank,), build_scale if combine == "official" else
                                        layer.alpha / layer.rank) for _, layer in present]),
            combine=combine,
            count=len(membranes),
        )
    return stacks


def merged_deltas(membranes: Sequence[Membrane], strengths: Sequence[float],
                  combine: Combine = "additive") -> dict[str, Tensor]:
    """Dense ΔW per module path at fixed strengths (FT off), to add to the base weights for static use."""
    m = torch.as_tensor(strengths, dtype=torch.float32)
    if m.shape != (len(membranes),):
        raise ValueError(f"{len(membranes)} membranes but {m.numel()} strengths")
    return {path: stack.dense(m) for path, stack in stack_membranes(membranes, combine).items()}
