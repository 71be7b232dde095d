"""Erasures onto ComfyUI objects, portable across the old (2024) and newest ComfyUI.

Weights are only ever changed through patches on a clone (`ModelPatcher.add_patches` with dense deltas, the one
patch form both versions apply identically): a clone shares its weight tensors with the model it came from.
"""
from __future__ import annotations

import os
import re

import torch

from ..erasers.erasure import Erasure, ErasureMisfitError
from ..erasers.families import FamilyError, UNetLayout, kv_family
from ..erasers.text import BATCH_SIZE, CONTEXT_TOKENS, WORD_WINDOW, Encoded, encode_each, warn_truncated


def models_folder(name: str, extensions: set[str]) -> str:
    """Register models/<name> for these file extensions (keeping paths extra_model_paths.yaml added) and return
    its first directory."""
    import folder_paths

    if name in folder_paths.folder_names_and_paths:
        paths = folder_paths.folder_names_and_paths[name][0]
    else:
        paths = [os.path.join(folder_paths.models_dir, name)]
    folder_paths.folder_names_and_paths[name] = (paths, extensions)
    return paths[0]


_KV = re.compile(r"^diffusion_model\.(.+\.attn2\.to_[kv]\.weight)$")
# Every attention parameter inside the transformer blocks: what official TRCE releases edit besides K/V.
ATTENTION = re.compile(r"^diffusion_model\.(.+\.attn[12]\..+)$")
END_TOKEN = 49407  # CLIP's end-of-text id, in every SD tokenizer ComfyUI ships
SPECIAL = (END_TOKEN, 49406, 0)  # end, start, and SDXL's "g" padding


def _layout(model) -> UNetLayout:
    return UNetLayout.from_ldm_keys(model.model.diffusion_model.state_dict().keys())


def original_weight(model, key: str, current: torch.Tensor) -> torch.Tensor:
    """The unpatched weight: while another clone is loaded its patches sit in the shared module, originals in backup."""
    entry = model.backup.get(key)
    if entry is None:
        return current
    return entry.weight if hasattr(entry, "weight") else entry  # newest ComfyUI stores (weight, inplace_update)


def _patched(model, key: str, weight: torch.Tensor) -> torch.Tensor:
    """`weight` with this clone's own patches applied, computed by ComfyUI itself (old: method; new: comfy.lora)."""
    patches = model.patches.get(key)
    if not patches:
        return weight
    weight = weight.clone().float()
    if hasattr(model, "calculate_weight"):
        return model.calculate_weight(patches, weight, key)
    import comfy.lora

    return comfy.lora.calculate_weight(patches, weight, key)


def unet_weights(model, pattern: re.Pattern = _KV) -> dict[str, torch.Tensor]:
    """This MODEL's effective UNet weights whose LDM key matches `pattern` (its own patches included), by
    diffusers parameter name."""
    layout = _layout(model)
    out = {}
    for key, tensor in model.model.state_dict().items():
        match = pattern.match(key)
        if match:
            weight = _patched(model, key, original_weight(model, key, tensor).detach())
            out[layout.to_diffusers(match.group(1))] = weight.float().cpu()
    return out


def _cross_attention(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kv = {k: v for k, v in weights.items() if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    if not kv:
        raise FamilyError("this MODEL has no cross-attention (attn2.to_k/to_v) layers: closed-form erasure needs a "
                          "text-conditioned Stable Diffusion UNet (SD1.x, SD2.x or SDXL)")
    return kv


def kv_weights(model) -> dict[str, torch.Tensor]:
    """This MODEL's effective attn2 to_k/to_v weights by diffusers parameter name."""
    return _cross_attention(unet_weights(model))


def apply_erasure(model, erasure: Erasure, strength: float = 1.0):
    """A clone of `model` with the erasure's deltas patched in at `strength`; `model` itself is untouched."""
    base = unet_weights(model, ATTENTION)  # read once: the family comes from its K/V part
    family = kv_family(_cross_attention(base)).name
    # Every layer must exist with the delta's shape before anything is patched: ComfyUI itself would skip a misfit
    # with only a "WEIGHT NOT MERGED" log line, leaving the image unerased.
    erasure.check_base(family, _fit_weights(model, erasure, base))
    layout = _layout(model)
    patches = {"diffusion_model." + layout.to_ldm(name[len("unet."):]): (delta.materialize(torch.float32),)
               for name, delta in erasure.layers.items()}
    clone = model.clone()
    accepted = set(clone.add_patches(patches, strength))
    missing = sorted(set(patches) - accepted)
    if missing:
        raise FamilyError(f"the MODEL has no weight {missing[0]} that this erasure edits ({len(missing)} missing): "
                          "the erasure was made for another model architecture")
    return clone


def _fit_weights(model, erasure: Erasure, attention: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's weights for every layer the erasure edits, by erasure layer name, so that check_base can refuse
    a missing layer or a shape misfit; attention weights come effective (patched), others as stored."""
    weights = {f"unet.{k}": v for k, v in attention.items()}
    others = [name for name in erasure.layers if name not in weights]
    if not others:
        return weights
    layout = _layout(model)
    state = model.model.state_dict()
    for name in others:
        if not name.startswith("unet."):
            raise ErasureMisfitError(f"erasure layer {name!r} is not a UNet layer (unet.<diffusers parameter name>): "
                                     "this node applies UNet erasures only")
        try:
            key = "diffusion_model." + layout.to_ldm(name[len("unet."):])
        except (KeyError, ValueError, IndexError):
            continue  # no such layer: check_fits names it
        if key in state:
            weights[name] = state[key]
    return weights


class ComfyEncoder:
    """Encode prompts with a ComfyUI CLIP exactly as CLIPTextEncode does (its layer setting and patches included),
    `batch_size` prompts per text-encoder call.

    ComfyUI encodes a prompt's 77-token chunks as one batch, each chunk on its own (padded to 77 by itself), and
    joins them along the tokens. Only a prompt's first chunk is an erasure key, so the first chunks of several
    prompts go in as the chunks of one: the same per-chunk computation, one call. `progress(done, total)` runs
    between batches (nodes pass one that honours ComfyUI's interrupt), after every prompt's length was checked.
    """

    def __init__(self, clip, batch_size: int = BATCH_SIZE, progress=None, check_tokens=None,
                 seconds: float | None = None):
        self.clip = clip
        self.batch_size = batch_size
        self.progress = progress
        self.seconds = seconds  # a target time per call (encode_each), so an interrupt is honoured within about it
        self.check_tokens = check_tokens  # (tokens, what) -> raises above a limit: nodes/inputs.py check_tokens

    def __call__(self, prompts) -> Encoded:
        tokenized = [self._tokenize(prompt) for prompt in prompts]  # every prompt checked before any is encoded
        return encode_each(tokenized, self._encode_batch, self.batch_size, self.progress, self.seconds)

    def _tokenize(self, prompt: str) -> tuple[dict, int]:
        tokens = self.clip.tokenize(prompt)
        chunks = next(iter(tokens.values()))
        ids = [t[0] for t in chunks[0]]
        words = ids.index(END_TOKEN) - 1 if END_TOKEN in ids else WORD_WINDOW
        if self.check_tokens is not None:
            self.check_tokens(tokens, f"the prompt {prompt[:40]!r}")
        if len(chunks) > 1:
            self._warn_cut(prompt, chunks)
        return {key: value[:1] for key, value in tokens.items()}, words

    def _encode_batch(self, batch) -> Encoded:
        packed = {key: [chunk for tokens, _ in batch for chunk in tokens[key]] for key in batch[0][0]}
        cond = self.clip.encode_from_tokens(packed)  # [1, len(batch)·77, width]
        embeddings = cond[0].reshape(len(batch), -1, cond.shape[-1])[:, :CONTEXT_TOKENS].float().cpu()
        return Encoded(embeddings, [words for _, words in batch])

    def _warn_cut(self, prompt: str, chunks) -> None:
        """ComfyUI splits long prompts into 77-token chunks; only the first is an erasure key. Name the cut words.

        They are decoded from the cut chunks' token ids: ComfyUI's word ids number words in the 2024 tokenizer but
        weight segments in 0.3.64 (every word of an unweighted prompt is 1 there), so they cannot name words."""
        cut = [t[0] for chunk in chunks[1:] for t in chunk if not isinstance(t[0], int) or t[0] not in SPECIAL]
        ids = [token for token in cut if isinstance(token, int)]
        warn_truncated(prompt, WORD_WINDOW + len(cut), self._decode(ids))

    def _decode(self, ids: list[int]) -> str:
        """Text of CLIP token ids through the CLIP's own tokenizer (its first tower's), '' where it has none."""
        tokenizer = self.clip.tokenizer
        for name in ("clip_l", "clip_g", "clip_h", getattr(tokenizer, "clip", "")):
            inner = getattr(getattr(tokenizer, name, None), "tokenizer", None) if name else None
            if hasattr(inner, "decode"):
                return inner.decode(ids).strip()
        return ""
