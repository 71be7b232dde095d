"""Issue #23, item 2 (first step): is every closed-form edit of the form W* = W₀·R with one R for all layers?

For UCE's `replace` technique the solve gives ΔWₗ = Wₗ(G − C)ᵀS with S shared, so W*ₗ = Wₗ R, R = I + (G − C)ᵀS,
the same n×n map for every to_k / to_v. A RECE epoch repeats that on W′ = W₀R₁, so W″ = W₀R₁R₂ (its adversarial
embeddings depend on ΣWᵀW, i.e. on the model, but the form holds); TRCE stage 1 is `replace` with a prior. UCE's
`tensor` technique normalises by ‖Wc‖ per layer, which no shared R can express.

The check is independent of how the code factors the edit: stack every layer's W₀ (Σd × n, full column rank for
SD1.5's 32 layers), find the one X minimising Σₗ‖Wₗ X − ΔWₗ‖² in float64, and require every layer's residual to
vanish; the `tensor` technique must leave a large one (so the check can fail).
"""
from __future__ import annotations

import pytest
import torch

from erasekit.erasers.closed_form import solve
from erasekit.testing.tiny_models import sd15_cross_attention_weights

WIDTH = 768


@pytest.fixture(scope="module")
def weights():
    return sd15_cross_attention_weights(seed=3)


def _embeddings(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(seed)) * 0.5


def _pairs(seed: int = 0) -> solve.Pairs:
    pairs = solve.Pairs()
    pairs.add(_embeddings(3, seed), _embeddings(3, seed + 1))
    return pairs


def _worst_residual(weights, edit: solve.KVEdit) -> float:
    """max over layers of ‖Wₗ X − ΔWₗ‖ / ‖ΔWₗ‖ for the least-squares shared X."""
    deltas = {name: delta.materialize().double() for name, delta in edit.layers(prefix="").items()}
    stacked = torch.cat([weights[name].double() for name in deltas])
    target = torch.cat([deltas[name] for name in deltas])
    shared = torch.linalg.lstsq(stacked, target).solution
    return max(float(torch.linalg.matrix_norm(weights[name].double() @ shared - delta)
                     / torch.linalg.matrix_norm(delta)) for name, delta in deltas.items())


def test_the_stacked_weights_determine_a_shared_map(weights):
    stacked = torch.cat([w.double() for w in weights.values()])
    assert stacked.shape[0] > WIDTH and torch.linalg.matrix_rank(stacked) == WIDTH


def test_uce_replace_is_one_map_for_every_layer(weights):
    edit = solve.uce(weights, _pairs(), lam=0.5, preserve=_embeddings(4, 9), preserve_scale=1.0)
    assert _worst_residual(weights, edit) < 1e-5


def test_rece_epochs_keep_the_form_as_a_product_of_maps(weights):
    edit = solve.uce(weights, _pairs(), lam=0.5)
    solve.rece(edit, [_embeddings(3, 0)], [_embeddings(3, 1)], epochs=2, reg=0.3)
    assert _worst_residual(weights, edit) < 1e-5


def test_trce_stage1_with_its_prior_is_one_map(weights):
    prior = _embeddings(50, 5).T @ _embeddings(50, 5) / 50
    edit = solve.trce_stage1(weights, _embeddings(4, 6), _embeddings(4, 7), prior=prior)
    assert _worst_residual(weights, edit) < 1e-5


def test_the_tensor_technique_is_not_one_map(weights):
    edit = solve.uce(weights, _pairs(), lam=0.5, technique="tensor")
    assert _worst_residual(weights, edit) > 1e-2
