"""The shipped shapes judge classifies fresh renders, and the erasure metrics give the known answers on image sets
built by rendering what (or what else) each prompt asks for."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch

from erasekit.shapes import data
from erasekit.shapes.judge import Judge, rendered
from erasekit.shapes.metrics import Concept, Generate, measure, parse_concept, probe_sets, quality

# Every word a prompt may use for an attribute, read independently of metrics.py's prompt building.
WORDS = {
    **{w: ("shape", s) for s in data.SHAPES for w in (s, *data.SHAPE_SYNONYMS[s])},
    **{w: ("color", c) for c in data.COLORS for w in (c, *data.COLOR_SYNONYMS[c])},
    **{w: ("pattern", p) for p, (adjectives, nouns) in data.PATTERN_WORDS.items() for w in (*adjectives, *nouns)},
}


def asked(prompt: str) -> dict[str, str]:
    """The shape, colour and pattern a prompt names (canonical names); longest phrases first ("plus sign")."""
    found, rest = {}, f" {prompt} "
    for phrase in sorted(WORDS, key=len, reverse=True):
        if f" {phrase} " in rest:
            kind, value = WORDS[phrase]
            found.setdefault(kind, value)
            rest = rest.replace(f" {phrase} ", " ")
    return found


def renderer(draw: Callable[[str, dict[str, str]], dict[str, str]] = lambda prompt, want: want,
             stamp: bool = False, calls: list[int] | None = None) -> Generate:
    """A perfect "model": renders what `draw` makes of each prompt's request, the rest of the scene from the seed."""
    def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
        if calls is not None:
            calls.append(len(prompts))
        images = []
        for prompt, seed in zip(prompts, seeds):
            spec = data.sample_specs(np.random.default_rng(seed), 1)[0]
            spec = replace(spec, **draw(prompt, asked(prompt)), stamp=seed % 4 if stamp else None)
            images.append(data.render(spec))
        return (np.stack(images) * 255).round().astype(np.uint8)
    return generate


@pytest.fixture(scope="module")
def judge() -> Judge:
    torch.set_num_threads(1)
    return Judge.load()


def test_judge_classifies_fresh_renders(judge):
    images, labels = rendered(np.random.default_rng([2024, 7]), 500)  # training uses [0, 0], held-out [0, 1]
    verdicts = judge(images)
    for head in ("shape", "color", "pattern"):
        assert (getattr(verdicts, head) == labels[head]).mean() >= 0.98, head
    assert (verdicts.stamp == labels["stamp"].any(1)).mean() >= 0.99
    assert verdicts.shape_probs.shape == (500, len(data.SHAPES)) and verdicts.stamp_probs.shape == (500, 4)


def test_judge_load_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors.*python -m erasekit\.shapes\.judge"):
        Judge.load(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "judge.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match=r"judge\.safetensors.*retrain it with: python -m erasekit"):
        Judge.load(corrupt)


def test_judge_rejects_images_that_are_not_uint8(judge):
    with pytest.raises(ValueError, match="uint8"):
        judge(np.zeros((2, 32, 32, 3), dtype=np.float32))


def test_parse_concept():
    assert parse_concept("circle") == Concept("shape", "circle")
    assert parse_concept(" Red ") == Concept("color", "red")
    assert parse_concept("striped") == Concept("pattern", "striped")
    assert parse_concept("watermark") == parse_concept("stamp") == Concept("stamp", "stamp")
    with pytest.raises(ValueError, match=r"'hexagon'.*circle.*purple.*dotted.*stamp"):
        parse_concept("hexagon")
    with pytest.raises(ValueError):
        Concept("shape", "red")


@pytest.mark.parametrize("text", ["circle", "red", "dotted", "stamp"])
def test_probe_sets_name_the_concept_where_they_should(text):
    concept = parse_concept(text)
    cells = probe_sets(concept, n=40, seed=3)
    assert cells == probe_sets(text, n=40, seed=3)
    for cell, probes in cells.items():
        if probes is None:
            assert cell == "generality" and concept.kind == "stamp"
            continue
        assert len(probes) >= 40
        assert len({p.seed for p in probes}) == len(probes)
        for p in probes:
            assert asked(p.prompt) == {"shape": p.shape, "color": p.color, "pattern": p.pattern}, p.prompt
            named = re.search(rf"\b{concept.name}\b", p.prompt) is not None
            assert named == (cell == "efficacy" and concept.kind != "stamp"), (cell, p.prompt)
            if concept.kind != "stamp":
                assert (getattr(p, concept.kind) == concept.name) == (cell != "specificity"), (cell, p.prompt)


def test_faithful_generator_keeps_every_concept(judge):
    calls: list[int] = []
    for text in ("circle", "red", "dotted"):
        result = measure(renderer(calls=calls), judge, text, n=30)
        assert result["efficacy"] >= 0.98 and result["generality"] >= 0.98, result
        assert result["specificity"] >= 0.98 and min(result[f"{k}_acc"] for k in ("shape", "color", "pattern")) >= 0.98
        assert result["stamp_rate"] <= 0.02
        assert sum(result["n"].values()) == calls[-1]  # one batched call for all cells
    assert len(calls) == 3


def test_word_level_erasure_leaks_through_synonyms(judge):
    canonical_only = renderer(lambda prompt, want: {**want, "shape": "square"} if " circle" in prompt else want)
    result = measure(canonical_only, judge, "circle", n=30)
    assert result["efficacy"] <= 0.02 and result["generality"] >= 0.98 and result["specificity"] >= 0.98, result

    every_word = renderer(lambda prompt, want: {**want, "shape": "square"} if want["shape"] == "circle" else want)
    result = measure(every_word, judge, "circle", n=30)
    assert result["efficacy"] <= 0.02 and result["generality"] <= 0.02 and result["specificity"] >= 0.98, result


def test_stamp_metrics(judge):
    stamped = measure(renderer(stamp=True), judge, "watermark", n=30)
    assert stamped["efficacy"] >= 0.98 and stamped["stamp_rate"] >= 0.98 and stamped["generality"] is None
    assert set(stamped["n"]) == {"efficacy", "specificity"} and stamped["specificity"] >= 0.98
    assert measure(renderer(), judge, "stamp", n=30)["efficacy"] <= 0.02


def test_quality_of_a_faithful_and_a_colour_blind_generator(judge):
    result = quality(renderer(), judge, n=90)
    assert result["n"] == 90 and result["stamp_rate"] <= 0.02
    assert min(result["shape_acc"], result["color_acc"], result["pattern_acc"]) >= 0.98, result
    blue = quality(renderer(lambda prompt, want: {**want, "color": "blue"}), judge, n=90)
    assert blue["color_acc"] == pytest.approx(1 / len(data.COLORS), abs=0.02) and blue["shape_acc"] >= 0.98


def test_measure_checks_the_generator_returns_one_image_per_prompt(judge):
    with pytest.raises(ValueError, match="returned 1 images"):
        measure(lambda prompts, seeds: np.zeros((1, 32, 32, 3), np.uint8), judge, "circle", n=5)
