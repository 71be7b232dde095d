"""The shipped shapes-world model: it draws what it is asked, erasers change it, the demo runs end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erasekit.shapes import data, model

# --- the shipped model ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world():
    from erasekit.shapes.judge import Judge

    return model.ShapesPipeline.load(), Judge.load()


def test_shipped_model_draws_what_is_asked(world):
    """Regression guard for the shipped weights (card: shape 80%, colour 100%, pattern 100%; chance 20/17/33%)."""
    pipe, judge = world
    asks = [a for a in [("circle", "red", "solid"), ("square", "blue", "striped"), ("star", "yellow", "dotted"),
                        ("triangle", "green", "solid")] for _ in range(4)]
    images = pipe([data.prompt(*a) for a in asks], seeds=list(range(len(asks))))
    assert images.shape == (16, data.SIZE, data.SIZE, 3) and images.dtype == np.uint8
    verdict = judge(images)
    right = {kind: sum(getattr(verdict, kind)[i] == list(names).index(a[k]) for i, a in enumerate(asks))
             for k, (kind, names) in enumerate([("shape", data.SHAPES), ("color", data.COLORS),
                                                ("pattern", data.PATTERNS)])}
    assert right["color"] >= 15 and right["pattern"] >= 13 and right["shape"] >= 8, right
    # Each image depends on its own seed only, up to float rounding: CPU GEMMs round differently with the batch
    # size and thread count (measured: 1 thread vs 2 moves 0.02% of the pixels by 1).
    again = pipe([data.prompt(*a) for a in asks[:2]], seeds=[0, 1])
    change = np.abs(again.astype(int) - images[:2])
    assert change.max() <= 3 and (change > 0).mean() < 0.01


def test_rece_erases_circle_and_detach_restores(world):
    from erasekit.shapes import methods

    pipe, judge = world
    prompts = [data.prompt("circle", c, "solid") for c in data.COLORS] * 2
    seeds = list(range(len(prompts)))
    before = pipe(prompts, seeds)
    with methods.erased(pipe, "rece", "circle"):
        during = pipe(prompts, seeds)
    after = pipe(prompts, seeds)
    assert np.array_equal(before, after)
    circle = data.SHAPES.index("circle")
    assert 2 * (judge(during).shape == circle).sum() <= (judge(before).shape == circle).sum()


def test_spm_method_attaches_a_shipped_membrane_or_says_how_to_train_one(world, tmp_path, monkeypatch):
    from erasekit.erasers import spm
    from erasekit.erasers.spm.hooks import membrane_targets
    from erasekit.shapes import methods
    from erasekit.testing.tiny_models import random_membranes

    pipe, _ = world
    monkeypatch.setattr(methods, "MEMBRANES_DIR", tmp_path)
    assert "erasekit train-spm --target circle" in methods.unavailable("spm", "circle")
    with pytest.raises(methods.UnknownMethodError, match="no shipped spm file for 'circle'"):
        with methods.erased(pipe, "spm", "circle"):
            pass
    (membrane,) = random_membranes(membrane_targets(pipe), ["circle"])
    spm.save_membrane(membrane, tmp_path / "circle.safetensors")
    prompts, seeds = [data.prompt("circle", "red", "solid"), data.prompt("square", "blue", "solid")], [0, 1]
    before = pipe(prompts, seeds)
    with methods.erased(pipe, "spm", "circle") as membrane:
        during = pipe(prompts, seeds)
    assert membrane.concepts == ["circle"] and not np.array_equal(during[0], before[0])
    assert np.array_equal(pipe(prompts, seeds), before)


@pytest.mark.parametrize("concept", ["circle", "red", "striped"])
def test_shipped_membrane_erases_its_concept_and_spares_others(world, concept):
    """Each shipped membrane (weights/shapes-spm, trained by `erasekit train-spm`) stops its concept on prompts
    that name it, leaves a prompt without it drawing what it asks, and names its concept for FT."""
    from erasekit.shapes import methods, metrics

    pipe, judge = world
    parsed = metrics.parse_concept(concept)
    sets = metrics.probe_sets(parsed, n=12, seed=5)
    naming, other = sets["efficacy"][:12], sets["specificity"][:12]
    prompts, seeds = [p.prompt for p in naming + other], [p.seed for p in naming + other]
    before = judge(pipe(prompts, seeds))
    with methods.erased(pipe, "spm", concept) as membrane:
        during = judge(pipe(prompts, seeds))
    assert membrane.concepts == [concept]
    index = metrics.VALUES[parsed.kind].index(concept)
    shows = lambda verdict: getattr(verdict, parsed.kind)[:12] == index  # noqa: E731
    assert shows(before).sum() >= 10 and shows(during).sum() <= 2, (shows(before), shows(during))
    # What the other prompts ask for (colour and pattern are near-perfect in this world) survives the membrane.
    asked = [metrics.VALUES[k].index(getattr(p, k)) for p in other for k in ("color", "pattern")]
    got = lambda verdict: [int(getattr(verdict, k)[12 + i]) for i in range(12) for k in ("color", "pattern")]  # noqa: E731
    right_before = sum(a == g for a, g in zip(asked, got(before)))
    right_during = sum(a == g for a, g in zip(asked, got(during)))
    assert right_during >= right_before - 3, (right_before, right_during)


def test_negative_baseline_and_geom_set_the_negative_and_restore(world):
    from erasekit.erasers.geom import train as geom_train
    from erasekit.shapes import methods

    pipe, judge = world
    unet = pipe.unet
    prompts, seeds = [data.prompt("square", "blue", "solid")] * 2, [0, 1]
    with methods.erased(pipe, "negative", "circle"):
        assert np.array_equal(pipe(prompts, seeds), pipe(prompts, seeds, negative="circle"))
    assert pipe.negative_context is None and pipe.unet is unet
    tuned, tokens = geom_train.load_data_removal(methods.GEOM_DIR)
    with methods.erased(pipe, "geom", "watermark"):  # the stamp's synonym
        assert pipe.unet is not unet and torch.equal(pipe.negative_context, geom_train.encode_negative(
            pipe, "stamp", tokens, methods.GEOM_CELLS))
        assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), tuned.parameters()))
    assert pipe.negative_context is None and pipe.unet is unet
    assert "named by its prompts" in methods.unavailable("geom", "circle")
    assert "Geom-Erasing" in methods.unavailable("spm", "stamp")


def test_shipped_geom_erasing_cuts_the_stamp(world):
    """The shipped data-removal UNet with its negative against the base model on 144 ordinary prompts (180 images):
    it cuts the stamp rate at least five-fold (here 50 → 4 stamps; eval at n = 180 per cell: 23.6% → 2.2%,
    docs/shapes-world.md; the α = 2 model shipped before, at 5.8%, would leave about 10) and costs under the issue's 3
    points of shape accuracy."""
    from erasekit.shapes import methods, metrics

    pipe, judge = world
    probes = metrics.probe_sets("stamp", 144, seed=3)["efficacy"]
    prompts, seeds = [p.prompt for p in probes], [p.seed for p in probes]
    base = judge(pipe(prompts, seeds))
    with methods.erased(pipe, "geom", "stamp"):
        erased = judge(pipe(prompts, seeds))
    assert erased.stamp.sum() * 5 < base.stamp.sum(), (erased.stamp.sum(), base.stamp.sum())
    shape_right = lambda v: sum(v.shape[i] == data.SHAPES.index(p.shape) for i, p in enumerate(probes))  # noqa: E731
    assert shape_right(erased) >= shape_right(base) - 0.03 * len(probes)


@pytest.mark.slow
def test_demo_writes_grid_and_metrics(tmp_path):
    from erasekit.cli.main import main

    assert main(["demo", "--out", str(tmp_path), "-n", "6"]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    # A circle membrane and a circle encoder ship, so every method has a row but Geom-Erasing's (the stamp only)
    # and the plain-word negative's (a baseline: eval only).
    assert [r["method"] for r in result["rows"]] == ["original", "uce", "rece", "trce", "spm", "advunlearn"]
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 6 * 128 and grid.height > 3 * 128  # columns: original + 5 methods; rows: erased, synonym, other
