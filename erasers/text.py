"""Text side of the erasures: encoding concepts, and which token embeddings enter an edit.

An encoder maps prompts to `Encoded`: the cross-attention context the UNet sees ([B, 77, n], exactly what the
model's own pipeline feeds attn2) and each prompt's number of word tokens (without BOS/EOS). Any framework can
provide one: `TransformersEncoder` here, ComfyUI's CLIP in nodes/comfy_adapter.py.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CONTEXT_TOKENS = 77
WORD_WINDOW = CONTEXT_TOKENS - 2


class TruncationWarning(UserWarning):
    """A concept is longer than CLIP's 75-token window; the rest was cut."""


@dataclass
class Encoded:
    embeddings: torch.Tensor  # [B, 77, n] float32
    lengths: list[int]  # word tokens per prompt (BOS at 0, last word token at index `length`)

    def last_word_token(self, i: int) -> torch.Tensor:
        """UCE 2025: the last word token (index attention_mask.sum() − 2); BOS for an empty prompt."""
        return self.embeddings[i, self.lengths[i]: self.lengths[i] + 1]

    def first_eot(self, i: int) -> torch.Tensor:
        """TRCE: the first end-of-text token."""
        return self.embeddings[i, self.lengths[i] + 1: self.lengths[i] + 2]

    def sequence(self, i: int) -> torch.Tensor:
        """RECE: all 77 positions."""
        return self.embeddings[i]


def suffix_pair(concept: Encoded, i: int, guide: Encoded, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UCE 2023 (the start of RECE's released models): from each sentence's last word token to the end of the
    sequence, both cut to the same length 77 − max(last indices), so position k of one aligns with k of the other."""
    a, b = concept.lengths[i], guide.lengths[j]
    keep = CONTEXT_TOKENS - max(a, b)
    return concept.embeddings[i, a: a + keep], guide.embeddings[j, b: b + keep]


Encoder = Callable[[Sequence[str]], Encoded]
BATCH_SIZE = 32  # prompts per text-encoder call: 32×77 tokens, far from a GPU's memory, ~30× fewer calls


def encode_each(items: Sequence, encode_batch: Callable[[Sequence], Encoded], batch_size: int = BATCH_SIZE,
                progress: Callable[[int, int], None] | None = None, seconds: float | None = None) -> Encoded:
    """`items` encoded up to `batch_size` at a time by `encode_batch`, joined in order. `progress(done, total)` runs
    after each batch; it may raise to stop the work between batches (ComfyUI's interrupt).

    `seconds`: a target time per batch, so that a stop comes within about that on any device. Batches then start at
    one item, double while one takes under half the target (up to `batch_size`) and halve when one takes longer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    embeddings, lengths = [], []
    size, done = (1 if seconds else batch_size), 0
    while done < len(items):
        started = time.perf_counter()
        part = encode_batch(items[done:done + size])
        embeddings.append(part.embeddings)
        lengths.extend(part.lengths)
        done = min(done + size, len(items))
        if progress is not None:
            progress(done, len(items))
        if seconds:
            size = _next_size(size, time.perf_counter() - started, seconds, batch_size)
    if not embeddings:
        raise ValueError("no prompts to encode")
    return Encoded(torch.cat(embeddings), lengths)


def _next_size(size: int, elapsed: float, seconds: float, most: int) -> int:
    if elapsed < seconds / 2:
        return min(size * 2, most)
    if elapsed > seconds:
        return max(size // 2, 1)
    return size


def warn_truncated(prompt: str, tokens: int, cut_text: str) -> None:
    warnings.warn(
        f"concept {prompt[:60]!r}... has {tokens} tokens; CLIP reads {WORD_WINDOW}, so the last "
        f"{tokens - WORD_WINDOW} were cut: {cut_text!r}. Shorten it.",
        TruncationWarning,
        stacklevel=3,
    )


class TransformersEncoder:
    """Encoder over transformers CLIP models, as diffusers' pipelines encode prompts.

    SD1.x/SD2.x: the last hidden state (with the final layer norm) of one CLIPTextModel. SDXL: the penultimate
    hidden states of CLIP-L and OpenCLIP-G, concatenated (2048 wide). Word counts come from the first tokenizer.
    """

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence, penultimate: bool = False):
        if len(tokenizers) != len(text_encoders):
            raise ValueError("one tokenizer per text encoder")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.penultimate = penultimate

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Encoded:
        prompts = list(prompts)
        outputs, lengths = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            full = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            batch = tokenizer(prompts, padding="max_length", max_length=CONTEXT_TOKENS, truncation=True,
                              return_tensors="pt")
            if lengths is None:
                for prompt, ids in zip(prompts, full):
                    if len(ids) > WORD_WINDOW:
                        warn_truncated(prompt, len(ids), tokenizer.decode(ids[WORD_WINDOW:]))
                lengths = [min(len(ids), WORD_WINDOW) for ids in full]
            device = next(encoder.parameters()).device
            result = encoder(batch.input_ids.to(device), output_hidden_states=self.penultimate)
            hidden = result.hidden_states[-2] if self.penultimate else result[0]
            outputs.append(hidden.float().cpu())
        return Encoded(torch.cat(outputs, dim=-1), lengths)
