"""Single-file checkpoints: key maps checked against ComfyUI's own, file reading and writing, the tiny SD1.5 model.

ComfyUI's `comfy.utils.unet_to_diffusers` (diffusers key -> LDM key, no prefix) and
`comfy.diffusers_convert.convert_vae_state_dict` serve as the independent references for the key maps.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import struct

import pytest
import torch

from erasekit.erasers.families import UNetLayout, cross_attention_layers
from erasekit.erasers.io import checkpoints as ck
from erasekit.erasers.io.clip_names import file_state_dict
from erasekit.testing import tiny_models as tm

# ComfyUI's unet_config for the tiny UNet, as its model detection reports it (checked in the load test).
TINY_COMFY_UNET_CONFIG = {
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
}


def meta_unet_state_dict(config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet's state dict with shapes but no storage: full-size SDXL in well under a second."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config).state_dict()


def comfy_unet_config(comfy, name: str, diffusers_sd: dict) -> dict:
    """ComfyUI's full unet_config for a diffusers UNet, from ComfyUI's own table of known models."""
    import comfy.model_detection

    if name == "tiny":
        return dict(TINY_COMFY_UNET_CONFIG)
    config = comfy.model_detection.unet_config_from_diffusers_unet(diffusers_sd)
    assert config is not None, f"ComfyUI does not recognise the {name} diffusers config"
    return config


UNET_CASES = [
    ("sd15", tm.SD15_UNET_CONFIG, (2, 2, 2, 2), "SD15"),
    ("sdxl", tm.SDXL_UNET_CONFIG, (2, 2, 2), "SDXL"),
    ("tiny", tm.TINY_SD15_UNET_CONFIG, (1, 1), "SD15"),
]


# ---------------------------------------------------------------------------------------------------------------
# UNet key map


@pytest.mark.parametrize("name,config,num_res_blocks,comfy_class", UNET_CASES, ids=[c[0] for c in UNET_CASES])
def test_unet_key_map_equals_comfyui(comfy, name, config, num_res_blocks, comfy_class):
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    diffusers_sd = meta_unet_state_dict(config)
    comfy_config = comfy_unet_config(comfy, name, diffusers_sd)
    if name == "sdxl":
        # The reference really is ComfyUI's SDXL: its detection keys plus the per-block depth lists.
        assert comfy.supported_models.SDXL.unet_config.items() <= comfy_config.items()
        assert comfy_config["transformer_depth"] == [0, 0, 2, 2, 10, 10]
        assert comfy_config["num_res_blocks"] == [2, 2, 2]
    if name != "tiny":
        assert type(comfy.model_detection.model_config_from_unet_config(comfy_config)).__name__ == comfy_class

    reference = comfy.utils.unet_to_diffusers(comfy_config)
    ours = ck.unet_key_map(diffusers_sd.keys())

    assert set(diffusers_sd) <= set(reference), "diffusers keys that ComfyUI cannot map"
    assert ours == {key: reference[key] for key in diffusers_sd}
    assert ck.unet_layout_from_diffusers_keys(diffusers_sd) == UNetLayout(num_res_blocks)


@pytest.mark.parametrize("name,config,num_res_blocks,comfy_class", UNET_CASES, ids=[c[0] for c in UNET_CASES])
def test_unet_ldm_to_diffusers_inverts_comfyui_names(comfy, name, config, num_res_blocks, comfy_class):
    import comfy.utils

    diffusers_sd = meta_unet_state_dict(config)
    reference = comfy.utils.unet_to_diffusers(comfy_unet_config(comfy, name, diffusers_sd))
    ldm_sd = {reference[key]: tensor for key, tensor in diffusers_sd.items()}

    assert UNetLayout.from_ldm_keys(ldm_sd) == UNetLayout(num_res_blocks)
    assert UNetLayout.from_ldm_keys(ck.UNET_PREFIX + key for key in ldm_sd) == UNetLayout(num_res_blocks)
    back = ck.unet_ldm_to_diffusers(ldm_sd)
    assert back.keys() == diffusers_sd.keys()
    assert all(back[key] is diffusers_sd[key] for key in diffusers_sd)
    assert ck.unet_diffusers_to_ldm(back).keys() == ldm_sd.keys()


def test_unet_conversion_rejects_prefixed_and_foreign_keys():
    diffusers_sd = meta_unet_state_dict(tm.TINY_SD15_UNET_CONFIG)
    ldm_sd = ck.unet_diffusers_to_ldm(diffusers_sd)
    with pytest.raises(ck.CheckpointError, match="split_checkpoint"):
        ck.unet_ldm_to_diffusers({ck.UNET_PREFIX + key: t for key, t in ldm_sd.items()}, UNetLayout((1, 1)))
    with pytest.raises(ck.CheckpointError, match="lora_down"):
        ck.unet_diffusers_to_ldm({**diffusers_sd, "down_blocks.0.lora_down.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------
# VAE and CLIP


def small_vae_state_dict() -> dict[str, torch.Tensor]:
    """A random AutoencoderKL with SD's structure (4 levels, 2 res-blocks: what ComfyUI's converter assumes) but
    narrow channels."""
    from diffusers import AutoencoderKL

    config = dict(tm.SD_VAE_CONFIG, block_out_channels=(16, 32, 64, 64), norm_num_groups=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return AutoencoderKL(**config).state_dict()


def test_vae_conversion_matches_comfyui_and_round_trips(comfy):
    import comfy.diffusers_convert

    diffusers_sd = small_vae_state_dict()
    ours = ck.vae_diffusers_to_ldm(diffusers_sd)
    reference = comfy.diffusers_convert.convert_vae_state_dict(dict(diffusers_sd))

    assert ours.keys() == reference.keys()
    for key in reference:
        assert ours[key].shape == reference[key].shape, key
        assert torch.equal(ours[key], reference[key]), key
    assert ours["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert torch.equal(ours["decoder.up.3.block.0.conv1.weight"],
                       diffusers_sd["decoder.up_blocks.0.resnets.0.conv1.weight"])  # levels are mirrored

    back = ck.vae_ldm_to_diffusers(ours)
    assert back.keys() == diffusers_sd.keys()
    for key, tensor in diffusers_sd.items():
        assert back[key].shape == tensor.shape and torch.equal(back[key], tensor), key


def test_vae_accepts_old_diffusers_attention_names():
    diffusers_sd = small_vae_state_dict()
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, tensor in diffusers_sd.items():
        for new, old in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = tensor
    assert renamed.keys() != diffusers_sd.keys()
    converted, expected = ck.vae_diffusers_to_ldm(renamed), ck.vae_diffusers_to_ldm(diffusers_sd)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[key], expected[key]) for key in expected)


def test_clip_l_conversion_drops_position_ids_and_adds_old_missing_level():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77)
    hf_sd = file_state_dict(CLIPTextModel(config))
    with_ids = {**hf_sd, "text_model.embeddings.position_ids": torch.arange(77)[None]}

    ldm = ck.clip_l_transformers_to_ldm(with_ids)
    assert ldm.keys() == hf_sd.keys()
    assert ck.clip_l_ldm_to_transformers(ldm).keys() == hf_sd.keys()
    # The first SD1.x checkpoints have cond_stage_model.transformer.embeddings... without "text_model.".
    old_layout = {key.removeprefix("text_model."): t for key, t in with_ids.items()}
    assert ck.clip_l_ldm_to_transformers(old_layout).keys() == hf_sd.keys()
    with pytest.raises(ck.CheckpointError):
        ck.clip_l_transformers_to_ldm({"text_projection.weight": torch.zeros(2, 2)})


def test_split_and_join_checkpoint():
    state_dict = {
        "model.diffusion_model.out.2.weight": torch.zeros(1),
        "first_stage_model.quant_conv.weight": torch.zeros(2),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(3),
        "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
    }
    parts = ck.split_checkpoint(state_dict)
    assert list(parts.unet) == ["out.2.weight"]
    assert list(parts.vae) == ["quant_conv.weight"]
    assert list(parts.text_encoder) == ["text_model.final_layer_norm.weight"]
    assert list(parts.other) == ["conditioner.embedders.1.model.ln_final.weight"]
    assert ck.join_checkpoint(parts).keys() == state_dict.keys()


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing files


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "b.half": torch.randn(3, 5, generator=generator).half(),
        "a.float": torch.randn(4, generator=generator),
        "c.bf16": torch.randn(2, 2, generator=generator).bfloat16(),
        "d.int64": torch.arange(7),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 3),
        "h.view": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }


def test_write_then_read_round_trips_with_metadata(tmp_path):
    from safetensors import safe_open

    tensors = sample_tensors()
    path = ck.write_checkpoint(tmp_path / "sub" / "x.safetensors", tensors, {"b": "2", "a": "1"})
    loaded = ck.read_checkpoint(path)
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "a": "1", "b": "2"}
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no partial file left


def test_write_is_byte_identical_whatever_the_order(tmp_path):
    # The safetensors library orders metadata by a per-process hash seed; our writer must not depend on any order.
    tensors = sample_tensors()
    metadata = {f"key{i}": str(i) for i in range(8)}
    first = ck.write_checkpoint(tmp_path / "1.safetensors", tensors, metadata).read_bytes()
    second = ck.write_checkpoint(
        tmp_path / "2.safetensors", dict(reversed(tensors.items())), dict(reversed(metadata.items()))
    ).read_bytes()
    assert first == second
    header_length = struct.unpack("<Q", first[:8])[0]
    assert header_length % 8 == 0
    header = json.loads(first[8 : 8 + header_length])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    # Offsets are multiples of each tensor's element size, for readers that memory-map.
    for key, tensor in tensors.items():
        assert header[key]["data_offsets"][0] % tensor.element_size() == 0, key


def test_write_rejects_other_formats_and_bad_metadata(tmp_path):
    with pytest.raises(ck.CheckpointError, match="safetensors"):
        ck.write_checkpoint(tmp_path / "x.ckpt", {"a": torch.zeros(1)})
    with pytest.raises(TypeError):
        ck.write_checkpoint(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"seed": 0})


def test_read_pt_unwraps_state_dict_and_drops_non_tensors(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2), "step": 3}, "global_step": 10}, path)
    loaded = ck.read_checkpoint(path)
    assert list(loaded) == ["w"] and torch.equal(loaded["w"], torch.ones(2))


def test_read_checkpoint_shapes_without_loading(tmp_path):
    tensors = sample_tensors()
    expected = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    assert ck.read_checkpoint_shapes(ck.write_checkpoint(tmp_path / "x.safetensors", tensors)) == expected
    for zip_format in (True, False):
        path = tmp_path / f"x{zip_format}.ckpt"
        torch.save({"state_dict": tensors}, path, _use_new_zipfile_serialization=zip_format)
        assert ck.read_checkpoint_shapes(path) == expected
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes()[:-4])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.read_checkpoint_shapes(tmp_path / "cut.safetensors")


class NotATensor:
    """Stands for the training objects some .ckpt files pickle beside the weights."""


def test_read_errors_name_the_file_and_the_remedy(tmp_path):
    with pytest.raises(ck.CheckpointError, match=r"missing\.safetensors does not exist"):
        ck.read_checkpoint(tmp_path / "missing.safetensors")

    good = ck.write_checkpoint(tmp_path / "good.safetensors", {"w": torch.zeros(1000)})
    data = good.read_bytes()
    for length in (4, 40, len(data) - 100):
        truncated = tmp_path / f"truncated{length}.safetensors"
        truncated.write_bytes(data[:length])
        with pytest.raises(ck.CheckpointError, match=rf"truncated{length}\.safetensors .*truncated.*again"):
            ck.read_checkpoint(truncated)

    for zip_format in (True, False):  # torch's current zip format and the legacy one of early SD .ckpt files
        pickled = tmp_path / f"pickled{zip_format}.pt"
        torch.save({"state_dict": {"w": torch.zeros(2)}, "optimizer": NotATensor()}, pickled,
                   _use_new_zipfile_serialization=zip_format)
        with pytest.raises(ck.CheckpointError, match=rf"pickled{zip_format}\.pt contains Python objects besides "
                                                     r"tensors \(.*NotATensor\).*convert it to \.safetensors"):
            ck.read_checkpoint(pickled)

    broken = tmp_path / "broken.pt"
    torch.save({"w": torch.zeros(1000)}, broken)
    broken.write_bytes(broken.read_bytes()[:500])
    with pytest.raises(ck.CheckpointError, match=r"broken\.pt is not a readable PyTorch checkpoint"):
        ck.read_checkpoint(broken)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match=r"empty\.ckpt is not a readable PyTorch checkpoint"):
        ck.read_checkpoint(tmp_path / "empty.ckpt")

    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ck.CheckpointError, match="unknown checkpoint type"):
        ck.read_checkpoint(tmp_path / "weights.gguf")


# ---------------------------------------------------------------------------------------------------------------
# Cross-attention weights without a UNet


@pytest.mark.parametrize(
    "name,build,config,count,context,layout",
    [
        ("sd15", tm.sd15_cross_attention_weights, tm.SD15_UNET_CONFIG, 32, 768, UNetLayout((2, 2, 2, 2))),
        pytest.param(  # 340 M random numbers: about 5 s
            "sdxl", tm.sdxl_cross_attention_weights, tm.SDXL_UNET_CONFIG, 140, 2048, UNetLayout((2, 2, 2)),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["sd15", "sdxl"],
)
def test_cross_attention_weights_have_real_names_and_shapes(comfy, name, build, config, count, context, layout):
    import comfy.utils

    weights = build(seed=0)
    assert len(weights) == count
    real = meta_unet_state_dict(config)
    for key, tensor in weights.items():
        assert key.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")), key
        assert tuple(tensor.shape) == tuple(real[key].shape), key
        assert tensor.dtype == torch.float32
    real_kv = {k for k in real if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}
    assert set(weights) == real_kv

    # Every name is one ComfyUI maps, to the LDM block UNetLayout names.
    reference = comfy.utils.unet_to_diffusers(comfy_unet_config(comfy, name, real))
    for key in weights:
        block = key.removesuffix(".to_k.weight").removesuffix(".to_v.weight")
        assert reference[key] == layout.to_ldm(block) + key[len(block):], key
    layers = cross_attention_layers({k: v.shape for k, v in weights.items()})
    assert len(layers) == count // 2 and {layer.context_dim for layer in layers} == {context}

    for key, tensor in weights.items():  # fan-in scale, like trained projections
        assert abs(tensor.std().item() * math.sqrt(context) - 1) < 0.02, key
    if name == "sdxl":
        # 3 attentions of 10 transformer blocks each, K and V
        assert sum(1 for k in weights if k.startswith("up_blocks.0.")) == 3 * 10 * 2


def test_cross_attention_weights_are_seeded():
    first, again, other = (tm.sd15_cross_attention_weights(seed=s) for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
                           other["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"])
    half = tm.sd15_cross_attention_weights(dtype=torch.float16)
    assert {t.dtype for t in half.values()} == {torch.float16}
    assert all(torch.equal(half[k], first[k].half()) for k in first)


# ---------------------------------------------------------------------------------------------------------------
# The tiny SD1.5 checkpoint in real ComfyUI

# ComfyUI creates these two for SD1.x's CLIP-L although no SD1.x checkpoint stores them (the newest ComfyUI
# filters exactly these from its "clip missing" warning); the old one moves any cond_stage_model.transformer.*
# key under text_model., so a checkpoint cannot provide text_projection to it at all.
COMFY_ONLY_CLIP_KEYS = {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny_in_comfy(comfy, tiny_checkpoint):
    """(model patcher, CLIP, VAE, log messages) of the tiny checkpoint loaded by ComfyUI itself."""
    import comfy.sd

    root = logging.getLogger()
    records, level = _Records(), root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        # The old ComfyUI initialises CLIP's text_projection in place, which autograd forbids outside no_grad.
        with torch.no_grad():
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(
                str(tiny_checkpoint), output_vae=True, output_clip=True, embedding_directory=None
            )[:3]
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    return model, clip, vae, records.messages


@pytest.fixture(scope="module")
def tiny_sources():
    return tm.build_tiny_sd15_models(seed=0)


@pytest.mark.slow
def test_tiny_checkpoint_file(tiny_checkpoint):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), framework="pt") as handle:
        assert handle.metadata()["erasekit.seed"] == "0"
        keys = list(handle.keys())
        assert {handle.get_slice(k).get_dtype() for k in keys} == {"F16"}
    parts = ck.split_checkpoint(dict.fromkeys(keys))
    assert not parts.other
    assert (len(parts.unet), len(parts.vae), len(parts.text_encoder)) == (286, 248, 196)
    assert 600e6 < tiny_checkpoint.stat().st_size < 660e6


@pytest.mark.slow
def test_tiny_checkpoint_loads_in_comfyui_as_sd15_without_missing_keys(tiny_in_comfy, tiny_checkpoint):
    model, clip, vae, messages = tiny_in_comfy
    assert type(model.model.model_config).__name__ == "SD15"
    assert {k: model.model.model_config.unet_config[k] for k in TINY_COMFY_UNET_CONFIG} == TINY_COMFY_UNET_CONFIG

    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), framework="pt") as handle:
        parts = ck.split_checkpoint(dict.fromkeys(handle.keys()))
    assert set(model.model.diffusion_model.state_dict()) == set(parts.unet)
    assert set(vae.first_stage_model.state_dict()) == set(parts.vae)
    clip_keys = set(clip.cond_stage_model.state_dict())
    assert clip_keys - COMFY_ONLY_CLIP_KEYS == {"clip_l.transformer." + key for key in parts.text_encoder}

    # ComfyUI's own reports: nothing missing or left over, apart from the two CLIP keys above.
    for phrase in ("unet missing", "unet unexpected", "Missing VAE keys", "Leftover VAE keys", "clip unexpected",
                   "left over keys"):
        assert not [m for m in messages if phrase in m], phrase
    for message in messages:
        if message.startswith("clip missing"):
            assert set(ast.literal_eval(message.split(":", 1)[1].strip())) <= COMFY_ONLY_CLIP_KEYS, message


@pytest.mark.slow
def test_tiny_checkpoint_weights_equal_the_built_modules(comfy, tiny_in_comfy, tiny_sources):
    import comfy.diffusers_convert
    import comfy.utils

    model, clip, vae, _ = tiny_in_comfy
    comfy_unet = model.model.diffusion_model.state_dict()
    comfy_vae = vae.first_stage_model.state_dict()
    comfy_clip = clip.cond_stage_model.state_dict()

    def same(stored: torch.Tensor, source: torch.Tensor) -> bool:  # the file holds float16
        return stored.shape == source.shape and torch.equal(stored.float(), source.half().float())

    unet_sd = tiny_sources.unet.state_dict()
    vae_sd = tiny_sources.vae.state_dict()
    clip_sd = file_state_dict(tiny_sources.text_encoder)

    # Spot checks named by hand: an attention in the upper up level, the first up level's upsampler (after its
    # attention), a resnet shortcut, the mirrored VAE decoder, its 1x1-conv attention, a CLIP layer.
    pairs = [
        (comfy_unet, "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
         unet_sd, "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight"),
        (comfy_unet, "output_blocks.1.2.conv.weight", unet_sd, "up_blocks.0.upsamplers.0.conv.weight"),
        (comfy_unet, "input_blocks.3.0.skip_connection.weight",
         unet_sd, "down_blocks.1.resnets.0.conv_shortcut.weight"),
        (comfy_unet, "input_blocks.2.0.op.weight", unet_sd, "down_blocks.0.downsamplers.0.conv.weight"),
        (comfy_vae, "decoder.up.3.block.2.conv1.weight", vae_sd, "decoder.up_blocks.0.resnets.2.conv1.weight"),
        (comfy_clip, "clip_l.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
         clip_sd, "text_model.encoder.layers.11.mlp.fc2.weight"),
    ]
    for stored, stored_key, source, source_key in pairs:
        assert same(stored[stored_key], source[source_key]), stored_key
    attention_q = comfy_vae["encoder.mid.attn_1.q.weight"]
    assert attention_q.shape == (512, 512, 1, 1)
    assert same(attention_q[:, :, 0, 0], vae_sd["encoder.mid_block.attentions.0.to_q.weight"])

    # Every tensor, through ComfyUI's own diffusers maps.
    unet_map = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    assert all(same(comfy_unet[unet_map[key]], tensor) for key, tensor in unet_sd.items())
    vae_reference = comfy.diffusers_convert.convert_vae_state_dict(dict(vae_sd))
    assert all(same(comfy_vae[key], tensor) for key, tensor in vae_reference.items())
    assert all(same(comfy_clip["clip_l.transformer." + key], tensor) for key, tensor in clip_sd.items())


@pytest.mark.slow
def test_tiny_checkpoint_samples_encodes_and_decodes_finite(comfy, tiny_in_comfy):
    import comfy.sample

    model, clip, vae, _ = tiny_in_comfy
    with torch.no_grad():
        def conditioning(text):
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            return [[cond, {"pooled_output": pooled}]]

        positive, negative = conditioning("a photo of a cat"), conditioning("")
        assert positive[0][0].shape == (1, 77, 768) and torch.isfinite(positive[0][0]).all()
        assert not torch.equal(positive[0][0], negative[0][0])

        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, 0)
        samples = comfy.sample.sample(model, noise, 1, 7.0, "euler", "normal", positive, negative, latent,
                                      seed=0, disable_pbar=True)
        assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()

        image = vae.decode(samples)
        assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all() and image.std() > 0
