"""SPM membranes: the official file format, names, Facilitated Transport, combination, and diffusers hooks."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erasekit.erasers import spm
from erasekit.erasers.erasure import FamilyMismatchError
from erasekit.erasers.families import FAMILIES, UNetLayout
from erasekit.erasers.spm import transport as spm_transport
from erasekit.erasers.spm.hooks import (
    TransportFallbackWarning,
    attach_membranes,
    detach_membranes,
    membrane_gates,
    membrane_targets,
)
from erasekit.erasers.spm.membrane import Membrane, MembraneFileError, MembraneLayer
from erasekit.erasers.spm.transport import Concepts

SD15 = UNetLayout(FAMILIES["sd1"].num_res_blocks)
SDXL = UNetLayout(FAMILIES["sdxl"].num_res_blocks)


# --- tiny models --------------------------------------------------------------------------------------------------


def _text_encoder(tokenizer, width: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=16, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                         layers_per_block=1)


@pytest.fixture(scope="module")
def sd1_pipe():
    """A diffusers StableDiffusionPipeline of SD1.x structure (768-wide context, 1×1-conv proj_in/out), tiny."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from erasekit.shapes.model import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=2, norm_num_groups=8).eval()
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(tokenizer, 768), tokenizer=tokenizer,
                                   unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def shapes_pipe():
    from erasekit.shapes import model

    tokenizer, text_encoder, unet = model.build_models(seed=0)
    return model.ShapesPipeline(tokenizer, text_encoder.eval(), unet.eval(), model.build_scheduler())


@pytest.fixture(autouse=True)
def _clean(sd1_pipe, shapes_pipe):
    yield
    detach_membranes(sd1_pipe)
    detach_membranes(shapes_pipe)


def _random_membrane(targets, concepts, rank=1, seed=0, alpha=1.0) -> Membrane:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, module in targets.items():
        w = module.weight
        up_kernel = (1, 1) if w.dim() == 4 else ()
        layers[path] = MembraneLayer(0.2 * torch.randn(rank, *w.shape[1:], generator=g),
                                     0.2 * torch.randn(w.shape[0], rank, *up_kernel, generator=g), alpha)
    return Membrane(layers, list(concepts), alpha)


def _write_official(unet, path, metadata, rank=1, odd_rank_layer: int | None = None) -> None:
    """An SPM file as train_spm.py writes it: SPMNetwork's discovery and naming, then save_weights."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    state = {}
    for name, module in unet.named_modules():
        if module.__class__.__name__ != "Transformer2DModel":
            continue
        for child_name, child in module.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            spm_name = f"lora_unet.{name}.{child_name}".replace(".", "_")
            r = 2 if len(state) // 3 == odd_rank_layer else rank
            if isinstance(child, torch.nn.Conv2d):
                down = torch.randn(r, child.in_channels, *child.kernel_size, generator=g)
                up = torch.randn(child.out_channels, r, 1, 1, generator=g)
            else:
                down = torch.randn(r, child.in_features, generator=g)
                up = torch.randn(child.out_features, r, generator=g)
            state[f"{spm_name}.lora_down.weight"] = down
            state[f"{spm_name}.lora_up.weight"] = up
            state[f"{spm_name}.alpha"] = torch.tensor(1.0)
    save_file(state, str(path), metadata)


OFFICIAL_METADATA = {"prompts": "circle,red star", "rank": "1", "alpha": "1.0"}


# --- file format and names ----------------------------------------------------------------------------------------


def test_official_file_round_trips_byte_for_byte(sd1_pipe, tmp_path):
    from safetensors import safe_open

    original = tmp_path / "snoopy_last.safetensors"
    _write_official(sd1_pipe.unet, original, OFFICIAL_METADATA)
    membrane = spm.load_membrane(original)
    assert membrane.concepts == ["circle", "red star"]
    assert (membrane.rank, membrane.alpha, membrane.family) == (1, 1.0, "sd1")
    copy_path = spm.save_membrane(membrane, tmp_path / "copy.safetensors")
    # Not the whole files: safetensors writes the metadata map in hash order, which varies between writes.
    with safe_open(str(original), "pt") as a, safe_open(str(copy_path), "pt") as b:
        # The copy adds only EraseKit's writer and content hash, which LoRA loaders ignore.
        ours = {k: v for k, v in b.metadata().items() if k.startswith("erasekit_")}
        assert a.metadata() == {k: v for k, v in b.metadata().items() if k not in ours} == OFFICIAL_METADATA
        assert sorted(ours) == ["erasekit_sha256", "erasekit_writer"]
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            ta, tb = a.get_tensor(key), b.get_tensor(key)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, key
            assert ta.numpy().tobytes() == tb.numpy().tobytes(), key


def test_kohya_names_map_to_the_modules_they_name(sd1_pipe, tmp_path):
    _write_official(sd1_pipe.unet, tmp_path / "m.safetensors", OFFICIAL_METADATA)
    membrane = spm.load_membrane(tmp_path / "m.safetensors")
    targets = membrane_targets(sd1_pipe)
    assert list(membrane.layers) == sorted(targets)  # 4 transformer blocks × 12 modules
    assert len(targets) == 48
    for path, layer in membrane.layers.items():
        assert tuple(targets[path].weight.shape) == layer.weight_shape
    proj_in = membrane.layers["down_blocks.0.attentions.0.proj_in"]
    assert proj_in.down.shape == (1, 16, 1, 1) and proj_in.up.shape == (16, 1, 1, 1)
    to_k = membrane.layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert to_k.down.shape == (1, 768) and to_k.up.shape == (16, 1)


@pytest.mark.parametrize("config_name, count, projection", [("SD15_UNET_CONFIG", 192, torch.nn.Conv2d),
                                                            ("SDXL_UNET_CONFIG", 722, torch.nn.Linear)])
def test_full_size_targets_and_kohya_names_invert(config_name, count, projection):
    from diffusers import UNet2DConditionModel

    from erasekit.testing import tiny_models

    with torch.device("meta"):
        unet = UNet2DConditionModel(**getattr(tiny_models, config_name))
    targets = membrane_targets(unet)
    assert len(targets) == count
    assert isinstance(targets["mid_block.attentions.0.proj_in"], projection)
    for path in targets:
        assert spm.module_path(spm.kohya_name(path)) == path


@pytest.mark.parametrize("kohya, ldm, layout", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "diffusion_model.input_blocks.1.1.proj_in.weight", SD15),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0",
     "diffusion_model.input_blocks.2.1.transformer_blocks.0.attn1.to_out.0.weight", SD15),
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_0_proj",
     "diffusion_model.input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight", SD15),
    ("lora_unet_mid_block_attentions_0_proj_out", "diffusion_model.middle_block.1.proj_out.weight", SD15),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k",
     "diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", SD15),
    ("lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_ff_net_2",
     "diffusion_model.output_blocks.9.1.transformer_blocks.0.ff.net.2.weight", SD15),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_v",
     "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_v.weight", SDXL),
    ("lora_unet_up_blocks_0_attentions_2_transformer_blocks_9_attn1_to_q",
     "diffusion_model.output_blocks.2.1.transformer_blocks.9.attn1.to_q.weight", SDXL),
])
def test_names_in_the_three_schemes(kohya, ldm, layout):
    path = spm.module_path(kohya)
    assert spm.kohya_name(path) == kohya
    assert spm.ldm_key(path, layout) == ldm
    assert spm.module_path_from_ldm_key("model." + ldm, layout) == path


@pytest.mark.parametrize("name", ["lora_unet_input_blocks_1_1_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1",
                                  "lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks_0_attentions_0_proj_in"])
def test_module_path_rejects_other_names(name):
    with pytest.raises(ValueError, match="kohya name"):
        spm.module_path(name)


# --- Facilitated Transport ----------------------------------------------------------------------------------------


def _numpy_transport(prompts, prompt_tokens, concepts, concept_tokens, owner, count, metric):
    out = np.full((len(prompts), count), -np.inf)
    for b, (p, pt) in enumerate(zip(prompts, prompt_tokens)):
        for k, (c, ct) in enumerate(zip(concepts, concept_tokens)):
            clipcos = p.ravel() @ c.ravel() / (np.linalg.norm(p) * np.linalg.norm(c))
            tokenuni = len(pt & ct) / len(ct) if pt is not None else None
            if tokenuni is None or metric == "clipcos":
                score = clipcos
            elif metric == "tokenuni":
                score = tokenuni
            else:
                score = max(clipcos, tokenuni)
            out[b, owner[k]] = max(out[b, owner[k]], score)
    return out


@pytest.mark.parametrize("metric", ["clipcos_tokenuni", "clipcos", "tokenuni"])
def test_transport_matches_a_numpy_reimplementation(metric):
    rng = np.random.default_rng(0)
    concepts = rng.normal(size=(3, 77, 16))
    prompts = np.stack([concepts[0] + 0.3 * rng.normal(size=(77, 16)), rng.normal(size=(77, 16)),
                        concepts[2] + 0.1 * rng.normal(size=(77, 16)), -concepts[1]])
    concept_tokens = [frozenset({5, 7}), frozenset({7, 11, 12}), frozenset({20})]
    prompt_tokens = [frozenset({5, 7, 9}), frozenset({11, 30}), None, frozenset()]
    owner = [0, 0, 1]
    bank = Concepts(torch.tensor(concepts, dtype=torch.float32), concept_tokens, torch.tensor(owner), 2)
    got = spm.transport_strengths(torch.tensor(prompts, dtype=torch.float32), prompt_tokens, bank, metric)
    expected = _numpy_transport(prompts, prompt_tokens, concepts, concept_tokens, owner, 2, metric)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_token_sets_drop_special_tokens():
    ids = torch.tensor([[0, 5, 7, 5, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
    assert spm.token_sets(ids, [0, 1, 2]) == [frozenset({5, 7}), frozenset()]


# --- combination --------------------------------------------------------------------------------------------------

TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
PROJ_IN = "down_blocks.0.attentions.0.proj_in"


def _factor_membrane(seed: int, alpha: float, rank: int = 2) -> Membrane:
    """A membrane on a linear to_k (768 → 8) and a 3×3 conv proj_in (8 → 8)."""
    g = torch.Generator().manual_seed(seed)
    layers = {TO_K: MembraneLayer(torch.randn(rank, 768, generator=g), torch.randn(8, rank, generator=g), alpha),
              PROJ_IN: MembraneLayer(torch.randn(rank, 8, 3, 3, generator=g), torch.randn(8, rank, 1, 1, generator=g),
                                     alpha)}
    return Membrane(layers, [f"concept {seed}"], alpha)


def _product(up, down):
    return torch.einsum("or,r...->o...", up.flatten(1), down)


def test_additive_and_official_combinations_against_direct_computation():
    a, b = _factor_membrane(1, alpha=1.0), _factor_membrane(2, alpha=4.0)  # α/r = 0.5 and 2
    m = (0.7, 0.3)
    additive = spm.merged_deltas([a, b], m, "additive")
    official = spm.merged_deltas([a, b], m, "official")
    for path in (TO_K, PROJ_IN):
        (ua, da), (ub, db) = [(x.layers[path].up, x.layers[path].down) for x in (a, b)]
        expected = 0.7 * 0.5 * _product(ua, da) + 0.3 * 2.0 * _product(ub, db)
        torch.testing.assert_close(additive[path], expected, rtol=1e-5, atol=1e-5)
        # Built from the first file's metadata (α/r = 0.5); every factor scaled by its m, then summed: cross terms.
        expected = 0.5 * (0.49 * _product(ua, da) + 0.21 * _product(ua, db) + 0.21 * _product(ub, da)
                          + 0.09 * _product(ub, db))
        torch.testing.assert_close(official[path], expected, rtol=1e-5, atol=1e-5)
    single = spm.merged_deltas([a], [0.6], "official")[TO_K]
    torch.testing.assert_close(single, 0.36 * 0.5 * _product(a.layers[TO_K].up, a.layers[TO_K].down))


@pytest.mark.parametrize("combine", ["additive", "official"])
def test_per_sample_delta_equals_the_dense_delta_at_each_samples_strength(combine):
    """add_to(output, x) = output + ΔW·x with each sample's own strengths."""
    membranes = [_factor_membrane(1, alpha=1.0), _factor_membrane(2, alpha=2.0)]
    stacks = spm.stack_membranes(membranes, combine)
    strengths = torch.tensor([[0.9, 0.1], [0.2, 0.6]])
    g = torch.Generator().manual_seed(3)
    x_conv, x_lin = torch.randn(2, 8, 5, 5, generator=g), torch.randn(2, 77, 768, generator=g)
    base_conv, base_lin = torch.randn(2, 8, 5, 5, generator=g), torch.randn(2, 77, 8, generator=g)
    conv = stacks[PROJ_IN].add_to(base_conv, x_conv, strengths, padding=1) - base_conv
    lin = stacks[TO_K].add_to(base_lin, x_lin, strengths) - base_lin
    for i in range(2):
        dense = spm.merged_deltas(membranes, strengths[i].tolist(), combine)
        torch.testing.assert_close(conv[i], F.conv2d(x_conv[i:i + 1], dense[PROJ_IN], padding=1)[0],
                                   rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(lin[i], x_lin[i] @ dense[TO_K].T, rtol=1e-5, atol=1e-4)


def test_official_combination_needs_equal_ranks():
    with pytest.raises(ValueError, match="same rank"):
        spm.stack_membranes([_factor_membrane(1, 1.0, rank=1), _factor_membrane(2, 1.0, rank=2)], "official")


# --- diffusers ----------------------------------------------------------------------------------------------------


def _run(unet, x, context):
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=context).sample


def _dense_copy(unet, membranes, strengths, combine="additive"):
    """A copy of `unet` (with no membranes attached) with the membranes merged into its weights."""
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for path, delta in spm.merged_deltas(membranes, strengths, combine).items():
            merged.get_submodule(path).weight += delta
    return merged


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("combine", ["additive", "official"])
def test_per_sample_gates_match_dense_merges_and_detach_restores_exactly(shapes_pipe, combine):
    unet = shapes_pipe.unet
    targets = membrane_targets(shapes_pipe)
    membranes = [_random_membrane(targets, ["circle"], seed=1), _random_membrane(targets, ["star", "box"], seed=2)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    params = {k: v.clone() for k, v in unet.state_dict().items()}
    context_before = shapes_pipe.encode(["a red circle", "a blue cross"])
    before = _run(unet, x, context_before)

    attach_membranes(shapes_pipe, membranes, strengths=[1.0, 0.5], combine=combine)
    context = shapes_pipe.encode(["a red circle", "a blue cross"])  # through the hooked text encoder
    out = _run(unet, x, context)
    gates = membrane_gates(shapes_pipe, context)
    assert gates[0, 0] == 1.0  # "circle" named: token overlap 1
    assert not torch.equal(gates[0], gates[1])
    assert not torch.allclose(out, before)

    detach_membranes(shapes_pipe)
    assert torch.equal(_run(unet, x, context_before), before)
    assert all(torch.equal(v, params[k]) for k, v in unet.state_dict().items())
    for b in range(2):
        reference = _run(_dense_copy(unet, membranes, gates[b].tolist(), combine), x[b:b + 1], context[b:b + 1])
        assert _relative_error(out[b:b + 1], reference) <= 1e-5


def test_ft_off_equals_a_dense_merge_at_fixed_strengths(shapes_pipe):
    targets = membrane_targets(shapes_pipe)
    membranes = [_random_membrane(targets, ["circle"], seed=1), _random_membrane(targets, ["star"], seed=2)]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    context = shapes_pipe.encode(["a red circle", "a blue cross"])
    attach_membranes(shapes_pipe.unet, membranes, strengths=[0.8, 0.3], ft=False)
    out = _run(shapes_pipe.unet, x, context)
    detach_membranes(shapes_pipe)
    reference = _run(_dense_copy(shapes_pipe.unet, membranes, [0.8, 0.3]), x, context)
    assert _relative_error(out, reference) <= 1e-5


def test_a_repeated_context_reuses_its_gates_until_it_changes_in_place(shapes_pipe, monkeypatch):
    unet = shapes_pipe.unet
    membranes = [_random_membrane(membrane_targets(shapes_pipe), ["circle"], seed=1)]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    attach_membranes(shapes_pipe, membranes)
    context = shapes_pipe.encode(["a red circle", "a blue cross"])
    hashed = []
    original = spm_transport.row_keys
    monkeypatch.setattr(spm_transport, "row_keys", lambda rows: hashed.append(len(rows)) or original(rows))
    first = _run(unet, x, context)
    calls = len(hashed)
    assert calls and torch.equal(_run(unet, x, context), first) and len(hashed) == calls  # no row hashed again
    swapped = context.flip(0).clone()
    context.copy_(swapped)  # the same tensor, new rows: its gates must follow them
    out = _run(unet, x, context)
    assert len(hashed) > calls
    assert torch.equal(out, _run(unet, x, swapped))  # as a fresh tensor with those rows
    detach_membranes(shapes_pipe)


def test_gates_are_computed_once_per_prompt_in_a_pipeline_run(sd1_pipe, monkeypatch):
    membrane = _random_membrane(membrane_targets(sd1_pipe), ["circle"])
    attach_membranes(sd1_pipe, [membrane])
    calls = []
    original = spm_transport.transport_strengths

    def counting(contexts, tokens, concepts, metric):
        result = original(contexts, tokens, concepts, metric)
        calls.append(list(zip(tokens, result[:, 0].tolist())))
        return result

    monkeypatch.setattr(spm_transport, "transport_strengths", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TransportFallbackWarning)  # every context came from the text encoder
        sd1_pipe(["a red circle", "a blue cross"], num_inference_steps=3, height=8, width=8, output_type="latent")
    # One UNet batch [uncond, uncond, cond, cond] per step: "" and the two prompts, scored once for all steps.
    assert len(calls) == 1 and len(calls[0]) == 3
    circle = sd1_pipe.tokenizer.convert_tokens_to_ids("circle")
    by_prompt = {("empty" if not t else "circle" if circle in t else "other"): g for t, g in calls[0]}
    assert by_prompt["circle"] == 1.0
    assert by_prompt["other"] < 1.0 and by_prompt["empty"] < 1.0  # the empty negative prompt is gated on its own


def test_sdxl_pipeline_gates_the_concatenated_context():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from erasekit.shapes.model import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                                cross_attention_dim=2048, attention_head_dim=2, norm_num_groups=8,
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16).eval()
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text_encoder(tokenizer, 768),
                                     text_encoder_2=_text_encoder(tokenizer, 1280, with_projection=True),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler(steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    targets = membrane_targets(pipe)
    assert isinstance(targets["down_blocks.1.attentions.0.proj_in"], torch.nn.Linear)
    membranes = [_random_membrane(targets, ["circle"], seed=1), _random_membrane(targets, ["star"], seed=2)]
    assert membranes[0].family == "sdxl"
    attach_membranes(pipe, membranes)
    seen = []
    unet.register_forward_pre_hook(lambda m, a, kw: seen.append(membrane_gates(pipe, kw["encoder_hidden_states"])),
                                   with_kwargs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TransportFallbackWarning)  # zero negative contexts count as seen
        pipe(["a red circle"], num_inference_steps=2, height=8, width=8, output_type="latent")
    gates = seen[0]
    assert gates.shape == (2, 2)
    assert torch.equal(gates[0], torch.zeros(2))  # force_zeros_for_empty_prompt: uncond context is zeros
    assert gates[1, 0] == 1.0  # tokens found through the CLIP-L part of the 2048-wide context
    detach_membranes(pipe)


def test_a_context_the_text_encoder_never_made_is_gated_by_clipcos_and_warns_once(shapes_pipe):
    membrane = _random_membrane(membrane_targets(shapes_pipe), ["circle"])
    context = shapes_pipe.encode(["a red circle", "a circle"])  # before attaching: not recorded
    attach_membranes(shapes_pipe, [membrane])
    with pytest.warns(TransportFallbackWarning) as record:
        gates = membrane_gates(shapes_pipe, context)
        membrane_gates(shapes_pipe, context * 2)
    assert len(record) == 1
    bank = Concepts(shapes_pipe.encode(["circle"]), [frozenset({0})], torch.tensor([0]), 1)
    torch.testing.assert_close(gates, spm.transport_strengths(context, [None, None], bank))
    assert (gates < 1).all()


# --- bad input ----------------------------------------------------------------------------------------------------


def test_load_errors(sd1_pipe, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(MembraneFileError, match="missing.safetensors does not exist"):
        spm.load_membrane(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(MembraneFileError, match="not a readable .safetensors"):
        spm.load_membrane(tmp_path / "junk.safetensors")
    good = tmp_path / "good.safetensors"
    _write_official(sd1_pipe.unet, good, OFFICIAL_METADATA)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(MembraneFileError, match="truncated"):
        spm.load_membrane(tmp_path / "cut.safetensors")
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MembraneFileError, match="not an SPM membrane"):
        spm.load_membrane(tmp_path / "model.safetensors")
    _write_official(sd1_pipe.unet, tmp_path / "bare.safetensors", {"rank": "1", "alpha": "1.0"})
    with pytest.raises(MembraneFileError, match=r"concepts=\["):
        spm.load_membrane(tmp_path / "bare.safetensors")
    assert spm.load_membrane(tmp_path / "bare.safetensors", concepts=["circle"]).concepts == ["circle"]
    _write_official(sd1_pipe.unet, tmp_path / "mixed.safetensors", OFFICIAL_METADATA, odd_rank_layer=5)
    with pytest.raises(MembraneFileError, match="rank"):
        spm.load_membrane(tmp_path / "mixed.safetensors")


def test_attach_errors_name_the_layer_and_the_family(sd1_pipe, shapes_pipe):
    from diffusers import UNet2DConditionModel

    from erasekit.testing.tiny_models import SD15_UNET_CONFIG

    with torch.device("meta"):
        full_size = membrane_targets(UNet2DConditionModel(**SD15_UNET_CONFIG))
    real_sd15 = _random_membrane(full_size, ["circle"])
    with pytest.raises(FamilyMismatchError,
                       match=r"down_blocks\.0\.attentions\.0\.proj_in.*\(320, 320, 1, 1\).*Stable Diffusion 1\.x"):
        attach_membranes(sd1_pipe, [real_sd15])
    shapes_membrane = _random_membrane(membrane_targets(shapes_pipe), ["circle"])
    with pytest.raises(FamilyMismatchError, match="shapes world.*Stable Diffusion 1.x"):
        attach_membranes(sd1_pipe, [shapes_membrane])
    sd1_membrane = _random_membrane(membrane_targets(sd1_pipe), ["circle"])
    with pytest.raises(ValueError, match="ft=False"):
        attach_membranes(sd1_pipe.unet, [sd1_membrane])
    with pytest.raises(ValueError, match="2 strengths"):
        attach_membranes(sd1_pipe, [sd1_membrane], strengths=[1.0, 1.0])
    assert not hasattr(sd1_pipe.unet, "_erasekit_membranes")
