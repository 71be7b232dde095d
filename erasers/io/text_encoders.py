"""A checkpoint's own text encoders as transformers models, encoding prompts exactly as ComfyUI does.

Single-file checkpoints store their CLIP towers in two naming schemes: OpenAI's CLIP-L (SD1.x, SDXL's first tower) in
transformers names, and OpenCLIP's ViT-H (SD2.x) and ViT-bigG (SDXL's second tower) in open_clip names. This module
converts the open_clip towers to transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`, builds the CLIP
tokenizer without downloading anything, and puts both together into a `TransformersEncoder` whose output is the
cross-attention context the UNet sees, as ComfyUI computes it (comfy/sd1_clip.py, sd2_clip.py, sdxl_clip.py):

- SD1.x: CLIP-L's last hidden state, after the final layer norm.
- SD2.x: ViT-H's penultimate hidden state, after the final layer norm (ComfyUI's ``layer="penultimate"`` keeps
  ``layer_norm_hidden_state=True``). The encoder is built with the last of the 24 layers left out, so its last hidden
  state is that tensor; diffusers' SD2 text-encoder config has ``num_hidden_layers=23`` for the same reason.
- SDXL: the penultimate hidden states of CLIP-L and of ViT-bigG, both without the final layer norm
  (``layer_norm_hidden_state=False``), concatenated L then G (768 + 1280 = 2048).

Tokens: OpenAI's tokenizer pads with the end token; the OpenCLIP towers (ViT-H, ViT-bigG) pad with id 0 ("!").
`PaddedTokenizer` pads with 0 without making "!" a special token, as ComfyUI does: a transformers CLIPTokenizer
whose pad token is "!" would also turn every "!" typed in a prompt into id 0 instead of "!</w>" (256).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FileError
from ..families import FAMILIES, TOWER_WIDTH, Family
from ..files import write_atomic
from ..text import CONTEXT_TOKENS, TransformersEncoder
from .clip_names import as_file_names, bytes_to_unicode, load_file_state_dict, text_transformer, to_file_names
from .components import read_component

END_TOKEN = 49407
START_TOKEN = 49406
ZERO_PAD = 0  # "!": what OpenCLIP towers pad with

# Checkpoint prefixes of the towers, per family: (tower name, prefix, naming scheme).
CLIP_L_SD1 = "cond_stage_model.transformer."
CLIP_H_SD2 = ("cond_stage_model.model.", "conditioner.embedders.0.model.")  # LDM, and SD2 saved in the SGM layout
CLIP_L_SDXL = "conditioner.embedders.0.transformer."
CLIP_G_SDXL = "conditioner.embedders.1.model."

# Keys of an open_clip text tower that hold nothing the text encoder needs.
_OPEN_CLIP_IGNORED = re.compile(r"^(?:logit_scale|attn_mask|visual\..*|logit_bias)$")


class TextEncoderError(FileError):
    """A checkpoint's text encoders are missing, of the wrong kind, or their tokenizer cannot be built."""


# ---------------------------------------------------------------------------------------------------------------
# open_clip <-> transformers names

_RESBLOCK_TO_TRANSFORMERS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK_TO_OPEN_CLIP = {v: k for k, v in _RESBLOCK_TO_TRANSFORMERS.items()}
_TOP_TO_TRANSFORMERS = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_TOP_TO_OPEN_CLIP = {v: k for k, v in _TOP_TO_TRANSFORMERS.items()}
_QKV = ("q_proj", "k_proj", "v_proj")
_RESBLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_LAYER_KEY = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def open_clip_layers(state_dict: Mapping[str, Tensor]) -> int:
    """Number of residual blocks of an open_clip text tower (keys without prefix)."""
    found = {int(m.group(1)) for key in state_dict if (m := re.match(r"^transformer\.resblocks\.(\d+)\.", key))}
    return max(found) + 1 if found else 0


def open_clip_to_transformers(state_dict: Mapping[str, Tensor], *, layers: int | None = None,
                              projection: bool = True) -> dict[str, Tensor]:
    """An open_clip text tower (keys without checkpoint prefix) in transformers `CLIPTextModelWithProjection` names.

    ``attn.in_proj_weight``/``bias`` (q, k, v stacked) become three projections; ``text_projection`` (a matrix
    applied as ``x @ P``) becomes the Linear weight ``Pᵀ``, or is dropped with ``projection=False`` (for a plain
    `CLIPTextModel`). ``layers`` keeps only the first residual blocks (SD2's encoder stops one layer early).
    ``logit_scale``, an ``attn_mask`` buffer and a visual tower are dropped; any other unknown key is an error.
    """
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key in _TOP_TO_TRANSFORMERS:
            converted[_TOP_TO_TRANSFORMERS[key]] = tensor
        elif key == "text_projection":
            if projection:
                converted["text_projection.weight"] = tensor.t().contiguous()
        elif m := _IN_PROJ_KEY.match(key):
            block, kind = int(m.group(1)), m.group(2)
            if layers is not None and block >= layers:
                continue
            if tensor.shape[0] % 3:
                raise TextEncoderError(f"{key} has {tensor.shape[0]} rows, not three stacked projections")
            for name, part in zip(_QKV, tensor.chunk(3, dim=0)):
                converted[f"text_model.encoder.layers.{block}.self_attn.{name}.{kind}"] = part
        elif (m := _RESBLOCK_KEY.match(key)) and m.group(2) in _RESBLOCK_TO_TRANSFORMERS:
            block = int(m.group(1))
            if layers is not None and block >= layers:
                continue
            name = f"{_RESBLOCK_TO_TRANSFORMERS[m.group(2)]}.{m.group(3)}"
            converted[f"text_model.encoder.layers.{block}.{name}"] = tensor
        elif not _OPEN_CLIP_IGNORED.match(key):
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise TextEncoderError(f"{len(unknown)} keys are not part of an open_clip text tower: {shown}")
    if "text_model.embeddings.token_embedding.weight" not in converted:
        raise TextEncoderError("no token_embedding.weight: this is not an open_clip text tower")
    return converted


def transformers_to_open_clip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `open_clip_to_transformers`: transformers CLIP text names -> open_clip names (no prefix).

    ``text_model.embeddings.position_ids`` (a constant buffer) is dropped.
    """
    converted: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key in _TOP_TO_OPEN_CLIP:
            converted[_TOP_TO_OPEN_CLIP[key]] = tensor
        elif key == "text_projection.weight":
            converted["text_projection"] = tensor.t().contiguous()
        elif key == "text_model.embeddings.position_ids":
            continue
        elif m := _LAYER_KEY.match(key):
            block, inner, kind = int(m.group(1)), m.group(2), m.group(3)
            if inner.startswith("self_attn.") and inner.removeprefix("self_attn.") in _QKV:
                qkv.setdefault((block, kind), {})[inner.removeprefix("self_attn.")] = tensor
            elif inner in _RESBLOCK_TO_OPEN_CLIP:
                converted[f"transformer.resblocks.{block}.{_RESBLOCK_TO_OPEN_CLIP[inner]}.{kind}"] = tensor
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for (block, kind), parts in sorted(qkv.items()):
        if set(parts) != set(_QKV):
            raise TextEncoderError(f"layer {block} lacks some of the q/k/v {kind} projections")
        converted[f"transformer.resblocks.{block}.attn.in_proj_{kind}"] = torch.cat([parts[n] for n in _QKV])
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise TextEncoderError(f"{len(unknown)} keys are not part of a transformers CLIP text model: {shown}")
    return converted


# ---------------------------------------------------------------------------------------------------------------
# Models


def transformers_layers(state_dict: Mapping[str, Tensor]) -> int:
    found = {int(m.group(1)) for key in state_dict if (m := re.match(r"^text_model\.encoder\.layers\.(\d+)\.", key))}
    return max(found) + 1 if found else 0


def drop_last_layers(state_dict: Mapping[str, Tensor], keep: int) -> dict[str, Tensor]:
    """A transformers CLIP text state dict with only its first `keep` encoder layers."""
    out = {}
    for key, tensor in state_dict.items():
        m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.", key)
        if m is None or int(m.group(1)) < keep:
            out[key] = tensor
    return out


def clip_text_config(state_dict: Mapping[str, Tensor], hidden_act: str, heads: int | None = None):
    """A transformers `CLIPTextConfig` read off a CLIP text state dict (transformers names). CLIP text towers use
    64-wide attention heads, so ``heads`` defaults to width / 64."""
    from transformers import CLIPTextConfig

    try:
        tokens = state_dict["text_model.embeddings.token_embedding.weight"]
        positions = state_dict["text_model.embeddings.position_embedding.weight"]
        fc1 = state_dict["text_model.encoder.layers.0.mlp.fc1.weight"]
    except KeyError as err:
        raise TextEncoderError(f"the text encoder has no {err.args[0]}: is it a complete CLIP text model?") from None
    for key, tensor in (("token_embedding", tokens), ("position_embedding", positions), ("layers.0.mlp.fc1", fc1)):
        if tensor.ndim != 2:
            raise TextEncoderError(f"the text encoder's {key} weight has shape {list(tensor.shape)}, not a matrix: "
                                   "the file is damaged or not a CLIP text model")
    width = int(tokens.shape[1])
    projection = state_dict.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=int(tokens.shape[0]),
        hidden_size=width,
        intermediate_size=int(fc1.shape[0]),
        projection_dim=int(projection.shape[0]) if projection is not None else width,
        num_hidden_layers=transformers_layers(state_dict),
        num_attention_heads=heads or max(1, width // 64),
        max_position_embeddings=int(positions.shape[0]),
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=START_TOKEN,
        eos_token_id=END_TOKEN,
        pad_token_id=1,
    )


def build_clip_text_model(state_dict: Mapping[str, Tensor], config=None, *, hidden_act: str = "gelu",
                          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A transformers CLIP text model holding `state_dict` (file names, ``text_model.*``: see `clip_names`), in eval
    mode.

    `CLIPTextModelWithProjection` when the state dict has ``text_projection.weight``, else `CLIPTextModel`. The model
    is created on the meta device and takes the tensors (converted to `dtype`) as its parameters, so no time goes
    into random initialisation and no second copy of the weights is made. ``position_ids`` is rebuilt.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    state = {k: v for k, v in state_dict.items() if k != "text_model.embeddings.position_ids"}
    config = config if config is not None else clip_text_config(state, hidden_act)
    with_projection = "text_projection.weight" in state
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    try:
        with torch.device("meta"):
            model = cls(config)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:  # a config of the wrong types
        raise TextEncoderError(f"the text encoder's configuration cannot build a {cls.__name__} ({str(err)[:200]})") \
            from None
    state = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}
    try:
        missing, unexpected = load_file_state_dict(model, state, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise TextEncoderError(f"the text encoder's weights do not fit its configuration: {str(err)[:400]}") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        what = (f"missing {', '.join(missing[:3])}" if missing else "") + \
               (f" unexpected {', '.join(unexpected[:3])}" if unexpected else "")
        raise TextEncoderError(f"the text encoder's weights do not match a {cls.__name__}: {what.strip()}")
    embeddings = text_transformer(model).embeddings
    positions = torch.arange(config.max_position_embeddings, device=device).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=False)
    leftover = list(to_file_names({name: t for name, t in [*model.named_parameters(), *model.named_buffers()]
                                   if t.is_meta}, model))
    if leftover:
        raise TextEncoderError(f"the text encoder has no weights for {', '.join(leftover[:3])}")
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


class PaddedTokenizer:
    """A CLIPTokenizer that pads with `pad_id` after the end token, without treating that token as special.

    Supports the calls `TransformersEncoder` makes (a list of prompts; ``add_special_tokens``, ``padding=
    "max_length"``, ``max_length``, ``truncation``, ``return_tensors="pt"``) and ``decode``.
    """

    def __init__(self, tokenizer, pad_id: int):
        self.tokenizer = tokenizer
        self.pad_id = int(pad_id)

    def __call__(self, prompts, padding=False, max_length=None, truncation=False, return_tensors=None,
                 add_special_tokens=True):
        from transformers import BatchEncoding

        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        ids = self.tokenizer(batch, add_special_tokens=add_special_tokens, truncation=truncation,
                             max_length=max_length)["input_ids"]
        if padding == "max_length":
            ids = [row + [self.pad_id] * (max_length - len(row)) for row in ids]
        elif padding:
            longest = max(map(len, ids), default=0)
            ids = [row + [self.pad_id] * (longest - len(row)) for row in ids]
        if return_tensors is None and single:
            ids = ids[0]
        return BatchEncoding({"input_ids": ids}, tensor_type=return_tensors)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def open_clip_bpe_path() -> Path | None:
    """open_clip's packaged ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip (it imports torch
    vision models and more)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    return None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "erasekit"


_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 word-final bytes, these merges, 2 special tokens


def bpe_to_tokenizer_files(bpe_path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (transformers' CLIPTokenizer files) from CLIP's gzipped BPE merge list.

    The vocabulary is CLIP's: the 256 byte symbols, the same with the word-end mark ``</w>``, one token per merge
    in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 entries). Files appear atomically.
    """
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1: _MERGES + 1]  # the first line is a version header
    if len(merges) != _MERGES or any(len(m.split()) != 2 for m in merges):
        raise TextEncoderError(f"{bpe_path} is not CLIP's BPE merge list ({len(merges)} merges, expected {_MERGES})")
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "vocab.json", json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    write_atomic(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def tokenizer_files(tokenizer_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder with CLIP's ``vocab.json`` and ``merges.txt``: `tokenizer_dir` if given, else converted once from
    open_clip's packaged BPE file into ``cache_dir`` (default ``$XDG_CACHE_HOME/erasekit`` or ``~/.cache/erasekit``;
    a temporary folder if that is not writable)."""
    if tokenizer_dir is not None:
        folder = Path(tokenizer_dir)
        if not _has_tokenizer_files(folder):
            raise TextEncoderError(f"--tokenizer {folder}: no vocab.json and merges.txt there (a CLIP tokenizer folder "
                                   "holds both, e.g. a diffusers model's tokenizer/ or ComfyUI's comfy/sd1_tokenizer/)")
        return folder
    bpe = open_clip_bpe_path()
    if bpe is None:
        raise TextEncoderError(
            "no CLIP tokenizer files: this checkpoint does not ship them and open_clip is not installed. Install it "
            "(`pip install open_clip_torch`), or pass --tokenizer DIR with a folder holding CLIP's vocab.json and "
            "merges.txt (a diffusers model's tokenizer/ folder, or ComfyUI's comfy/sd1_tokenizer/)"
        )
    digest = hashlib.sha256(bpe.read_bytes()).hexdigest()[:16]
    bases = ([Path(cache_dir)] if cache_dir is not None
             else [default_cache_dir(), Path(tempfile.gettempdir()) / "erasekit"])
    for base in bases:
        folder = base / f"clip-bpe-{digest}"
        if _has_tokenizer_files(folder):
            return folder
        try:
            return bpe_to_tokenizer_files(bpe, folder)
        except OSError:
            continue
    raise TextEncoderError(f"cannot write the CLIP tokenizer files converted from {bpe}: pass --tokenizer DIR")


def clip_tokenizer(folder: str | os.PathLike, pad_id: int = END_TOKEN) -> PaddedTokenizer:
    """CLIP's tokenizer from a folder's ``vocab.json``/``merges.txt``, padding with `pad_id` (49407 for OpenAI's
    CLIP-L, 0 for the OpenCLIP towers). The folder's tokenizer_config.json is not read."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    base = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CONTEXT_TOKENS)
    return PaddedTokenizer(base, pad_id)


# ---------------------------------------------------------------------------------------------------------------
# Encoders from checkpoints


def _strip(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _transformers_tower(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A transformers-named CLIP-L under `prefix`; early SD1 files lack the ``text_model.`` level."""
    return {k: v for k, v in as_file_names(_strip(state_dict, prefix)).items()
            if k != "text_model.embeddings.position_ids"}


def checkpoint_text_towers(state_dict: Mapping[str, Tensor], family: Family | str) -> dict[str, dict[str, Tensor]]:
    """The family's CLIP towers in a single-file checkpoint's state dict, each in transformers names, ordered as
    their outputs are concatenated. SD2's ViT-H keeps only its first 23 of 24 layers (see the module notes)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    if family.name == "sd1":
        towers = {"clip_l": _transformers_tower(state_dict, CLIP_L_SD1)}
    elif family.name == "sd2":
        prefix = next((p for p in CLIP_H_SD2 if any(k.startswith(p) for k in state_dict)), CLIP_H_SD2[0])
        raw = _strip(state_dict, prefix)
        towers = {"clip_h": open_clip_to_transformers(raw, layers=max(open_clip_layers(raw) - 1, 1),
                                                      projection=False) if raw else {}}
    elif family.name == "sdxl":
        raw_g = _strip(state_dict, CLIP_G_SDXL)
        towers = {
            "clip_l": _transformers_tower(state_dict, CLIP_L_SDXL),
            "clip_g": open_clip_to_transformers(raw_g) if raw_g else {},
        }
    else:  # pragma: no cover - FAMILIES holds these three
        raise TextEncoderError(f"no text encoders known for {family.label}")
    missing = [name for name, tower in towers.items() if not tower]
    if missing:
        where = {"clip_l": CLIP_L_SD1 if family.name == "sd1" else CLIP_L_SDXL, "clip_h": CLIP_H_SD2[0],
                 "clip_g": CLIP_G_SDXL}
        raise TextEncoderError(
            f"this {family.label} checkpoint has no {' or '.join(missing)} text encoder (expected keys under "
            f"{', '.join(where[m] + '*' for m in missing)}): it may hold the UNet only. Use a full checkpoint, or "
            "its diffusers folder"
        )
    return towers


_TOWER_ACT = {"clip_l": "quick_gelu", "clip_h": "gelu", "clip_g": "gelu"}
_TOWER_PAD = {"clip_l": END_TOKEN, "clip_h": ZERO_PAD, "clip_g": ZERO_PAD}


def _check_width(name: str, tower: Mapping[str, Tensor], family: Family) -> None:
    tokens = tower.get("text_model.embeddings.token_embedding.weight")
    width = int(tokens.shape[1]) if tokens is not None else 0
    if width != TOWER_WIDTH[name]:
        raise TextEncoderError(f"the {name} text encoder of this {family.label} model is {width} wide, not "
                               f"{TOWER_WIDTH[name]}: the checkpoint mixes parts of different models")


def encoder_from_towers(towers: Mapping[str, Mapping[str, Tensor]], family: Family | str, tokenizer_folders:
                        Mapping[str, Path], *, configs: Mapping[str, object] | None = None,
                        pad_ids: Mapping[str, int] | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> TransformersEncoder:
    """A `TransformersEncoder` over `towers` (transformers names, ordered L before G) that gives the family's context.

    `tokenizer_folders`: a vocab.json/merges.txt folder per tower. `configs`: optional CLIPTextConfig per tower (else
    read off the weights, with OpenAI CLIP-L's quick_gelu and OpenCLIP's gelu).
    """
    family = FAMILIES[family] if isinstance(family, str) else family
    tokenizers, models = [], []
    for name, tower in towers.items():
        _check_width(name, tower, family)
        config = (configs or {}).get(name)
        models.append(build_clip_text_model(tower, config, hidden_act=_TOWER_ACT[name], dtype=dtype, device=device))
        pad = (pad_ids or {}).get(name, _TOWER_PAD[name])
        tokenizers.append(clip_tokenizer(tokenizer_folders[name], pad))
    return TransformersEncoder(tokenizers, models, penultimate=family.name == "sdxl")


def encoder_from_checkpoint(state_dict: Mapping[str, Tensor], family: Family | str, *,
                            tokenizer_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                            device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32) -> TransformersEncoder:
    """The text encoder of a single-file checkpoint (its full state dict, or only its text-encoder keys)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    towers = checkpoint_text_towers(state_dict, family)
    folder = tokenizer_files(tokenizer_dir, cache_dir)
    return encoder_from_towers(towers, family, {name: folder for name in towers}, device=device, dtype=dtype)


_DIFFUSERS_TOWERS = {"sd1": (("clip_l", "text_encoder", "tokenizer"),),
                     "sd2": (("clip_h", "text_encoder", "tokenizer"),),
                     "sdxl": (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))}


def encoder_from_diffusers(folder: str | os.PathLike, family: Family | str, *,
                           tokenizer_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                           device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32) -> TransformersEncoder:
    """The text encoder(s) of a diffusers pipeline folder, with its own tokenizer files where it has them (their
    vocab.json/merges.txt; padding is the tower's, as in ComfyUI).

    Encodes as ComfyUI does for the family (see the module notes). An SD2 text encoder saved with all 24 layers is cut
    to 23, which is what diffusers' SD2 configurations already hold.
    """
    from transformers import CLIPTextConfig


    family = FAMILIES[family] if isinstance(family, str) else family
    folder = Path(folder)
    towers, configs, tokenizers = {}, {}, {}
    fallback: Path | None = None
    for name, component, tokenizer_name in _DIFFUSERS_TOWERS[family.name]:
        if not (folder / component).is_dir():
            raise TextEncoderError(f"{folder} has no {component}/ folder: the {family.label} text encoder ({name}) is "
                                   "needed to encode the concepts")
        tower = {k: v for k, v in as_file_names(read_component(folder / component)).items()
                 if k != "text_model.embeddings.position_ids"}  # as_file_names: a folder transformers 5 saved
        if (folder / component / "config.json").is_file():
            config = CLIPTextConfig.from_pretrained(str(folder / component))
        else:
            config = clip_text_config(tower, _TOWER_ACT[name])
        if family.name == "sd2" and transformers_layers(tower) == 24:
            tower = drop_last_layers(tower, 23)
        config.num_hidden_layers = transformers_layers(tower)
        towers[name], configs[name] = tower, config
        tokenizer_folder = folder / tokenizer_name
        if tokenizer_dir is None and _has_tokenizer_files(tokenizer_folder):
            tokenizers[name] = tokenizer_folder
        else:
            fallback = fallback or tokenizer_files(tokenizer_dir, cache_dir)
            tokenizers[name] = fallback
    return encoder_from_towers(towers, family, tokenizers, configs=configs, device=device, dtype=dtype)
