"""CLIP text models under transformers 4 and 5: the one place that knows how the installed transformers names them.

Files name a CLIP text model's weights as transformers 4 does, and that is the file format EraseKit reads and writes
(single-file checkpoints, released AdvUnlearn folders, diffusers folders, EraseKit's own files):
``text_model.embeddings.*``, ``text_model.encoder.layers.N.*``, ``text_model.final_layer_norm.*`` and, with a
projection, ``text_projection.weight``. transformers 5's `CLIPTextModel` is itself the transformer (it has no
``.text_model``), so its own state-dict keys lack the ``text_model.`` level; `CLIPTextModelWithProjection` still
holds the transformer under ``text_model`` in both. The functions below look at the model, never at the version:

- `text_transformer(model)`: the module with ``embeddings``, ``encoder`` and ``final_layer_norm``;
- `to_model_names(state, model)` / `to_file_names(state, model)`: a state dict between file and `model`'s names;
- `as_file_names(state)`: a text model's weights read from a file or folder written without the ``text_model.``
  level (early SD1.x checkpoints, ``save_pretrained`` under transformers 5) in file names;
- `file_state_dict(model)`, `load_file_state_dict(model, state)`, `save_text_model(model, folder)`: a model's weights
  read, loaded and written in file names;
- `bytes_to_unicode()`: CLIP's byte-to-symbol table (its module moved in transformers 5).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import check_tensor
from ..files import write_safetensors

FILE_PREFIX = "text_model."  # what files put before the transformer's own keys


def text_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer inside a transformers CLIP text model (``embeddings``, ``encoder``, ``final_layer_norm``):
    ``model.text_model`` where the model has one (transformers 4; `CLIPTextModelWithProjection` in 5), else the
    model itself (transformers 5's `CLIPTextModel`)."""
    inner = getattr(model, "text_model", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _model_prefix(model: torch.nn.Module) -> str:
    """What `model`'s own keys have where files have ``text_model.``."""
    return FILE_PREFIX if text_transformer(model) is not model else ""


def to_model_names(state_dict: Mapping[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """A state dict in file names (``text_model.*``) in `model`'s own names; other keys pass unchanged."""
    if _model_prefix(model):
        return dict(state_dict)
    return {k.removeprefix(FILE_PREFIX): v for k, v in state_dict.items()}


def to_file_names(state_dict: Mapping[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """A state dict in `model`'s own names in file names (the inverse of `to_model_names`). The tensors are the same
    objects, so those of ``model.state_dict()`` still share storage with the parameters."""
    if _model_prefix(model):
        return dict(state_dict)
    return {k if k.startswith(FILE_PREFIX) else FILE_PREFIX + k: v for k, v in state_dict.items()}


def as_file_names(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CLIP text model's state dict as a file may hold it, in file names: keys without the ``text_model.`` level
    (the first SD1.x checkpoints; a folder that transformers 5's ``save_pretrained`` wrote) gain it; keys already in
    file names and ``text_projection.*`` stay."""
    return {k if k.startswith((FILE_PREFIX, "text_projection.")) else FILE_PREFIX + k: v for k, v in state_dict.items()}


def file_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` in file names."""
    return to_file_names(model.state_dict(), model)


# Largest |value| a CLIP text-model weight may hold (they are O(1) to O(100)); beyond this the file is corrupt and
# float16 inference would overflow.
MAX_ABS = 1e4


def check_weights(source, state_dict: Mapping[str, Tensor]) -> None:
    """Raise a FileError naming `source` and the key of the first weight that is not floating point, is empty, holds
    NaN/Inf or is implausibly large (an int8 or bool weight would load and silently give garbage embeddings);
    ``position_ids``, an integer buffer, is exempt."""
    for key, tensor in state_dict.items():
        if not key.endswith("position_ids"):
            check_tensor(source, key, tensor, max_abs=MAX_ABS)


def load_file_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Tensor], *, source="the state dict",
                         **kwargs):
    """``model.load_state_dict`` from a state dict in file names, after `check_weights` (`source` names it in
    errors); the missing and unexpected keys it returns (with ``strict=False``) are in file names too. `kwargs`:
    ``strict``, ``assign``."""
    check_weights(source, state_dict)
    file_name = dict(zip(to_model_names(dict.fromkeys(state_dict), model), state_dict))  # model name -> file name
    result = model.load_state_dict(to_model_names(state_dict, model), **kwargs)
    missing = list(to_file_names(dict.fromkeys(result.missing_keys), model))
    unexpected = [file_name.get(k, k) for k in result.unexpected_keys]
    return type(result)(missing, unexpected)


def save_text_model(model: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """A transformers CLIP text model as a folder in file names: ``config.json`` and ``model.safetensors`` (what
    ``save_pretrained`` writes under transformers 4, and what `from_pretrained` reads under 4 and 5)."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in file_state_dict(model).items()
             if not k.endswith("position_ids")}  # a constant buffer transformers does not save
    check_weights(folder / "model.safetensors", state)  # what loading would refuse is never written
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(str(folder))
    write_safetensors(folder / "model.safetensors", state, {"format": "pt"})
    return folder


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's table from the 256 byte values to printable symbols (transformers 4 keeps it in
    ``models.clip.tokenization_clip``, transformers 5 in ``convert_slow_tokenizer``)."""
    try:
        from transformers.models.clip.tokenization_clip import bytes_to_unicode as table
    except ImportError:
        from transformers.convert_slow_tokenizer import bytes_to_unicode as table
    return table()
