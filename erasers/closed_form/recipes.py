"""From concept words to an Erasure with UCE, RECE or TRCE stage 1: token selection, prompt templates, defaults.

The equations are in solve.py; this module decides which text goes in, as each official code does, and
records everything needed to reproduce the edit in the erasure's metadata.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..erasure import Erasure, fingerprint
from ..errors import InputError
from ..families import kv_family
from ..text import Encoded, Encoder, suffix_pair
from . import solve

METHODS = ("uce", "rece", "trce")

# UCE's --expand_prompts / --add_prompts templates (same five in the 2023 and 2025 code).
TEMPLATES = {
    "object": ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
    "art": ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
}
# Sentence frames for TRCE's augmentation (ours; the official list has 15 of the same kind).
TRCE_FRAMES = (
    "{}", "a photo of {}", "an image of {}", "a picture showing {}", "a painting of {}", "a drawing of {}",
    "a close-up photo of {}", "a digital illustration of {}", "a cinematic still of {}", "a sketch of {}",
    "a black and white photo of {}", "a scene with {}", "an artwork depicting {}", "a portrait of {}",
    "a detailed rendering of {}",
)

# RECE's per-concept-family defaults (README and scripts of the official code).
RECE_PRESETS = {
    "nudity": {"reg": 0.1, "epochs": 3, "guide": ""},
    "unsafe": {"reg": 0.1, "epochs": 2, "guide": ""},
    "art": {"reg": 1e-3, "epochs": 1, "guide": "art"},
    "object": {"reg": 0.1, "epochs": 1, "guide": ""},
    "object-difficult": {"reg": 1e-3, "epochs": 1, "guide": ""},
}


@dataclass
class EraseOptions:
    method: str = "uce"
    concepts: list[str] = field(default_factory=list)
    guide: list[str] = field(default_factory=list)  # one for all, or one per concept; default "" (or preset's)
    preserve: list[str] = field(default_factory=list)
    # UCE
    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float | None = None  # UCE-2025: 1; UCE-2023: max(0.1, 1/|[""] + preserve|)
    technique: str = "replace"
    tokens: str = "last"  # "last" (UCE 2025) or "suffix" (UCE 2023, RECE's starting point)
    expand: str | None = None  # "object" or "art": add UCE's five prompt templates per concept
    # RECE
    preset: str | None = None  # nudity | unsafe | art | object | object-difficult
    epochs: int | None = None
    reg: float | None = None  # λ_r
    rece_lam: float = 0.1  # λ₁
    rece_preserve_scale: float = 0.1  # λ₂
    variant: str = "regzero"
    # TRCE stage 1
    trce_preserve_scale: float = 0.01
    frames: int = 15
    eot: str = "tokens"  # "tokens": the true first EoT; "words": the official word-count position (quirk)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        concepts = [c for c in self.concepts if c.strip()]
        if not concepts:
            raise ValueError("no concept to erase: give at least one non-empty concept")
        if len(self.guide) not in (0, 1, len(concepts)):
            raise ValueError(f"{len(self.guide)} guide concepts for {len(concepts)} erased concepts: give one guide "
                             "for all, or one per concept")
        if self.tokens not in ("last", "suffix"):
            raise ValueError(f"unknown token selection {self.tokens!r}: use 'last' (UCE 2025) or 'suffix' (UCE 2023)")
        if self.expand not in (None, *TEMPLATES):
            raise ValueError(f"unknown prompt expansion {self.expand!r}: use 'object' or 'art'")
        if self.preset is not None and self.preset not in RECE_PRESETS:
            raise ValueError(f"unknown RECE preset {self.preset!r}: use one of {', '.join(RECE_PRESETS)}")
        if self.lam <= 0:
            raise ValueError(f"λ must be > 0, got {self.lam}")
        if self.eot not in ("tokens", "words"):
            raise ValueError(f"unknown EoT position {self.eot!r}: use 'tokens' or 'words'")
        self._refuse_no_ops(concepts)

    def _refuse_no_ops(self, concepts: list[str]) -> None:
        """An erased concept that is its own guide is mapped onto itself, and one that is also preserved is held
        where it is: either way the erasure changes nothing for it, so it is refused rather than written."""
        guides = self.guide or ([RECE_PRESETS[self.preset]["guide"]] if self.preset else [])
        for i, concept in enumerate(concepts):
            guide = guides[0] if len(guides) == 1 else guides[i] if guides else ""
            if _same_text(concept, guide):
                raise InputError(key="guide", expected="a guide other than the concept it replaces",
                                 found=f"concept {concept!r} with guide {guide!r}",
                                 fix="an erasure onto itself changes nothing: give another guide (the empty prompt "
                                     "is the default)")
            preserved = [p for p in self.preserve if _same_text(concept, p)]
            if preserved:
                raise InputError(key="preserve", expected="preserved concepts other than the erased ones",
                                 found=f"{concept!r} both erased and preserved (as {preserved[0]!r})",
                                 fix="a concept held in place cannot be erased: drop it from the preserved ones")


def _same_text(a: str, b: str) -> bool:
    """Equal after case and runs of whitespace are ignored, as the tokenizer ignores them."""
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _guides(opts: EraseOptions, concepts: list[str], default: str) -> list[str]:
    if not opts.guide:
        return [default] * len(concepts)
    return list(opts.guide) * len(concepts) if len(opts.guide) == 1 else list(opts.guide)


def _expanded(opts: EraseOptions, concepts: list[str], guides: list[str]) -> tuple[list[str], list[str]]:
    if opts.expand is None:
        return concepts, guides
    out_c, out_g = list(concepts), list(guides)
    for concept, guide in zip(concepts, guides):
        for template in TEMPLATES[opts.expand]:
            out_c.append(template.format(concept))
            out_g.append(template.format(guide))
    return out_c, out_g


def _uce_pairs(opts: EraseOptions, encode: Encoder, concepts: list[str], guides: list[str]) -> solve.Pairs:
    enc_c, enc_g = encode(concepts), encode(guides)
    pairs = solve.Pairs()
    for i in range(len(concepts)):
        if opts.tokens == "last":
            pairs.add(enc_c.last_word_token(i), enc_g.last_word_token(i))
        else:
            pairs.add(*suffix_pair(enc_c, i, enc_g, i))
    return pairs


def _uce_preserve(opts: EraseOptions, encode: Encoder) -> tuple[torch.Tensor | None, float]:
    if opts.tokens == "last":
        if not opts.preserve:
            return None, 1.0 if opts.preserve_scale is None else opts.preserve_scale
        enc = encode(opts.preserve)
        keys = torch.cat([enc.last_word_token(i) for i in range(len(opts.preserve))])
        return keys, 1.0 if opts.preserve_scale is None else opts.preserve_scale
    texts = [""] + list(opts.preserve)  # UCE 2023 always preserves the empty prompt, all 77 positions
    enc = encode(texts)
    scale = max(0.1, 1 / len(texts)) if opts.preserve_scale is None else opts.preserve_scale
    return enc.embeddings.reshape(-1, enc.embeddings.shape[-1]), scale


def erase(kv_weights: Mapping[str, torch.Tensor], encode: Encoder, family: str, opts: EraseOptions,
          progress: Callable[[int, int], None] | None = None,
          prior: torch.Tensor | None = None) -> Erasure:
    """Compute an erasure. `kv_weights`: every attn2 to_k/to_v weight by diffusers parameter name
    (``....attn2.to_k.weight``).

    TRCE needs `prior` (see `caption_prior`).
    """
    opts.validate()
    concepts = [c.strip() for c in opts.concepts if c.strip()]
    preset = RECE_PRESETS.get(opts.preset or "", {})
    guides = _guides(opts, concepts, preset.get("guide", ""))
    kv_family(kv_weights)  # one context width, a known family
    if opts.method == "trce":
        if prior is None:
            raise ValueError("TRCE needs the prior-preservation statistics (caption_prior) of this text encoder")
        edit = _trce(kv_weights, encode, concepts, guides, opts, prior)
    else:
        c_all, g_all = _expanded(opts, concepts, guides)
        preserve, preserve_scale = _uce_preserve(opts, encode)
        edit = solve.uce(kv_weights, _uce_pairs(opts, encode, c_all, g_all), lam=opts.lam,
                               erase_scale=opts.erase_scale, preserve=preserve, preserve_scale=preserve_scale,
                               technique=opts.technique)
        if opts.method == "rece":
            _rece(edit, encode, concepts, guides, opts, preset, progress)
    params = {k: v for k, v in asdict(opts).items() if k not in ("concepts", "guide", "preserve")}
    return Erasure(
        layers=edit.layers(),
        method=opts.method,
        family=family,
        concepts=concepts,
        guide=guides,
        preserve=list(opts.preserve),
        params=params,
        base_fingerprint=fingerprint(kv_weights),
    )


def _rece(edit: solve.KVEdit, encode: Encoder, concepts: list[str], guides: list[str], opts: EraseOptions,
          preset: dict, progress) -> None:
    epochs = opts.epochs if opts.epochs is not None else preset.get("epochs", 1)
    reg = opts.reg if opts.reg is not None else preset.get("reg", 0.1)
    enc_c = encode(concepts)
    # The official code replaces an empty guide by " ", which CLIP tokenises to nothing: the same as "".
    enc_g = encode(guides)
    enc_r = encode([" "] * len(concepts))  # RECE's retain set: one " " per concept
    solve.rece(
        edit, [enc_c.sequence(i) for i in range(len(concepts))], [enc_g.sequence(i) for i in range(len(concepts))],
        epochs=epochs, reg=reg, lam=opts.rece_lam, erase_scale=opts.erase_scale,
        retain=enc_r.embeddings.reshape(-1, enc_r.embeddings.shape[-1]), preserve_scale=opts.rece_preserve_scale,
        variant=opts.variant, technique=opts.technique, progress=progress,
    )


def _eot(enc: Encoded, i: int, text: str, opts: EraseOptions) -> torch.Tensor:
    if opts.eot == "words":  # the official code's proxy: whitespace words + 1
        index = min(len(text.split()) + 1, enc.embeddings.shape[1] - 1)
        return enc.embeddings[i, index: index + 1]
    return enc.first_eot(i)


def _trce(kv_weights, encode: Encoder, concepts: list[str], guides: list[str], opts: EraseOptions,
          prior: torch.Tensor) -> solve.KVEdit:
    malicious, safe = [], []
    for concept, guide in zip(concepts, guides):
        for frame in TRCE_FRAMES[: max(1, opts.frames)]:
            malicious.append(frame.format(concept))
            safe.append(frame.format(guide) if guide else frame.format("").strip())
    enc_m, enc_s = encode(malicious), encode(safe)
    keys = torch.cat([_eot(enc_m, i, t, opts) for i, t in enumerate(malicious)])
    values = torch.cat([_eot(enc_s, i, t, opts) for i, t in enumerate(safe)])
    return solve.trce_stage1(kv_weights, keys, values, prior=prior, preserve_scale=opts.trce_preserve_scale)


def caption_prior(encode: Encoder, captions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Per-caption mean of Σₜ eₜeₜᵀ over all 77 token embeddings of each caption (TRCE's prior statistics)."""
    total = None
    for start in range(0, len(captions), batch_size):
        emb = encode(captions[start:start + batch_size]).embeddings.double()
        flat = emb.reshape(-1, emb.shape[-1])
        part = flat.T @ flat
        total = part if total is None else total + part
    return (total / len(captions)).float()
