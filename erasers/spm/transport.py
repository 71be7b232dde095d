"""Facilitated Transport (FT) of SPM: the per-sample gate that scales each membrane by how close a prompt is to the
concepts it erases (methods.md §1.4), for the diffusers adapter (hooks.py) and the ComfyUI one
(nodes/membrane_adapter.py) alike. Torch only.

The gate of membrane i for a UNet context row is ``ft_i · m_i``: m_i the user's strength, ft_i (when FT is on for
it) the maximum over its concepts of max(clipcos, tokenuni) (`transport_strengths`). clipcos needs only the row;
tokenuni needs the prompt's token ids, which the UNet never sees. So each adapter records, as its text encoder
runs, which token ids made which context (a `TokenRecord`), and a `Transport` looks each row the UNet receives up
in it. The adapters keep only their framework glue: how token ids are read from their text encoder (a forward hook
on the pipeline's text encoder and `token_sets`; wrapped CLIP encoders and ComfyUI's tokens) and how the context
reaches `Transport.gates` (a UNet pre-hook; an object patch on ``diffusion_model.forward``).

The rules, the same on both sides:
- Recording: a row is known by a content hash (`row_keys`) of the row as encoded, in every dtype a model may cast
  the context to (float32, float16, bfloat16).
- Lookup (`TokenRecord.find`): a row is found as recorded; or by its first `width` columns (SDXL's 2048-wide rows
  by the CLIP-L part that a diffusers pipeline's first text encoder makes); or as a repetition along tokens of a
  recorded context (ComfyUI repeats a 77-token context to the length of a longer prompt it is batched with). An
  all-zero row is the empty prompt (SDXL pipelines' force_zeros_for_empty_prompt, ComfyUI's ConditioningZeroOut):
  no tokens, which is known, not unknown. Anything else is unknown: scored by clipcos alone, and the adapter's
  warning is given once per Transport.
- Scoring: clipcos compares the row's first chunk (the concepts' length, 77 tokens) as the UNet receives it (cast,
  and for SDXL both towers), with the concepts; the token overlap counts every chunk's ids.
- Caches: the strengths per distinct row hash, so a prompt is scored once however many steps and batches it is in;
  rows of unknown tokens are not kept, since their prompt may be encoded by a recording encoder later and must
  then get its token overlap. On top, the last context tensor is reused by identity and version: a sampler passes
  the same tensor each step and its rows need not be copied to the host and hashed again; an in-place change bumps
  the version. Inference tensors (ComfyUI samples in inference mode) track no version, so they are always hashed
  (then found in the row cache). A result with unknown rows is reused only while the record is unchanged. Each
  cache starts afresh beyond CACHE_LIMIT entries.

Where the two adapters' former copies differed, this keeps: not caching unknown rows (the ComfyUI rule: the
diffusers one kept a clipcos-only gate for a prompt recorded later); repetitions and the first chunk (ComfyUI; a
diffusers pipeline given such a context failed on the shape); all-zero rows as the empty prompt (diffusers;
ComfyUI gave the same gate, 0, but warned and scored them again each call); identity + version reuse (diffusers,
now also for ComfyUI's non-inference tensors); clearing a full row cache before reading it (diffusers; ComfyUI
cleared it between reading and using it, losing the rows it had just found there).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..text import Encoder

if TYPE_CHECKING:
    from .membrane import Membrane

Metric = Literal["clipcos_tokenuni", "clipcos", "tokenuni"]
CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what a model may cast a context to
CACHE_LIMIT = 100_000  # entries per cache; beyond it the cache starts afresh (a few MB)


def row_keys(rows: Tensor) -> list[bytes]:
    """A content hash per row (first dim) of `rows`, tagged with dtype and shape: how an adapter recognises, inside
    the UNet, a context row its text encoder produced (and so knows the row's token ids)."""
    rows = rows.detach().to("cpu").contiguous()
    tag = f"{rows.dtype}{tuple(rows.shape[1:])}".encode()
    data = rows.reshape(rows.shape[0], -1).view(torch.uint8).numpy()
    return [hashlib.blake2b(tag + row.tobytes(), digest_size=16).digest() for row in data]


def token_sets(input_ids: Tensor | Sequence[Sequence[int]], special_ids: Collection[int]) -> list[frozenset[int]]:
    """Per prompt, its token ids (of the padded sequence) without the special tokens: T(p) in FT's token overlap."""
    rows = input_ids.tolist() if isinstance(input_ids, Tensor) else input_ids
    special = set(special_ids)
    return [frozenset(row) - special for row in rows]


@dataclass
class Concepts:
    """The erased concepts of a list of membranes, encoded once: what FT compares every prompt to."""

    contexts: Tensor  # [K, L, d] float32, each concept's padded context, as the UNet would see it
    tokens: list[frozenset[int]]  # T(c_k)
    owner: Tensor  # [K] index of the membrane concept k belongs to
    count: int  # number of membranes

    @classmethod
    def encode(cls, membranes: Sequence[Membrane], encoder: Encoder,
               tokenize: Callable[[Sequence[str]], list[frozenset[int]]]) -> "Concepts":
        texts = [c for m in membranes for c in m.concepts]
        tokens = tokenize(texts)
        empty = [t for t, s in zip(texts, tokens) if not s]
        if empty:
            raise ValueError(f"concept {empty[0]!r} has no word tokens; FT's token overlap divides by their number")
        owner = torch.tensor([i for i, m in enumerate(membranes) for _ in m.concepts])
        return cls(encoder(texts).embeddings.float(), tokens, owner, len(membranes))


@torch.no_grad()
def transport_strengths(contexts: Tensor, tokens: Sequence[frozenset[int] | None], concepts: Concepts,
                        metric: Metric = "clipcos_tokenuni") -> Tensor:
    """FT strengths [B, M] of M membranes for B prompts (methods.md §1.4), float32 on the CPU.

    clipcos = cosine of the flattened padded contexts of prompt and concept; tokenuni = |T(p) ∩ T(c)| / |T(c)|;
    "clipcos_tokenuni" takes their maximum; a membrane gets the maximum over its concepts. A prompt whose tokens
    are None (unknown) is scored by clipcos alone, whatever the metric.
    """
    if metric not in ("clipcos_tokenuni", "clipcos", "tokenuni"):
        raise ValueError(f"unknown FT metric {metric!r}: clipcos_tokenuni, clipcos or tokenuni")
    if contexts.shape[1:] != concepts.contexts.shape[1:]:
        raise ValueError(f"prompt contexts {tuple(contexts.shape[1:])} and concept contexts "
                         f"{tuple(concepts.contexts.shape[1:])} differ in shape: encode both with the same model")
    prompts = F.normalize(contexts.detach().float().cpu().flatten(1), dim=1, eps=1e-8)
    directions = F.normalize(concepts.contexts.flatten(1), dim=1, eps=1e-8)
    # Row by row: a prompt's gate must not depend on the prompts it is scored with (a GEMM over several rows rounds
    # differently from one over a single row, and an image would then depend on its batch or on the gate cache).
    clipcos = torch.stack([directions @ row for row in prompts]) if len(prompts) else prompts @ directions.T  # [B, K]
    # Only the concepts' tokens can overlap, so multi-hot vectors over their union give the overlap as a matmul.
    vocab = {t: j for j, t in enumerate(sorted(set().union(*concepts.tokens)))}
    concept_hot = torch.zeros(len(concepts.tokens), len(vocab))
    for k, toks in enumerate(concepts.tokens):
        concept_hot[k, [vocab[t] for t in toks]] = 1
    prompt_hot = torch.zeros(len(tokens), len(vocab))
    for b, toks in enumerate(tokens):
        prompt_hot[b, [vocab[t] for t in toks or () if t in vocab]] = 1
    tokenuni = prompt_hot @ concept_hot.T / concept_hot.sum(1)
    known = torch.tensor([t is not None for t in tokens])[:, None]
    if metric == "clipcos":
        score = clipcos
    elif metric == "tokenuni":
        score = torch.where(known, tokenuni, clipcos)
    else:
        score = torch.where(known, torch.maximum(clipcos, tokenuni), clipcos)
    strengths = torch.full((len(tokens), concepts.count), float("-inf"))
    return strengths.scatter_reduce(1, concepts.owner.expand_as(score), score, "amax")


class TokenRecord:
    """Context-row hash → the token ids of the prompt that made it, filled as a text encoder runs.

    `version` counts the additions, so a result computed while a row was unknown can tell it may be stale."""

    def __init__(self) -> None:
        self.ids: dict[bytes, frozenset[int]] = {}
        self.version = 0

    def add(self, contexts: Tensor, tokens: frozenset[int] | Sequence[frozenset[int]]) -> None:
        """Record the rows of `contexts` [B, L, d] (as made and as cast to each of CAST_DTYPES) under their
        prompts' token ids: one set per row, or one for every row."""
        if len(self.ids) > CACHE_LIMIT:
            self.ids.clear()
        sets = [tokens] * contexts.shape[0] if isinstance(tokens, frozenset) else list(tokens)
        contexts = contexts.detach()
        for dtype in CAST_DTYPES:
            self.ids.update(zip(row_keys(contexts.to(dtype)), sets))
        self.version += 1

    def find(self, rows: Tensor, width: int | None = None, chunk: int | None = None) -> list[frozenset[int] | None]:
        """The token ids of each context row [B, L, d] as the UNet gets it; None for a row no recorded context
        made (also one changed after encoding, e.g. by ConditioningConcat or ConditioningAverage).

        `width`: look rows up by their first `width` columns (what was recorded); `chunk`: the token length a
        repeated context is a repetition of a multiple of (ComfyUI's CONDCrossAttn.concat). An all-zero row is the
        empty prompt: no tokens."""
        looked_up = rows[..., :width] if width else rows
        empty = (~rows.flatten(1).any(1)).tolist()
        found: list[frozenset[int] | None] = []
        for row, key, zero in zip(looked_up, row_keys(looked_up), empty):
            tokens = frozenset() if zero else self.ids.get(key)
            if tokens is None and chunk:
                tokens = self._repeated(row, chunk)
            found.append(tokens)
        return found

    def _repeated(self, row: Tensor, chunk: int) -> frozenset[int] | None:
        length = row.shape[0]
        for size in (n * chunk for n in range(1, length // chunk)):
            if length % size == 0 and torch.equal(row, row[:size].repeat(length // size, 1)):
                tokens = self.ids.get(row_keys(row[None, :size])[0])
                if tokens is not None:
                    return tokens
        return None


Source = tuple[tuple[int, ...], ...]  # per row, the rows whose FT strengths it takes (their maximum)


@dataclass
class _Reused:
    """The last context a Transport gated: the tensor (held, so its identity cannot pass to another), its version,
    the record's version if some row was unknown (else None), its FT strengths [B, M] (1 for membranes without FT),
    its gates by device, and its gates by device and source (kept apart: the default path is one dict lookup)."""

    context: Tensor
    version: int
    record_version: int | None
    unit: Tensor
    gates: dict[torch.device, Tensor]
    paired: dict[tuple[torch.device, Source], Tensor]


class Transport:
    """FT for one set of membranes: the gates [B, M] of each row of a UNet context, with their caches.

    `strengths` [M] are the user's; `ft` [M] says which membranes FT gates (the others act at their strength for
    every sample); without `concepts` none is. `record` is where the adapter's text encoder records token ids,
    `width` the columns rows are looked up by there, `warn` what the adapter says, once, about an unknown row.
    """

    def __init__(self, concepts: Concepts | None, strengths: Sequence[float] | Tensor, record: TokenRecord | None,
                 warn: Callable[[], None] = lambda: None, ft: Sequence[bool] | None = None,
                 metric: Metric = "clipcos_tokenuni", width: int | None = None):
        if concepts is not None and record is None:
            raise ValueError("Facilitated Transport needs the token record its text encoder fills")
        self.concepts, self.record, self.warn, self.metric, self.width = concepts, record, warn, metric, width
        self.strengths = torch.as_tensor(strengths, dtype=torch.float32)
        self.ft = torch.ones(len(self.strengths), dtype=torch.bool) if ft is None else torch.tensor(list(ft))
        if self.ft.shape != self.strengths.shape or (concepts is not None and concepts.count != len(self.strengths)):
            raise ValueError(f"{len(self.strengths)} strengths for {len(self.ft)} FT flags and "
                             f"{concepts.count if concepts else 0} membranes' concepts")
        self.cache: dict[bytes, Tensor] = {}  # row hash → FT strengths [M] of a row whose tokens are known
        self.warned = False
        self._last: _Reused | None = None

    def gates(self, context: Tensor, device: torch.device | str | None = None, source: Source | None = None) -> Tensor:
        """Gates [B, M] (float32, on `device`, default the CPU) of each row of a UNet context [B, L, d].

        `source`: per row, the rows whose FT strengths it takes instead of its own (their maximum when several):
        infer_spm.py's gating of a CFG batch's unconditional rows by their positive prompt. None: each row its own.
        """
        device = torch.device(device or "cpu")
        if self.concepts is None:
            return self.strengths.expand(context.shape[0], -1).to(device)
        version = None if context.is_inference() else context._version
        last = self._last
        if last is None or version is None or last.context is not context or last.version != version or \
                last.record_version not in (None, self.record.version):
            unit, complete = self._compute(context)
            last = _Reused(context, version, None if complete else self.record.version, unit,
                           {torch.device("cpu"): unit * self.strengths}, {})
            self._last = last if version is not None else None
        if source is not None:
            key = (device, source)
            if key not in last.paired:
                last.paired[key] = self._paired(last.unit, source).to(device)
            return last.paired[key]
        if device not in last.gates:
            last.gates[device] = last.gates[torch.device("cpu")].to(device)
        return last.gates[device]

    def _paired(self, unit: Tensor, source: Source) -> Tensor:
        if len(source) != unit.shape[0] or not all(rows and all(0 <= r < len(unit) for r in rows) for rows in source):
            raise ValueError(f"a gate source per row of a batch of {len(unit)}, each naming rows of that batch, "
                             f"expected; found {source!r}")
        return torch.stack([unit[list(rows)].amax(0) for rows in source]) * self.strengths

    def _compute(self, context: Tensor) -> tuple[Tensor, bool]:
        """The FT strengths on the CPU (1 for membranes without FT), computing FT once per distinct row, and whether
        every row's tokens were known."""
        if len(self.cache) > CACHE_LIMIT:
            self.cache.clear()
        keys = row_keys(context)
        new = {key: b for b, key in enumerate(keys) if key not in self.cache}
        fresh: dict[bytes, Tensor] = {}
        complete = True
        if new:
            rows = context[list(new.values())]
            chunk = self.concepts.contexts.shape[1]
            tokens = self.record.find(rows, self.width, chunk)
            complete = None not in tokens
            if not complete and not self.warned:
                self.warned = True
                self.warn()
            fresh = dict(zip(new, transport_strengths(rows[:, :chunk], tokens, self.concepts, self.metric)))
            # A row without token ids is scored again next time: its prompt may be recorded meanwhile.
            self.cache.update((key, value) for (key, value), ids in zip(fresh.items(), tokens) if ids is not None)
        ft = torch.stack([self.cache[key] if key in self.cache else fresh[key] for key in keys])
        return torch.where(self.ft, ft, 1.0), complete
