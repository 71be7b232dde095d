"""AdvUnlearn text encoders (Zhang et al., NeurIPS 2024): robust CLIP-L text encoders that replace SD1.x's own.

AdvUnlearn trains only the CLIP text encoder, so its result is a whole CLIP-L text model that drops into SD1.4, SD1.5
and their fine-tunes. It comes in these layouts, all read into one `AdvUnlearnEncoder` (transformers
`CLIPTextModel` names, ``text_model.*``, and a `CLIPTextConfig`):

- the released folders (HF ``OPTML-Group/AdvUnlearn``, e.g. ``nudity_unlearned/``): ``config.json`` and
  ``pytorch_model.bin`` (an fp32 pickle, read with ``weights_only=True``) or ``model.safetensors``;
- the training script's ``TextEncoder-*.pt``: the state dict of its wrapper module, where the `CLIPTextModel` sits
  under ``text_encoder.`` and the wrapper's aliases repeat every tensor as ``embedding.*``, ``encoder.*`` and
  ``final_layer_norm.*``. As the official conversion does, ``text_encoder.text_model.*`` is kept and the rest dropped;
- one file (``.safetensors``, or a weights-only pickle) in transformers names (``text_model.*``) or in checkpoint
  names (``cond_stage_model.transformer.text_model.*``, as A1111 merges it into a checkpoint).

Applying one never changes the model it is applied to: in ComfyUI as weight patches on a CLIP clone
(nodes/advunlearn.py); in diffusers with `swap_text_encoder` / `restore_text_encoder` below (exact restore).
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError, retyped
from ..families import FAMILIES, TOWER_WIDTH, FamilyError, family_from_context_dim, text_encoders
from ..io.checkpoints import CheckpointError, read_checkpoint
from ..io.clip_names import as_file_names, check_weights, to_file_names
from ..io.components import read_component
from ..io.text_encoders import (
    CLIP_L_SD1,
    TextEncoderError,
    build_clip_text_model,
    checkpoint_text_towers,
    clip_text_config,
    transformers_layers,
)

CLIP_L_WIDTH = TOWER_WIDTH["clip_l"]
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
_TRAINING_PREFIX = "text_encoder."  # the wrapper module's attribute holding the CLIPTextModel
# Not part of what AdvUnlearn changes: a constant buffer, and a projection SD1.x never uses (and `CLIPTextModel`
# has no place for).
_DROPPED = ("text_model.embeddings.position_ids", "text_projection.weight")
_TOWER_MODEL = {"clip_l": "OpenAI CLIP ViT-L/14", "clip_h": "OpenCLIP ViT-H/14", "clip_g": "OpenCLIP ViT-bigG/14"}
_SD1_ONLY = ("AdvUnlearn encoders replace the 768-wide CLIP-L text encoder of Stable Diffusion 1.x (SD1.4, SD1.5 "
             "and their fine-tunes) only")


@dataclass(frozen=True)
class AdvUnlearnEncoder:
    """A CLIP-L text encoder in transformers names (``text_model.*``, no ``position_ids``), as stored."""

    state_dict: dict[str, Tensor]
    config: object  # transformers CLIPTextConfig: the folder's config.json, else read off the weights
    source: str

    @property
    def layers(self) -> int:
        return transformers_layers(self.state_dict)


def load_advunlearn(path: str | os.PathLike, width: int = CLIP_L_WIDTH) -> AdvUnlearnEncoder:
    """Read an AdvUnlearn text encoder in any of the layouts in the module notes. Errors (`TextEncoderError`) say
    what the file is instead: a pickle that is not weights only, another family's text encoder, or which key prefixes
    an unknown file holds. `width` is the text encoder's expected width: CLIP-L's, except for models of their own
    (the shapes world's 64)."""
    path = Path(path)
    try:
        state, config = _read_folder(path) if path.is_dir() else (read_checkpoint(path), None)
    except CheckpointError as err:
        raise TextEncoderError(str(err)) from err
    tower = _clip_text_tower(state, path.name, width)
    try:
        check_weights(path, tower)  # an int8 or NaN encoder would load and give black images
    except InputError as err:
        raise retyped(err, TextEncoderError) from None
    config = config if config is not None else clip_text_config(tower, "quick_gelu")  # OpenAI CLIP-L's activation
    build_clip_text_model(tower, config)  # raises unless these are every weight of a CLIPTextModel of this config
    return AdvUnlearnEncoder(tower, config, str(path))


def _read_folder(folder: Path):
    from transformers import CLIPTextConfig

    if not (folder / "config.json").is_file():
        inside = sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())
        hint = f"; its subfolders {', '.join(inside)} are" if inside else ""
        raise TextEncoderError(f"{folder} has no config.json, so it is not a transformers CLIPTextModel folder{hint}")
    _check_config(folder / "config.json")
    try:
        config = CLIPTextConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as err:
        raise TextEncoderError(f"{folder / 'config.json'} is not a readable CLIPTextConfig ({err})") from None
    state = read_component(folder)
    if not any(k.startswith(("text_model.", _TRAINING_PREFIX)) for k in state):
        state = as_file_names(state)  # a CLIPTextModel folder that transformers 5's save_pretrained wrote
    return state, config


# The sizes a CLIPTextConfig builds the model from: whole numbers ≥ 1 where the file gives them.
_CONFIG_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings")


def _check_config(path: Path) -> None:
    """config.json as a JSON object whose sizes are whole numbers ≥ 1, activation a name, and every number finite:
    transformers builds a model from whatever it holds and fails deep inside (or reads NaN as a layer-norm ε)."""
    import json
    import math

    def finite(value) -> bool:
        if isinstance(value, float):
            return math.isfinite(value)
        if isinstance(value, dict):
            return all(finite(v) for v in value.values())
        if isinstance(value, list):
            return all(finite(v) for v in value)
        return True

    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TextEncoderError(f"{path} is not readable JSON ({err}): copy or download the folder again") from None
    if not isinstance(config, dict):
        raise TextEncoderError(file=path, expected="a JSON object of CLIPTextConfig fields",
                               found=type(config).__name__, fix="copy or download the folder again")
    for key in _CONFIG_SIZES:
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TextEncoderError(file=path, key=key, expected="a whole number ≥ 1", found=repr(value)[:40],
                                   fix="copy or download the folder again")
    if not isinstance(config.get("hidden_act", "gelu"), str):
        raise TextEncoderError(file=path, key="hidden_act", expected="an activation name",
                               found=repr(config.get("hidden_act"))[:40])
    if not finite(config):
        raise TextEncoderError(file=path, expected="finite numbers", found="NaN or Infinity",
                               fix="copy or download the folder again")


def _clip_text_tower(state: Mapping[str, Tensor], name: str, expected: int) -> dict[str, Tensor]:
    training = _TRAINING_PREFIX + "text_model."
    if any(k.startswith(training) for k in state):
        tower = {k[len(_TRAINING_PREFIX):]: v for k, v in state.items() if k.startswith(training)}
    elif any(k.startswith(CLIP_L_SD1) for k in state):
        tower = checkpoint_text_towers(state, "sd1")["clip_l"]
    else:
        tower = {k: v for k, v in state.items() if k.startswith("text_model.")}
    tower = {k: v for k, v in tower.items() if k not in _DROPPED}
    if TOKEN_EMBEDDING not in tower:
        others = {t.name: t.width for t in text_encoders({k: tuple(v.shape) for k, v in state.items()})}
        if others and others != {"clip_l": CLIP_L_WIDTH}:  # SD2 / SDXL checkpoint names
            raise not_sd1(name, others)
        raise TextEncoderError(f"{name} holds no CLIP text encoder (no {TOKEN_EMBEDDING} under the known namings: "
                               f"text_model.*, {CLIP_L_SD1}text_model.*, {_TRAINING_PREFIX}text_model.*); key "
                               f"prefixes found: {_key_prefixes(state)}")
    if tower[TOKEN_EMBEDDING].ndim != 2:
        raise TextEncoderError(file=name, key=TOKEN_EMBEDDING, expected="a matrix (vocabulary × width)",
                               found=f"shape {list(tower[TOKEN_EMBEDDING].shape)}",
                               fix="the file is damaged or not a text encoder: copy or download it again")
    width = int(tower[TOKEN_EMBEDDING].shape[1])
    if width != expected:
        raise not_sd1(name, {_tower_of_width(width): width})
    return tower


def _tower_of_width(width: int) -> str:
    return next((name for name, w in TOWER_WIDTH.items() if w == width), "a CLIP text encoder")


def _key_prefixes(keys, shown: int = 8) -> str:
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    if not counts:
        return "none"
    listed = ", ".join(f"{prefix}.* ({n} keys)" for prefix, n in counts.most_common(shown))
    return listed + (f" and {len(counts) - shown} more" if len(counts) > shown else "")


def not_sd1(what: str, towers: Mapping[str, int]) -> TextEncoderError:
    """The error for a model whose text encoders (name -> width, 0 if unknown) are not SD1.x's CLIP-L."""
    family = next((f.label for f in FAMILIES.values() if f.text_encoders and sorted(f.text_encoders) == sorted(towers)),
                  None)
    listed = ", ".join(f"{n} ({_TOWER_MODEL[n]}, {w} wide)" if n in _TOWER_MODEL else (f"{n} ({w} wide)" if w else n)
                       for n, w in sorted(towers.items()))
    owner = f"the text encoder{'s' if len(towers) > 1 else ''} of {family}: " if family else ""
    return TextEncoderError(f"{what} holds {owner}{listed}. {_SD1_ONLY}")


def check_fits(encoder: AdvUnlearnEncoder, shapes: Mapping[str, Sequence[int]], what: str) -> None:
    """`shapes`: the target CLIP-L's tensors in transformers names. Raise unless the encoder has exactly its weights."""
    target = {k: tuple(s) for k, s in shapes.items() if k.startswith("text_model.") and k not in _DROPPED}
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict.items()}
    if target.keys() != ours.keys():
        raise TextEncoderError(
            f"{what} has {transformers_layers(target)} layers and {len(target)} text-model tensors, "
            f"{Path(encoder.source).name} {encoder.layers} and {len(ours)}; first differences: "
            f"{', '.join(sorted(target.keys() ^ ours.keys())[:3])}. {_SD1_ONLY}")
    wrong = [k for k in ours if ours[k] != target[k]]
    if wrong:
        raise TextEncoderError(f"{Path(encoder.source).name} does not fit {what}: {wrong[0]} is {ours[wrong[0]]} "
                               f"there, {target[wrong[0]]} here ({len(wrong)} tensors differ)")


# ---------------------------------------------------------------------------------------------------------------
# diffusers

_ORIGINALS = "_erasekit_advunlearn_originals"


def _replaceable_text_encoder(pipe, encoder: AdvUnlearnEncoder) -> torch.nn.Module:
    """The pipeline's one text encoder, if it is as wide as `encoder` and is all the UNet reads (SD1.x for CLIP-L)."""
    text_encoder = getattr(pipe, "text_encoder", None)
    if text_encoder is None:
        raise TextEncoderError("this pipeline has no text_encoder")
    width = int(text_encoder.config.hidden_size)
    unet = getattr(pipe, "unet", None)
    context = int(unet.config.cross_attention_dim) if unet is not None else width
    expected = int(encoder.config.hidden_size)
    if getattr(pipe, "text_encoder_2", None) is not None or width != expected or context != expected:
        try:
            label = family_from_context_dim(context).label
        except FamilyError:
            label = f"a {context}-wide context"
        raise TextEncoderError(f"this is a {label} pipeline (its text_encoder is {width} wide). {_SD1_ONLY}")
    return text_encoder


@torch.no_grad()
def swap_text_encoder(pipe, encoder: AdvUnlearnEncoder, strength: float = 1.0) -> None:
    """Put the AdvUnlearn weights into an SD1.x pipeline's text encoder, `strength` of the way from its own (0: its
    own, 1: AdvUnlearn's). The module stays the same object, so its device, dtype and any offloading hooks stay; its
    own tensors are kept aside at the first swap, so a second swap blends from them and `restore_text_encoder`
    puts them back exactly."""
    text_encoder = _replaceable_text_encoder(pipe, encoder)
    own = to_file_names(text_encoder.state_dict(), text_encoder)  # tensors sharing storage with the parameters
    check_fits(encoder, {k: v.shape for k, v in own.items()}, "the pipeline's text encoder")
    originals: dict[str, Tensor] = getattr(text_encoder, _ORIGINALS, {})
    for key, new in encoder.state_dict.items():
        target = own[key]
        original = originals.setdefault(key, target.clone())
        # lerp is exact at both ends: strength 0 gives the original, 1 the AdvUnlearn tensor.
        blended = torch.lerp(original.float(), new.to(device=target.device, dtype=torch.float32), strength)
        target.copy_(blended.to(target.dtype))
    setattr(text_encoder, _ORIGINALS, originals)


@torch.no_grad()
def restore_text_encoder(pipe) -> None:
    """Put back the text-encoder tensors `swap_text_encoder` replaced, bit for bit."""
    text_encoder = pipe.text_encoder
    own = to_file_names(text_encoder.state_dict(), text_encoder)
    for key, original in getattr(text_encoder, _ORIGINALS, {}).items():
        own[key].copy_(original)
    if hasattr(text_encoder, _ORIGINALS):
        delattr(text_encoder, _ORIGINALS)
