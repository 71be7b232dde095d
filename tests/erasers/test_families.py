"""Model families, layer naming and the model report, against the documented SD1.5/SDXL layouts."""
from __future__ import annotations

import pytest

from erasekit.erasers.families import (
    FAMILIES,
    FamilyError,
    UNetLayout,
    cross_attention_layers,
    describe_model,
    family_from_context_dim,
)
from erasekit.testing.tiny_models import sd15_cross_attention_weights, sdxl_cross_attention_weights

# Independent reference: the attn2 blocks ComfyUI's SD1.5 and SDXL UNets have (shared/research/comfyui.md §3.6).
SD15_LDM_BLOCKS = {f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)} | {"middle_block.1"} | {
    f"output_blocks.{i}.1" for i in range(3, 12)}
SDXL_LDM_BLOCKS = {f"input_blocks.{i}.1": d for i, d in ((4, 2), (5, 2), (7, 10), (8, 10))} | {"middle_block.1": 10} | {
    f"output_blocks.{i}.1": d for i, d in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2))}


def _shapes(weights):
    return {k: tuple(v.shape) for k, v in weights.items()}


def _block(ldm_name: str) -> str:
    return ldm_name.split(".transformer_blocks.")[0]


def test_sd15_layers_map_to_the_documented_ldm_blocks():
    layers = cross_attention_layers(_shapes(sd15_cross_attention_weights()))
    assert len(layers) == 16
    layout = UNetLayout(FAMILIES["sd1"].num_res_blocks)
    assert {_block(layout.to_ldm(layer.name)) for layer in layers} == SD15_LDM_BLOCKS
    assert {layer.inner_dim for layer in layers} == {320, 640, 1280}
    assert {layer.context_dim for layer in layers} == {768}


def test_sdxl_layers_map_to_the_documented_ldm_blocks_and_depths():
    layers = cross_attention_layers(_shapes(sdxl_cross_attention_weights()))
    assert len(layers) == 70
    layout = UNetLayout(FAMILIES["sdxl"].num_res_blocks)
    depth: dict[str, int] = {}
    for layer in layers:
        block = _block(layout.to_ldm(layer.name))
        depth[block] = depth.get(block, 0) + 1
    assert depth == SDXL_LDM_BLOCKS


@pytest.mark.parametrize("num_res_blocks", [(2, 2, 2, 2), (2, 2, 2), (1, 1), (3, 1, 2)])
def test_layout_names_round_trip(num_res_blocks):
    layout = UNetLayout(num_res_blocks)
    names = [f"down_blocks.{lvl}.attentions.{b}.transformer_blocks.0.attn2"
             for lvl, n in enumerate(num_res_blocks) for b in range(n)]
    names += [f"up_blocks.{lvl}.attentions.{b}.transformer_blocks.1.attn2"
              for lvl, n in enumerate(num_res_blocks[::-1]) for b in range(n + 1)]
    names.append("mid_block.attentions.0.transformer_blocks.0.attn2")
    ldm = [layout.to_ldm(n) for n in names]
    assert len(set(ldm)) == len(names)
    assert [layout.to_diffusers(n) for n in ldm] == names


def test_ldm_keys_are_read_with_their_layout():
    layout = UNetLayout(FAMILIES["sd1"].num_res_blocks)
    diffusers = _shapes(sd15_cross_attention_weights())
    ldm = {"model.diffusion_model." + layout.to_ldm(k.removesuffix(".to_k.weight").removesuffix(".to_v.weight"))
           + k[k.rindex(".to_"):]: v for k, v in diffusers.items()}
    assert cross_attention_layers(ldm, layout) == cross_attention_layers(diffusers)
    with pytest.raises(ValueError, match="UNetLayout"):
        cross_attention_layers(ldm)


def test_unknown_context_width_names_the_supported_families():
    assert family_from_context_dim(2048).name == "sdxl"
    with pytest.raises(FamilyError, match="4096 matches no supported model family.*Stable Diffusion XL \\(2048\\)"):
        family_from_context_dim(4096)


def test_report_for_sdxl_and_for_a_model_without_cross_attention():
    report = describe_model(_shapes(sdxl_cross_attention_weights()))
    assert report.family.name == "sdxl" and not report.problems
    text = report.text()
    assert "cross-attention layers: 70" in text
    assert "10 x to_k/to_v 640x2048" in text and "60 x to_k/to_v 1280x2048" in text  # 2x2+3x2; 20+10+30
    empty = describe_model({"down_blocks.0.resnets.0.conv1.weight": (320, 4, 3, 3)})
    assert empty.family is None and empty.applicable() == []
    assert "no cross-attention" in empty.problems[0]


def test_report_flags_a_text_encoder_from_another_family():
    unet = _shapes(sd15_cross_attention_weights())
    clip_g = {"clip_g.transformer.text_model.embeddings.token_embedding.weight": (49408, 1280),
              "clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (5120, 1280)}
    report = describe_model(unet, clip_g)
    assert report.family.name == "sd1"
    assert any("clip_g" in p and "clip_l" in p for p in report.problems)
    assert not any("AdvUnlearn" in kind for kind in report.applicable())


def test_report_accepts_sdxl_text_encoders_in_any_order():
    towers = {f"{name}.transformer.text_model.embeddings.token_embedding.weight": (49408, width)
              for name, width in (("clip_g", 1280), ("clip_l", 768))}
    towers |= {f"{name}.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (4, 4)
               for name in ("clip_g", "clip_l")}
    report = describe_model(_shapes(sdxl_cross_attention_weights()), towers)
    assert report.family.name == "sdxl" and not report.problems
