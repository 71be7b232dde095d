"""Soft prompts: k free token embeddings placed in a prompt at the word-embedding level, right after BOS.

AdvUnlearn's attacker (`attack_type prefix_k`, `attack_embd_type word_embd`) and UnlearnDiffAtk-style attacks both
optimise such a prefix: the sequence is [BOS, δ_1 … δ_k, tokens(prompt), EOS, padding], cut to CLIP's 77 positions.

The prefix enters through a forward hook on the text encoder's token-embedding module, which overwrites the
placeholder positions, so everything after the embeddings (positions, causal mask, final layer norm, and any hook a
pack puts on the text encoder, e.g. SPM's Facilitated Transport recording the token ids) runs exactly as for a
typed prompt. The placeholder id is an ordinary word token: special ids are skipped by some gates.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..text import CONTEXT_TOKENS


def prefixed_ids(tokenizer, prompts: Sequence[str], k: int) -> Tensor:
    """[B, 77] ids: BOS, k placeholders, the prompt's tokens, EOS, padding (cut to 77 as the official code does)."""
    if k < 0:
        raise ValueError(f"a soft prompt needs k >= 0 tokens, got {k}")
    ids = tokenizer(list(prompts), padding="max_length", max_length=CONTEXT_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    placeholder = torch.full((ids.shape[0], k), placeholder_id(tokenizer), dtype=ids.dtype)
    return torch.cat([ids[:, :1], placeholder, ids[:, 1:]], dim=1)[:, :CONTEXT_TOKENS]


def placeholder_id(tokenizer) -> int:
    special = set(tokenizer.all_special_ids)
    return next(i for i in tokenizer("a", add_special_tokens=False).input_ids if i not in special)


def encode(text_encoder, ids: Tensor, prefix: Tensor | None) -> Tensor:
    """The last hidden state [B, 77, d] of `ids` (from `prefixed_ids`) with positions 1…k set to `prefix`
    ([k, d] shared, or [B, k, d] per row). Differentiable in `prefix` and in the encoder's weights."""
    if prefix is None or prefix.shape[-2] == 0:
        return text_encoder(ids.to(text_encoder.device))[0]
    k = prefix.shape[-2]

    def put(module, args, output: Tensor) -> Tensor:
        rows = prefix.to(output.dtype).expand(output.shape[0], k, output.shape[-1])
        return torch.cat([output[:, :1], rows, output[:, 1 + k:]], dim=1)

    handle = text_encoder.get_input_embeddings().register_forward_hook(put)
    try:
        return text_encoder(ids.to(text_encoder.device))[0]
    finally:
        handle.remove()


def nearest_tokens(text_encoder, prefix: Tensor, exclude: Sequence[int] = ()) -> Tensor:
    """Ids [.., k] of the vocabulary embeddings nearest (L2) to each soft token: the hard prompt a soft one
    projects to (UnlearnDiffAtk evaluates its attacks as such discrete prompts)."""
    table = text_encoder.get_input_embeddings().weight.detach()
    distances = torch.cdist(prefix.detach().to(table.dtype).reshape(-1, table.shape[1]), table)
    if exclude:
        distances[:, list(exclude)] = float("inf")
    return distances.argmin(-1).reshape(prefix.shape[:-1])
