"""Erasures on a diffusers UNet: attach changes the output, detach restores it bit for bit."""
from __future__ import annotations

import pytest
import torch

from erasekit.erasers.closed_form import solve
from erasekit.erasers.diffusers_adapter import attach, detach, unet_kv_weights
from erasekit.erasers.erasure import Erasure, FamilyMismatchError, fingerprint
from erasekit.testing.tiny_models import build_tiny_sd15_models


@pytest.fixture(scope="module")
def unet():
    return build_tiny_sd15_models(seed=1).unet


def _erasure(unet) -> Erasure:
    weights = {k: v.detach() for k, v in unet_kv_weights(unet).items()}
    g = torch.Generator().manual_seed(0)
    pairs = solve.Pairs()
    pairs.add(torch.randn(1, 768, generator=g), torch.randn(1, 768, generator=g))
    edit = solve.uce(weights, pairs, lam=0.5)
    return Erasure(layers=edit.layers(), method="uce", family="sd1", concepts=["x"],
                   base_fingerprint=fingerprint({f"unet.{k}": v for k, v in weights.items()}))


def _run(unet):
    g = torch.Generator().manual_seed(3)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def test_attach_changes_outputs_and_detach_restores_them_exactly(unet):
    before_weights = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    before = _run(unet)
    erasure = _erasure(unet)
    attach(unet, erasure)
    after = _run(unet)
    assert not torch.equal(before, after)
    name = next(iter(erasure.layers))
    expected = before_weights[name.removeprefix("unet.")] + erasure.layers[name].materialize()
    assert torch.allclose(unet.get_parameter(name.removeprefix("unet.")), expected, atol=1e-6)
    attach(unet, erasure, strength=0.5)  # stacking keeps the first originals
    detach(unet)
    assert torch.equal(_run(unet), before)
    assert all(torch.equal(v, before_weights[k]) for k, v in unet.state_dict().items())


def test_attach_checks_the_family(unet):
    erasure = _erasure(unet)
    erasure.family = "sdxl"
    with pytest.raises(FamilyMismatchError, match="sdxl"):
        attach(unet, erasure)
    assert not hasattr(unet, "_erasekit_originals")
