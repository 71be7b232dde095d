"""Closed-form edits (low-rank, shared solve) against the per-layer dense equations, in float64 as the truth."""
from __future__ import annotations

import pytest
import torch

from erasekit.erasers.closed_form import reference as ref
from erasekit.erasers.closed_form import solve
from erasekit.erasers.erasure import Erasure
from erasekit.testing.tiny_models import sd15_cross_attention_weights, sdxl_cross_attention_weights

TOLERANCE = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double())).item()


def embeddings(rows: int, width: int, seed: int) -> torch.Tensor:
    # CLIP outputs after the final layer norm have per-token norms of roughly 25-30; keep that scale.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g) * (27 / width ** 0.5)


def check(edit: solve.KVEdit, base: dict, expected: dict) -> float:
    worst = 0.0
    for name, delta in edit.layers(prefix="").items():
        truth = expected[name].double() - base[name].double()
        worst = max(worst, rel(delta.materialize(), truth))
    return worst


@pytest.fixture(scope="module", params=["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
def base(request):
    weights = sd15_cross_attention_weights() if request.param == "sd15" else sdxl_cross_attention_weights()
    if request.param == "sdxl":  # the reference inverts 2048² per layer: a few layers of both widths suffice
        weights = dict(list(weights.items())[::23])
    return weights


@pytest.mark.parametrize("technique", ["replace", "tensor"])
@pytest.mark.parametrize("n_concepts,n_preserve", [(1, 0), (3, 4), (10, 20)])
def test_uce_matches_the_dense_per_layer_solve(base, technique, n_concepts, n_preserve):
    width = next(iter(base.values())).shape[1]
    pairs = solve.Pairs()
    for i in range(n_concepts):
        pairs.add(embeddings(1, width, i), embeddings(1, width, 100))
    preserve = embeddings(n_preserve, width, 1000) if n_preserve else None
    edit = solve.uce(base, pairs, lam=0.5, erase_scale=1.0, preserve=preserve, preserve_scale=1.0,
                           technique=technique)
    keys, guides = pairs.stacked()
    f64 = {k: v.double() for k, v in base.items()}
    expected = ref.uce(f64, keys.double(), guides.double(), lam=0.5,
                       preserve=None if preserve is None else preserve.double(),
                       preserve_scale=1.0, technique=technique, blocks=[1] * n_concepts)
    assert check(edit, base, expected) <= TOLERANCE
    assert edit.rank == n_concepts


def test_uce2023_suffix_blocks_with_tensor_technique(base):
    """Multi-token blocks (the 2023 suffix selection) and the tensor projection over each whole block."""
    width = next(iter(base.values())).shape[1]
    pairs = solve.Pairs()
    for i, length in enumerate((75, 73)):
        pairs.add(embeddings(length, width, i), embeddings(length, width, 50 + i))
    preserve = embeddings(77, width, 7)
    edit = solve.uce(base, pairs, lam=0.5, preserve=preserve, preserve_scale=1.0, technique="tensor")
    keys, guides = pairs.stacked()
    f64 = {k: v.double() for k, v in base.items()}
    expected = ref.uce(f64, keys.double(), guides.double(), lam=0.5, preserve=preserve.double(), preserve_scale=1.0,
                       technique="tensor", blocks=[75, 73])
    assert check(edit, base, expected) <= TOLERANCE


def test_rece_epochs_match_the_dense_reference(base):
    width = next(iter(base.values())).shape[1]
    concepts = [embeddings(77, width, 10 + i) for i in range(2)]
    guide = embeddings(77, width, 99)
    retain = embeddings(77 * 2, width, 5)
    start = solve.Pairs()
    for c in concepts:
        start.add(c[3:4], guide[0:1])
    edit = solve.uce(base, start, lam=0.5)
    f64 = {k: v.double() for k, v in base.items()}
    uce_weights = {k: v.double() + d.materialize().double() for k, v, d in
                   zip(base, base.values(), edit.layers(prefix="").values())}
    solve.rece(edit, concepts, [guide, guide], epochs=2, reg=0.1, lam=0.1, retain=retain, preserve_scale=0.1)
    expected = ref.rece(uce_weights, f64, [c.double() for c in concepts], [guide.double()] * 2, epochs=2, reg=0.1,
                        lam=0.1, retain=retain.double(), preserve_scale=0.1)
    assert check(edit, base, expected) <= TOLERANCE
    assert edit.rank == 1 * 2 + 2 * 2 * 77


def test_trce_stage1_matches_the_official_refinement(base):
    width = next(iter(base.values())).shape[1]
    malicious, safe = embeddings(30, width, 1), embeddings(30, width, 2)
    tokens = embeddings(4 * width, width, 3)  # enough tokens for a full-rank prior, as COCO's is
    prior = tokens.T @ tokens / 40  # per-caption mean over 40 "captions"
    edit = solve.trce_stage1(base, malicious, safe, prior=prior, preserve_scale=0.01)
    f64 = {k: v.double() for k, v in base.items()}
    expected = ref.trce_stage1(f64, malicious.double(), safe.double(), prior=prior.double(), preserve_scale=0.01)
    assert check(edit, base, expected) <= TOLERANCE


def test_rece_embedding_variants_reduce_to_the_reference():
    base = sd15_cross_attention_weights()
    width = 768
    edit = solve.uce(base, _one_pair(width), lam=0.5)
    edited = {n: base[n].double() + d.materialize().double() for n, d in edit.layers(prefix="").items()}
    concept = embeddings(77, width, 4)
    expected = ref.rece_embedding(edited, {k: v.double() for k, v in base.items()}, concept.double(), 0.1)
    assert rel(edit.adversarial_embeddings(concept, 0.1), expected) <= TOLERANCE
    # Standard regularisation towards c_o = 0 is regzero; surrogate forms are finite and differ from it.
    zero = torch.zeros_like(concept)
    assert rel(edit.adversarial_embeddings(concept, 0.1, "standard", zero), expected) <= TOLERANCE
    for variant in ("surrogate-1st", "surrogate-2nd", "surrogate-both"):
        out = edit.adversarial_embeddings(concept, 0.1, variant)
        assert torch.isfinite(out).all() and rel(out, expected) > 1e-6
    with pytest.raises(ValueError, match="unknown RECE embedding variant"):
        edit.adversarial_embeddings(concept, 0.1, "nope")


def _one_pair(width: int) -> solve.Pairs:
    pairs = solve.Pairs()
    pairs.add(embeddings(1, width, 0), embeddings(1, width, 1))
    return pairs


def test_preserved_keys_barely_move_and_erased_keys_reach_the_guide():
    base = sd15_cross_attention_weights()
    width = 768
    pairs = _one_pair(width)
    preserve = embeddings(10, width, 42)
    without = solve.uce(base, pairs, lam=0.5).layers(prefix="")
    kept = solve.uce(base, pairs, lam=0.5, preserve=preserve, preserve_scale=1.0).layers(prefix="")
    keys, guides = pairs.stacked()

    def preserved_change(layers):
        return max(rel(base[n] @ preserve.T + layers[n].materialize() @ preserve.T, base[n] @ preserve.T) for n in base)

    assert preserved_change(kept) * 10 <= preserved_change(without)
    for name, delta in without.items():
        reached = (base[name] + delta.materialize()) @ keys.T
        # With λ = 0.5 the erased key lands within λ/(λ+‖c‖²) of the guide's value.
        assert rel(reached, base[name] @ guides.T) < 0.01


def test_factors_are_shared_and_files_round_trip(tmp_path):
    base = sd15_cross_attention_weights()
    edit = solve.uce(base, _one_pair(768), lam=0.5)
    layers = edit.layers()
    assert all(d.down is next(iter(layers.values())).down for d in layers.values())
    erasure = Erasure(layers=layers, method="uce", family="sd1", concepts=["x"], params={"lam": 0.5})
    path = erasure.save(tmp_path / "e.safetensors")
    assert path.stat().st_size < 1_000_000
    loaded = Erasure.load(path)
    assert loaded.method == "uce" and loaded.params == {"lam": 0.5}
    for name, delta in layers.items():
        assert torch.equal(loaded.layers[name].materialize(), delta.materialize())


def test_bad_parameters_are_named():
    base = sd15_cross_attention_weights()
    with pytest.raises(ValueError, match="λ must be > 0"):
        solve.uce(base, _one_pair(768), lam=0.0)
    with pytest.raises(ValueError, match="unknown technique"):
        solve.uce(base, _one_pair(768), technique="swap")
