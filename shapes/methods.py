"""Every erasure the pack has, applied to the shapes world through the same code paths users call on Stable
Diffusion: the closed-form methods compute an `Erasure` from the UNet's attn2 K/V weights and the model's own
text encoder (recipes.erase) and attach it with the diffusers adapter; SPM attaches a shipped membrane
(trained by `erasekit train-spm`, weights/shapes-spm) with per-sample Facilitated Transport; AdvUnlearn swaps in a
shipped text encoder (trained by `erasekit train-advunlearn`, weights/shapes-advunlearn); Geom-Erasing swaps in the
shipped data-removal UNet (trained by `erasekit train-geom --setting data`, weights/shapes-geom) and puts the concept's
name and location tokens in the negative prompt. `negative` is the baseline every erasure paper compares with: the
concept's name as the negative prompt.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from ..erasers import advunlearn, diffusers_adapter, spm
from ..erasers.closed_form import recipes
from ..erasers.erasure import Erasure
from ..erasers.geom import train as geom_train
from ..erasers.spm import hooks as spm_diffusers
from . import data, metrics
from .model import CONTEXT_DIM, GUIDANCE, SAMPLE_STEPS, WEIGHTS_DIR, ShapesPipeline

ORIGINAL = "original"
CLOSED_FORM = ("uce", "rece", "trce")
SPM = "spm"
ADVUNLEARN = "advunlearn"
NEGATIVE = "negative"
GEOM = "geom"
METHODS = (ORIGINAL, NEGATIVE, *CLOSED_FORM, SPM, ADVUNLEARN, GEOM)
PRIOR_CAPTIONS = 500
MEMBRANES_DIR = WEIGHTS_DIR.parent / "shapes-spm"
ENCODERS_DIR = WEIGHTS_DIR.parent / "shapes-advunlearn"
GEOM_DIR = WEIGHTS_DIR.parent / "shapes-geom"
# The world draws its stamps in the four corners (data.py), so those are the cells its negative names.
GEOM_CELLS = (0, 2, 6, 8)


class UnknownMethodError(ValueError):
    pass


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UnknownMethodError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")


def world_captions(n: int = PRIOR_CAPTIONS, seed: int = 12345, without: str | None = None) -> list[str]:
    """Captions from the training distribution (no empty ones): the shapes world's stand-in for COCO; `without` a
    concept: only those of images that do not show it (so none names it by any synonym)."""
    rng = np.random.default_rng(seed)
    concept = metrics.parse_concept(without) if without else None
    return [data.caption(spec, rng, dropout=0.0) for spec in data.sample_specs(rng, n)
            if concept is None or getattr(spec, concept.kind) != concept.name]


def closed_form_erasure(pipe: ShapesPipeline, method: str, concept: str, prior=None) -> Erasure:
    """`concept` is the word(s) to erase, e.g. "circle"; RECE uses its "object" preset, TRCE a caption prior."""
    encode = pipe.encoder()
    opts = recipes.EraseOptions(method=method, concepts=[concept],
                                     preset="object" if method == "rece" else None)
    if method == "trce" and prior is None:
        prior = recipes.caption_prior(encode, world_captions())
    kv = diffusers_adapter.unet_kv_weights(pipe)
    return recipes.erase({k: v.detach() for k, v in kv.items()}, encode, "shapes", opts, prior=prior)


def shipped_membranes() -> list[str]:
    return sorted(p.stem for p in MEMBRANES_DIR.glob("*.safetensors"))


def shipped_encoders() -> list[str]:
    return sorted(p.parent.name for p in ENCODERS_DIR.glob("*/config.json"))


def spm_contexts(concept: str) -> list[str]:
    """Prompt templates SPM trains a shapes-world membrane on: every canonical prompt that names `concept`, with
    the concept's word as "{}" ("a red striped {}" for circle). A membrane trained on the bare word does not
    erase here (spm_train.prompt_settings says why)."""
    parsed = metrics.parse_concept(concept)
    if parsed.kind == "stamp":
        raise ValueError("the stamp is implicit (no prompt names it), so there is no word for an SPM membrane to "
                         "act on; erase it with a negative prompt (Geom-Erasing) instead")
    return [" ".join("{}" if word == parsed.name else word for word in prompt.split())
            for prompt in metrics.naming_prompts(parsed)]


def shipped_geom() -> list[str]:
    return sorted(p.stem.replace("-", " ") for p in GEOM_DIR.glob("*.safetensors"))


def unavailable(method: str, concept: str) -> str | None:
    """Why `method` cannot erase `concept` in this world, or None."""
    if method not in (SPM, ADVUNLEARN, GEOM):
        return None
    implicit = concept.strip().lower() in metrics.STAMP_NAMES
    if implicit and method != GEOM:
        return (f"the stamp is implicit (no prompt names it), so {method} has no word to train on; Geom-Erasing "
                f"({GEOM!r}) removes it")
    if method == GEOM:
        if not implicit:
            return (f"Geom-Erasing removes implicit concepts, which no prompt names (here the stamp); {concept!r} is "
                    "named by its prompts, so the other methods erase it")
        shipped, command = shipped_geom(), "erasekit train-geom --setting data --out DIR"
    elif method == SPM:
        shipped, command = shipped_membranes(), f"erasekit train-spm --target {concept} --out {concept}.safetensors"
    else:
        shipped, command = shipped_encoders(), f"erasekit train-advunlearn --concept {concept} --out {concept}"
    if ("stamp" if implicit else concept) in shipped:
        return None
    return f"no shipped {method} file for {concept!r} (shipped: {', '.join(shipped) or 'none'}); train one: {command}"


@contextmanager
def erased(pipe: ShapesPipeline, method: str, concept: str, prior=None) -> Iterator[Erasure | spm.Membrane | None]:
    """The pipeline with `method` erasing `concept` for the duration of the block; restored exactly after."""
    check_methods([method])
    if method == ORIGINAL:
        yield None
        return
    reason = unavailable(method, concept)
    if reason:
        raise UnknownMethodError(reason)
    if method == SPM:
        membrane = spm.load_membrane(MEMBRANES_DIR / f"{concept}.safetensors")
        spm_diffusers.attach_membranes(pipe, [membrane])
        try:
            yield membrane
        finally:
            spm_diffusers.detach_membranes(pipe)
        return
    if method in (NEGATIVE, GEOM):
        with _negative_erasure(pipe, method, concept):
            yield None
        return
    if method == ADVUNLEARN:
        encoder = advunlearn.load_advunlearn(ENCODERS_DIR / concept, width=CONTEXT_DIM)
        advunlearn.swap_text_encoder(pipe, encoder)
        try:
            yield None
        finally:
            advunlearn.restore_text_encoder(pipe)
        return
    erasure = closed_form_erasure(pipe, method, concept, prior)
    diffusers_adapter.attach(pipe, erasure)
    try:
        yield erasure
    finally:
        diffusers_adapter.detach(pipe)


@contextmanager
def _negative_erasure(pipe: ShapesPipeline, method: str, concept: str) -> Iterator[None]:
    """The concept's name as the pipeline's negative; for Geom-Erasing the name it was trained under followed by the
    location tokens of the corners, with the data-removal UNet in place of the pipeline's."""
    unet, negative = pipe.unet, pipe.negative_context
    if method == GEOM:
        pipe.unet, tokens = geom_train.load_data_removal(GEOM_DIR)
        pipe.negative_context = geom_train.encode_negative(pipe, tokens.concept, tokens, GEOM_CELLS)
    else:
        pipe.negative_context = pipe.encode([concept])
    try:
        yield
    finally:
        pipe.unet, pipe.negative_context = unet, negative


def generator(pipe: ShapesPipeline, steps: int = SAMPLE_STEPS,
              guidance: float = GUIDANCE) -> Callable[[list[str], list[int]], np.ndarray]:
    return lambda prompts, seeds: pipe(prompts, seeds, steps=steps, guidance=guidance)
