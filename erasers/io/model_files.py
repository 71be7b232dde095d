"""A Stable Diffusion model on disk, as a single-file checkpoint or a diffusers pipeline folder: what the `erasekit`
command reads erasures from and merges them into.

Single files hold the UNet under ``model.diffusion_model.`` in LDM names (SD1.x, SD2.x, SDXL; ``.safetensors`` or a
PyTorch ``.ckpt``). A diffusers folder holds one subfolder per model (``unet/``, ``text_encoder/``, ``tokenizer/``,
SDXL's ``text_encoder_2/`` and ``tokenizer_2/``), each with its weights in one of several forms: one file or
shards with an index, ``.safetensors`` or PyTorch ``.bin``, and optional variants such as ``.fp16``. Erasures name
UNet layers by diffusers parameter names (``unet.<name>``) whichever form the model has.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..erasure import Erasure, FamilyMismatchError
from ..families import Family, FamilyError, UNetLayout, describe_model, family_from_context_dim
from ..files import write_folder, write_stream
from .checkpoints import (
    SAFETENSORS_SUFFIXES,
    UNET_PREFIX,
    CheckpointError,
    check_finite,
    read_checkpoint,
    read_checkpoint_shapes,
    write_checkpoint,
)
from .components import (
    Select,
    WeightSet,
    is_diffusers_folder,
    read_file,
    read_weight_set,
    safetensors_metadata,
    weight_sets,
)
from .text_encoders import encoder_from_checkpoint, encoder_from_diffusers

_KV_SUFFIX = re.compile(r"\.attn2\.to_[kv]\.weight$")
_ATTENTION = re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.")
_TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")
# ---------------------------------------------------------------------------------------------------------------
# Models


def _family(shapes: Mapping[str, tuple[int, ...]], what: str) -> Family:
    report = describe_model(shapes)
    if report.family is None:
        problems = "; ".join(report.problems) or "unknown model"
        raise FamilyError(f"{what}: {problems}")
    return report.family


@dataclass
class MergeSummary:
    family: Family
    layers: int
    strength: float
    written: list[Path] = field(default_factory=list)
    copied: int = 0

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.written)


class ModelFiles:
    """A model on disk: its family, cross-attention K/V weights, text encoder, and merging an erasure into a copy."""

    kind = "model"

    def __init__(self, path: Path):
        self.path = path

    @property
    def family(self) -> Family:
        raise NotImplementedError

    def unet_weights(self, pattern: re.Pattern) -> dict[str, Tensor]:
        """UNet parameters whose key matches `pattern`, by diffusers parameter name, in their stored dtype."""
        raise NotImplementedError

    def kv_weights(self) -> dict[str, Tensor]:
        """Every attn2 to_k/to_v weight by diffusers parameter name, in its stored dtype; NaN/Inf is an error (an
        erasure computed from them would be NaN)."""
        return dict(check_finite(self.path, self.unet_weights(_KV_SUFFIX)))

    def attention_weights(self) -> dict[str, Tensor]:
        """Every attn1/attn2 parameter of the transformer blocks (what official TRCE releases change), finite."""
        return dict(check_finite(self.path, self.unet_weights(_ATTENTION)))

    def encoder(self, tokenizer_dir=None, device="cpu", cache_dir=None):
        raise NotImplementedError

    def merge(self, erasure: Erasure, out: str | os.PathLike, strength: float = 1.0) -> MergeSummary:
        raise NotImplementedError

    def _check_family(self, erasure: Erasure) -> None:
        """Refuse an erasure made for another family before looking for its layers (their names differ)."""
        if erasure.family != self.family.name:
            erasure.check_base(self.family.name, {})  # raises FamilyMismatchError naming both families

    def _check(self, erasure: Erasure, base: Mapping[str, Tensor]) -> None:
        """Family and base weights (`base`: every layer the erasure edits, by erasure layer name)."""
        check_finite(self.path, base)  # a NaN weight we merge into would stay NaN in the written model
        erasure.check_base(self.family.name, base)
        for name, delta in erasure.layers.items():
            if tuple(base[name].shape) != tuple(delta.shape):
                raise FamilyMismatchError(f"{name} is {tuple(base[name].shape)} in this model but the erasure's delta "
                                          f"is {tuple(delta.shape)}: the erasure was made for another architecture")


def merged_tensor(weight: Tensor, delta, strength: float) -> Tensor:
    """W + strength·ΔW computed in float32, cast back to W's dtype."""
    update = delta.materialize(torch.float32)
    if tuple(update.shape) != tuple(weight.shape):
        raise FamilyMismatchError(f"a delta of shape {tuple(update.shape)} cannot apply to a weight of shape "
                                  f"{tuple(weight.shape)}")
    return (weight.float() + strength * update).to(weight.dtype)


def _unet_layer(name: str) -> str:
    if not name.startswith("unet."):
        raise FamilyMismatchError(f"erasure layer {name!r} is not a UNet layer; only UNet erasures can be merged")
    return name[len("unet."):]


def _check_out_file(source: Path, out: Path) -> None:
    if out.exists() and (out.resolve() == source.resolve() or os.path.samefile(out, source)):
        raise CheckpointError(f"--out {out} is the input checkpoint: write the merged model to a new file")
    if out.is_dir():
        raise CheckpointError(f"--out {out} is a folder: name the merged .safetensors file")
    if out.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(f"--out {out.name}: merged single-file checkpoints are written as .safetensors")


class SingleFile(ModelFiles):
    kind = "single-file checkpoint"

    def __init__(self, path: Path):
        super().__init__(path)
        self._shapes = read_checkpoint_shapes(path)
        self._pickle: dict[str, Tensor] | None = None
        unet = {k: v for k, v in self._shapes.items() if k.startswith(UNET_PREFIX)}
        if not unet:
            raise FamilyError(f"{path.name} has no UNet (no {UNET_PREFIX}* keys): it is not a full SD checkpoint, "
                              "or it is a diffusers file; pass the diffusers pipeline folder instead")
        self._family = _family(unet, path.name)
        self.layout = UNetLayout.from_ldm_keys(unet)

    @property
    def family(self) -> Family:
        return self._family

    def _read(self, select: Select) -> dict[str, Tensor]:
        if self.path.suffix.lower() in SAFETENSORS_SUFFIXES:
            return read_file(self.path, select)
        if self._pickle is None:
            self._pickle = read_checkpoint(self.path)
        return {k: v for k, v in self._pickle.items() if select(k)}

    def ldm_key(self, layer: str) -> str:
        try:
            return UNET_PREFIX + self.layout.to_ldm(_unet_layer(layer))
        except KeyError:
            raise FamilyMismatchError(f"the model has no layer {layer!r} that this erasure edits") from None

    def unet_weights(self, pattern: re.Pattern) -> dict[str, Tensor]:
        tensors = self._read(lambda k: k.startswith(UNET_PREFIX) and bool(pattern.search(k)))
        renamed = {}
        for key, value in sorted(tensors.items()):
            try:
                renamed[self.layout.to_diffusers(key[len(UNET_PREFIX):])] = value
            except KeyError:
                raise CheckpointError(f"{self.path.name}: {key!r} is not a cross-attention block of the UNet its "
                                      "other layers describe; the checkpoint is damaged or an unknown "
                                      "architecture: download or copy it again") from None
        return renamed

    def encoder(self, tokenizer_dir=None, device="cpu", cache_dir=None):
        text = self._read(lambda k: k.startswith(_TEXT_PREFIXES))
        return encoder_from_checkpoint(text, self.family, tokenizer_dir=tokenizer_dir, cache_dir=cache_dir,
                                       device=device)

    def merge(self, erasure: Erasure, out: str | os.PathLike, strength: float = 1.0) -> MergeSummary:
        out = Path(out)
        _check_out_file(self.path, out)
        self._check_family(erasure)
        keys = {name: self.ldm_key(name) for name in erasure.layers}
        missing = [name for name, key in keys.items() if key not in self._shapes]
        if missing:
            raise FamilyMismatchError(f"the model has no layer {missing[0]!r} that this erasure edits")
        wanted = set(keys.values())
        base = self._read(lambda k: k in wanted)
        self._check(erasure, {name: base[key] for name, key in keys.items()})
        del base
        metadata = safetensors_metadata(self.path) if self.path.suffix.lower() in SAFETENSORS_SUFFIXES else None
        state = read_checkpoint(self.path) if self._pickle is None else self._pickle
        for name, key in keys.items():
            state[key] = merged_tensor(state[key], erasure.layers[name], strength)
        write_checkpoint(out, state, metadata, inputs=[self.path])
        self._pickle = None
        return MergeSummary(self.family, len(keys), strength, [out])


class DiffusersFolder(ModelFiles):
    kind = "diffusers pipeline folder"

    def __init__(self, path: Path):
        super().__init__(path)
        self.unet_sets = weight_sets(path / "unet")
        kv = self.kv_weights()
        if not kv:
            raise FamilyError(f"{path}: its UNet has no cross-attention (attn2.to_k/to_v) layers: this is not a "
                              "text-conditioned Stable Diffusion UNet")
        widths = {int(w.shape[1]) for w in kv.values()}
        if len(widths) != 1:
            raise FamilyError(f"{path}: cross-attention layers of several context widths {sorted(widths)}")
        self._family = family_from_context_dim(widths.pop())

    @property
    def family(self) -> Family:
        return self._family

    def unet_weights(self, pattern: re.Pattern) -> dict[str, Tensor]:
        return dict(sorted(read_weight_set(self.unet_sets[0], lambda k: bool(pattern.search(k))).items()))

    def encoder(self, tokenizer_dir=None, device="cpu", cache_dir=None):
        return encoder_from_diffusers(self.path, self.family, tokenizer_dir=tokenizer_dir, cache_dir=cache_dir,
                                      device=device)

    def merge(self, erasure: Erasure, out: str | os.PathLike, strength: float = 1.0) -> MergeSummary:
        """A copy of the folder with the erasure merged into every saved copy of the UNet weights (each variant in
        its own dtype); every other file is copied unchanged."""
        out = Path(out)
        source = self.path.resolve()
        if out.resolve() == source or source in out.resolve().parents:
            raise CheckpointError(f"--out {out} is (inside) the input folder: write the merged model to a new folder")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CheckpointError(f"--out {out} already exists and is not an empty folder: choose a new folder")
        self._check_family(erasure)
        names = {name: _unet_layer(name) for name in erasure.layers}
        plans: dict[Path, tuple[WeightSet, dict[str, str]]] = {}  # file -> (set, {param: erasure layer}) to rewrite
        wanted = set(names.values())
        for weights in self.unet_sets:
            base = read_weight_set(weights, lambda k: k in wanted)
            missing = [layer for layer, param in names.items() if param not in base]
            if missing:
                raise FamilyMismatchError(f"the model has no layer {missing[0]!r} that this erasure edits "
                                          f"({'/'.join(weights.files)})")
            self._check(erasure, {layer: base[param] for layer, param in names.items()})
            located = _locate(weights, set(names.values()))
            for file_name, params in located.items():
                by_param = {names_param: layer for layer, names_param in names.items() if names_param in params}
                plans[weights.folder / file_name] = (weights, by_param)
        summary = MergeSummary(self.family, len(names), strength)

        def fill(staging: Path) -> None:
            for path in sorted(self.path.rglob("*")):
                if path.is_dir():
                    continue
                target = staging / path.relative_to(self.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                plan = plans.get(path)
                if plan is None:
                    shutil.copy2(path, target)
                    summary.copied += 1
                    continue
                _, by_param = plan
                state = read_file(path)
                for param, layer in by_param.items():
                    state[param] = merged_tensor(state[param], erasure.layers[layer], strength)
                if path.suffix.lower() in SAFETENSORS_SUFFIXES:
                    write_checkpoint(target, state, safetensors_metadata(path))
                else:
                    write_stream(target, lambda stream, state=state: torch.save(state, stream))
                del state
                summary.written.append(out / path.relative_to(self.path))

        # Built beside `out` and renamed: a killed merge leaves a stray folder the next merge to `out` removes,
        # never a half-written model under the name.
        write_folder(out, fill, inputs=[self.path])
        return summary


def _locate(weights: WeightSet, params: set[str]) -> dict[str, set[str]]:
    """Which file of a weight set holds each parameter."""
    if weights.index is None:
        return {weights.files[0]: set(params)}
    weight_map = json.loads((weights.folder / weights.index).read_text())["weight_map"]
    located: dict[str, set[str]] = {}
    for param in params:
        located.setdefault(weight_map[param], set()).add(param)
    return located


def open_model(path: str | os.PathLike) -> ModelFiles:
    """A single-file checkpoint or a diffusers pipeline folder (one with a ``unet/`` subfolder)."""
    path = Path(path)
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path} is a folder without a unet/ subfolder: pass a single-file checkpoint "
                                  "(.safetensors, .ckpt) or a diffusers pipeline folder")
        return DiffusersFolder(path)
    return SingleFile(path)
