"""The default UCE erasure against the official UCE-2025 recipe, rebuilt here from its description.

Official recipe (rohitgandikota/unified-concept-editing, trainscripts/uce_sd_erase.py, read and restated):
- every prompt is tokenised padded to 77; its key is text_encoder(ids)[0][:, attention_mask.sum() - 2, :];
- the guide of an object is "" (so its key is the BOS output); λ = 0.5, erase and preserve scales 1;
- per layer: W* = (λW₀ + Σ W₀g cᵀ + Σ W₀p pᵀ)(λI + Σ c cᵀ + Σ p pᵀ)⁻¹, one inverse per layer.
"""
from __future__ import annotations

import pytest
import torch

from erasekit.cli.comfy_server import locate_comfyui
from erasekit.erasers.closed_form import reference as ref
from erasekit.erasers.closed_form.recipes import EraseOptions, erase
from erasekit.erasers.text import TransformersEncoder
from erasekit.testing.tiny_models import CLIP_L_TEXT_CONFIG, sd15_cross_attention_weights


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(locate_comfyui() / "comfy" / "sd1_tokenizer")
    torch.manual_seed(0)
    return tokenizer, CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)).eval()


def official_key(tokenizer, model, text: str) -> torch.Tensor:
    batch = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt")
    index = int(batch["attention_mask"].sum()) - 2
    with torch.no_grad():
        return model(batch.input_ids)[0][:, index, :].double()


def rel(a, b) -> float:
    return (torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double())).item()


@pytest.mark.parametrize("preserve", [[], ["blue square", "green star"]])
def test_default_uce_is_the_official_closed_form(clip, preserve):
    tokenizer, model = clip
    base = sd15_cross_attention_weights()
    concepts = ["red circle", "striped triangle"]
    erasure = erase(base, TransformersEncoder([tokenizer], [model]), "sd1",
                    EraseOptions(concepts=concepts, preserve=preserve))
    keys = torch.cat([official_key(tokenizer, model, c) for c in concepts])
    guides = torch.cat([official_key(tokenizer, model, "") for _ in concepts])
    kept = torch.cat([official_key(tokenizer, model, p) for p in preserve]) if preserve else None
    expected = ref.uce({k: v.double() for k, v in base.items()}, keys, guides, lam=0.5, erase_scale=1.0,
                       preserve=kept, preserve_scale=1.0)
    worst = max(rel(erasure.layers[f"unet.{k}"].materialize(), expected[k] - base[k].double()) for k in base)
    assert worst <= 1e-4
    assert erasure.params["lam"] == 0.5 and erasure.guide == ["", ""]


def test_preserved_concepts_keep_their_values_and_erased_ones_reach_the_guide(clip):
    tokenizer, model = clip
    base = sd15_cross_attention_weights()
    encoder = TransformersEncoder([tokenizer], [model])
    preserve = ["blue square", "green star", "yellow cross", "a photo of a dog"]
    without = erase(base, encoder, "sd1", EraseOptions(concepts=["red circle"]))
    kept = erase(base, encoder, "sd1", EraseOptions(concepts=["red circle"], preserve=preserve))
    p = torch.cat([official_key(tokenizer, model, t) for t in preserve]).float()
    c = official_key(tokenizer, model, "red circle").float()
    g = official_key(tokenizer, model, "").float()

    def moved(erasure, keys):
        """‖W*p − W₀p‖ / ‖W₀p‖, the worst layer."""
        return max(rel(w @ keys.T + erasure.layers[f"unet.{k}"].materialize() @ keys.T, w @ keys.T)
                   for k, w in base.items())

    assert moved(kept, p) * 10 <= moved(without, p)
    # The erased key's value lands on the guide's value up to the λ term: residual = λ/(λ+‖c‖²)-ish.
    residual = max(rel((w + without.layers[f"unet.{k}"].materialize()) @ c.T, w @ g.T) for k, w in base.items())
    assert residual < 0.05
    print(f"\npreserved keys moved {moved(without, p):.3e} without / {moved(kept, p):.3e} with the preserve set; "
          f"erased key's value within {residual:.3e} of the guide's")
