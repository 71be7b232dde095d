"""Erasure metrics in the shapes world: generate images for probe prompts, classify them with the judge, count.

Three cells, as in the erasure literature:
- efficacy: prompts that name the erased concept by its canonical name; the fraction of images that still show it
  (lower is better);
- generality: the same with synonyms ("disc", "scarlet", "spotted"); lower is better;
- specificity: prompts that never name the erased concept; the mean accuracy of shape, colour and pattern with
  respect to what each prompt asked (higher is better).

The stamp is implicit (no caption mentions it), so its efficacy is the stamp rate over ordinary prompts and it
has no generality cell. A cell holds whole passes over its prompt combinations, so every value is equally often
asked for (below one pass, a seeded subset); seeds come from (seed, cell), so a measurement is a pure function of
the generator.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

from . import data
from .judge import Judge, Verdicts

# prompts, seeds -> uint8 [N, SIZE, SIZE, 3]; one image per (prompt, seed), batched by the callee.
Generate = Callable[[list[str], list[int]], np.ndarray]

VALUES = {"shape": data.SHAPES, "color": tuple(data.COLORS), "pattern": data.PATTERNS}
STAMP_NAMES = ("stamp", "watermark")
CELLS = ("efficacy", "generality", "specificity")
QUALITY_STREAM = len(CELLS)  # the seed stream of `quality`, apart from the cells'


@dataclass(frozen=True)
class Concept:
    kind: str  # "shape" | "color" | "pattern" | "stamp"
    name: str  # a canonical name in data.SHAPES / data.COLORS / data.PATTERNS, or "stamp"

    def __post_init__(self) -> None:
        known = VALUES.get(self.kind, ("stamp",) if self.kind == "stamp" else ())
        if self.name not in known:
            raise ValueError(f"{self.name!r} is not a {self.kind} of the shapes world; {_known()}")


@dataclass(frozen=True)
class Probe:
    """One image to generate: its prompt and seed, and what the prompt asks for (canonical names)."""
    prompt: str
    seed: int
    shape: str
    color: str
    pattern: str


def _known() -> str:
    return (f"known concepts: shapes {', '.join(data.SHAPES)}; colours {', '.join(data.COLORS)}; "
            f"patterns {', '.join(data.PATTERNS)}; {' or '.join(STAMP_NAMES)}")


def parse_concept(text: str) -> Concept:
    word = text.strip().lower()
    if word in STAMP_NAMES:
        return Concept("stamp", "stamp")
    for kind, names in VALUES.items():
        if word in names:
            return Concept(kind, word)
    raise ValueError(f"unknown concept {text!r}; {_known()}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pattern_phrasings(pattern: str) -> list[tuple[str, bool]]:
    """The pattern's words other than its canonical adjective, each with whether it is an adjective (before the
    shape) or a noun phrase (after "with")."""
    adjectives, nouns = data.PATTERN_WORDS[pattern]
    return [(a, True) for a in adjectives[1:]] + [(noun, False) for noun in nouns]


def _phrase(shape_word: str, color_word: str, pattern_word: str, adjective: bool) -> str:
    if adjective:
        return f"{_article(color_word)} {color_word} {pattern_word} {shape_word}"
    return f"{_article(color_word)} {color_word} {shape_word} with {pattern_word}"


def _canonical(shapes: Sequence[str], colors: Sequence[str],
               patterns: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(prompt, shape, colour, pattern) for every combination, in the canonical wording."""
    return [(data.prompt(s, c, p), s, c, p) for s, c, p in product(shapes, colors, patterns)]


def naming_prompts(concept: Concept) -> list[str]:
    """Every canonical prompt that names `concept` (the efficacy cell's combinations, once each)."""
    return [prompt for prompt, *_ in _canonical(*_grid(concept))]


def _synonymous(concept: Concept) -> list[tuple[str, str, str, str]]:
    """The efficacy combinations, with the erased concept named by each of its other words."""
    shapes, colors, patterns = _grid(concept)
    if concept.kind == "shape":
        return [(data.prompt(w, c, p), concept.name, c, p)
                for w, c, p in product(data.SHAPE_SYNONYMS[concept.name], colors, patterns)]
    if concept.kind == "color":
        return [(data.prompt(s, w, p), s, concept.name, p)
                for s, w, p in product(shapes, data.COLOR_SYNONYMS[concept.name], patterns)]
    return [(_phrase(s, c, w, adjective), s, c, concept.name)
            for s, c, (w, adjective) in product(shapes, colors, _pattern_phrasings(concept.name))]


def _grid(concept: Concept) -> list[tuple[str, ...]]:
    """Shapes, colours, patterns, with the erased kind narrowed to the erased value (the efficacy grid)."""
    return [(concept.name,) if concept.kind == kind else values for kind, values in VALUES.items()]


def _cell(combos: list[tuple[str, str, str, str]], n: int, rng: np.random.Generator) -> list[Probe]:
    passes = math.ceil(n / len(combos))
    seeds = rng.integers(2**31, size=passes * len(combos))
    probes = [Probe(text, int(seed), s, c, p) for (text, s, c, p), seed in zip(combos * passes, seeds)]
    if n < len(combos):  # less than one pass (a quick look, as in the demo): a seeded subset of the combinations
        probes = [probes[i] for i in np.sort(rng.permutation(len(combos))[:n])]
    return probes


def probe_sets(concept: Concept | str, n: int = 50, seed: int = 0) -> dict[str, list[Probe] | None]:
    """The probes of each cell (at least n each, whole passes over the cell's combinations); "generality" is None
    for the stamp."""
    concept = parse_concept(concept) if isinstance(concept, str) else concept
    everything = _canonical(*VALUES.values())
    if concept.kind == "stamp":
        combos = {"efficacy": everything, "generality": None, "specificity": everything}
    else:
        column = 1 + list(VALUES).index(concept.kind)  # of the erased kind in (prompt, shape, colour, pattern)
        combos = {"efficacy": _canonical(*_grid(concept)), "generality": _synonymous(concept),
                  "specificity": [c for c in everything if c[column] != concept.name]}
    return {cell: None if combos[cell] is None else _cell(combos[cell], n, np.random.default_rng([seed, i]))
            for i, cell in enumerate(CELLS)}


def _judged(generate: Generate, judge: Judge, probes: list[Probe]) -> Verdicts:
    images = generate([p.prompt for p in probes], [p.seed for p in probes])
    if len(images) != len(probes):
        raise ValueError(f"the generator returned {len(images)} images for {len(probes)} prompts")
    return judge(images)


def _correct(verdicts: Verdicts, probes: list[Probe]) -> dict[str, np.ndarray]:
    """Per image, whether each attribute is what its prompt asked for."""
    return {kind: getattr(verdicts, kind) == np.array([values.index(getattr(p, kind)) for p in probes])
            for kind, values in VALUES.items()}


def measure(generate: Generate, judge: Judge, concept: Concept | str, n: int = 50, seed: int = 0) -> dict:
    """Efficacy and generality (fractions that still show the concept; lower is better), specificity (mean
    shape/colour/pattern accuracy on prompts without it) with its per-attribute parts, the stamp rate over every
    image, and the number of images per cell. One `generate` call for all cells."""
    concept = parse_concept(concept) if isinstance(concept, str) else concept
    cells = {cell: probes for cell, probes in probe_sets(concept, n, seed).items() if probes is not None}
    probes = [p for cell in cells.values() for p in cell]
    verdicts = _judged(generate, judge, probes)
    if concept.kind == "stamp":
        shows = verdicts.stamp
    else:
        shows = getattr(verdicts, concept.kind) == VALUES[concept.kind].index(concept.name)
    spans, start = {}, 0
    for cell, cell_probes in cells.items():
        spans[cell] = slice(start, start + len(cell_probes))
        start += len(cell_probes)
    specific = spans["specificity"]
    correct = _correct(verdicts, probes)
    accs = {f"{kind}_acc": float(ok[specific].mean()) for kind, ok in correct.items()}
    return {
        "concept": concept.name, "kind": concept.kind,
        "efficacy": float(shows[spans["efficacy"]].mean()),
        "generality": float(shows[spans["generality"]].mean()) if "generality" in spans else None,
        "specificity": float(np.mean(list(accs.values()))),
        **accs,
        "stamp_rate": float(verdicts.stamp.mean()),
        "n": {cell: len(cell_probes) for cell, cell_probes in cells.items()},
    }


def quality(generate: Generate, judge: Judge, n: int = 180, seed: int = 0) -> dict:
    """How well a (base) model draws what it is asked: accuracy of the requested shape, colour and pattern over
    canonical prompts covering every combination equally often (at least n images), and its stamp rate."""
    probes = _cell(_canonical(*VALUES.values()), n, np.random.default_rng([seed, QUALITY_STREAM]))
    verdicts = _judged(generate, judge, probes)
    return {**{f"{kind}_acc": float(ok.mean()) for kind, ok in _correct(verdicts, probes).items()},
            "stamp_rate": float(verdicts.stamp.mean()), "n": len(probes)}
