"""The SPM membrane loader node in ComfyUI: FT gates per sample inside one UNet batch, FT off as ComfyUI's own LoRA,
chains, untouched inputs, errors; in-process on the tiny SD1.5 checkpoint, plus one real-server workflow."""
from __future__ import annotations

import io
import logging
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import erasekit
from erasekit.erasers import spm
from erasekit.erasers.erasure import FamilyMismatchError
from erasekit.erasers.errors import FileError
from erasekit.erasers.spm.membrane import Membrane, MembraneFileError, MembraneLayer

NODE = "EraseKitLoadMembrane"
OFFICIAL_META = {"rank": "1", "alpha": "1.0"}
PROMPTS = ["a red circle", "a blue square", ""]  # one UNet batch: two prompts of a prompt list, the empty negative


def _write_official(path, unet_config: dict, prompts: str, seed: int, scale: float = 0.05) -> None:
    """An SPM file as train_spm.py writes it (SPMNetwork's discovery and names) for a diffusers UNet config."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if module.__class__.__name__ != "Transformer2DModel":
            continue
        for child_name, child in module.named_modules():
            kohya = f"lora_unet.{name}.{child_name}".replace(".", "_")
            if isinstance(child, torch.nn.Conv2d):
                down = torch.randn(1, child.in_channels, *child.kernel_size, generator=g)
                up = torch.randn(child.out_channels, 1, 1, 1, generator=g)
            elif isinstance(child, torch.nn.Linear):
                down = torch.randn(1, child.in_features, generator=g)
                up = torch.randn(child.out_features, 1, generator=g)
            else:
                continue
            state[f"{kohya}.lora_down.weight"] = scale * down
            state[f"{kohya}.lora_up.weight"] = scale * up
            state[f"{kohya}.alpha"] = torch.tensor(1.0)
    save_file(state, str(path), {"prompts": prompts, **OFFICIAL_META})


@pytest.fixture(scope="module")
def membranes(tmp_path_factory) -> dict[str, object]:
    """Membrane files for the tiny checkpoint's real module shapes (84 modules), erasing "circle" / "square"."""
    from erasekit.testing.tiny_models import TINY_SD15_UNET_CONFIG

    folder = tmp_path_factory.mktemp("spm")
    _write_official(folder / "circle.safetensors", TINY_SD15_UNET_CONFIG, "circle", seed=1)
    _write_official(folder / "square.safetensors", TINY_SD15_UNET_CONFIG, "square", seed=2)
    return {"folder": folder, **{n: spm.load_membrane(folder / f"{n}.safetensors") for n in ("circle", "square")}}


@pytest.fixture
def spm_folder(comfy, membranes, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "spm", ([str(membranes["folder"])], {".safetensors"}))
    return membranes["folder"]


def _load(model, clip, name: str, strength: float = 1.0, ft: bool = True, combine: str = "additive"):
    with torch.inference_mode():
        return erasekit.NODE_CLASS_MAPPINGS[NODE]().load(model, clip, name, strength, ft, combine)


def _encode(clip, texts: list[str]) -> torch.Tensor:
    """Contexts [B, 77, 768] as CLIPTextEncode makes them (one conditioning per prompt), stacked."""
    import nodes

    with torch.inference_mode():
        return torch.cat([nodes.CLIPTextEncode().encode(clip, text)[0][0][0] for text in texts])


def _noise(batch: int) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _apply(model, context: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """One UNet call with one sample per context row, the model loaded as a sampler loads it."""
    import comfy.model_management as mm

    x = _noise(len(context)) if x is None else x
    with torch.inference_mode():
        mm.load_models_gpu([model])
        return model.model.apply_model(x, torch.full((len(x),), 2.0), c_crossattn=context).float()


def _dense(model, membrane_list, strengths, combine="additive"):
    """A clone of `model` with the membranes merged into its weights at fixed strengths (the reference)."""
    from erasekit.erasers.families import UNetLayout

    layout = UNetLayout.from_ldm_keys(k for k, _ in model.model.diffusion_model.named_parameters())
    deltas = spm.merged_deltas(membrane_list, strengths, combine)
    clone = model.clone()
    assert len(clone.add_patches({spm.ldm_key(p, layout): (d,) for p, d in deltas.items()}, 1.0)) == len(deltas)
    return clone


def _per_sample_reference(model, membrane_list, gates, context, combine="additive") -> torch.Tensor:
    """Each sample alone (its noise row, its context row) through the model with the membranes merged densely at
    that sample's gates."""
    x = _noise(len(context))
    return torch.cat([_apply(_dense(model, membrane_list, gates[b].tolist(), combine), context[b:b + 1], x[b:b + 1])
                      for b in range(len(context))])


def _assert_rows_close(out: torch.Tensor, reference: torch.Tensor, tol: float = 1e-4) -> None:
    for b in range(len(out)):
        error = ((out[b] - reference[b]).norm() / reference[b].norm()).item()
        assert error <= tol, f"sample {b}: relative error {error:.2e}"


# --- 1. FT off: ComfyUI's own LoRA --------------------------------------------------------------------------------


def test_ft_off_is_comfyuis_lora_loader(comfy, loaded, spm_folder, monkeypatch):
    import comfy.model_management as mm
    import folder_paths

    import nodes

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(spm_folder)], {".safetensors"}))
    model, clip = loaded
    assert "circle.safetensors" in erasekit.NODE_CLASS_MAPPINGS[NODE].INPUT_TYPES()["required"]["membrane_name"][0]
    ours, _ = _load(model, clip, "circle.safetensors", 0.7, ft=False)
    with torch.inference_mode():
        theirs, _ = nodes.LoraLoader().load_lora(model, clip, "circle.safetensors", 0.7, 0.7)
    assert ours.object_patches == model.object_patches  # a static LoRA: weight patches only
    weights = []
    for patched in (ours, theirs):
        with torch.inference_mode():
            mm.load_models_gpu([patched])
        weights.append({k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()})
    mm.load_models_gpu([model])
    base = model.model.diffusion_model.state_dict()
    key = "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight"
    assert not torch.equal(weights[0][key], base[key])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in base)


# --- 2. FT on: each sample of one UNet batch gated by its own prompt ----------------------------------------------


def test_ft_gates_each_sample_of_one_batch_by_its_own_prompt(loaded, membranes, spm_folder):
    from erasekit.nodes.membrane_adapter import membrane_gates

    model, clip = loaded
    gated, gated_clip = _load(model, clip, "circle.safetensors")
    context = _encode(gated_clip, PROMPTS)
    gates = membrane_gates(gated, context)
    assert gates.shape == (3, 1)
    assert gates[0, 0] == 1.0  # names the erased concept: token overlap 1
    assert 0 < gates[1, 0] < 1 and 0 < gates[2, 0] < 1 and gates[1, 0] != gates[2, 0]
    out = _apply(gated, context)
    assert not torch.allclose(out, _apply(model, context), rtol=1e-3, atol=1e-3)
    _assert_rows_close(out, _per_sample_reference(model, [membranes["circle"]], gates, context))


def test_a_prompt_list_batch_samples_each_prompt_as_if_alone(comfy, loaded, spm_folder):
    """ComfyUI's sampler on one conditioning that stacks a prompt per sample (what a prompt list makes), CFG
    included: each sample ends at the latents of its prompt sampled alone from that sample's noise."""
    import comfy.sample

    model, clip = loaded
    gated, gated_clip = _load(model, clip, "circle.safetensors")
    prompts, negative = _encode(gated_clip, PROMPTS[:2]), _encode(gated_clip, [""])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def sample(patched, context, rows):
        with torch.inference_mode():
            return comfy.sample.sample(patched, noise[rows], 3, 7.0, "euler", "normal", [[context, {}]],
                                       [[negative, {}]], torch.zeros_like(noise[rows]), seed=0).float()

    def distance(a, b):  # the random tiny model's latents are far from unit scale: relative to their RMS
        return ((a - b).abs().max() / b.pow(2).mean().sqrt()).item()

    batch = sample(gated, prompts, slice(0, 2))
    alone = torch.cat([sample(gated, prompts[b:b + 1], slice(b, b + 1)) for b in range(2)])
    assert distance(batch, alone) <= 1e-3
    # Not trivially equal: the membrane moves the concept's sample, and the other sample's own (partial) gate
    # gives other latents than the full membrane would.
    plain = sample(model, prompts, slice(0, 2))
    static, _ = _load(model, clip, "circle.safetensors", ft=False)
    assert distance(alone[0], plain[0]) > 1e-2
    assert distance(alone[1], sample(static, prompts[1:2], slice(1, 2))[0]) > 1e-2


def test_concepts_input_for_files_without_prompts(loaded, membranes, spm_folder):
    from erasekit.erasers.spm.membrane import MissingConceptsError
    from erasekit.nodes.membrane_adapter import membrane_gates

    model, clip = loaded
    tensors = spm.kohya_tensors(membranes["circle"])
    save_file(tensors, str(spm_folder / "unnamed.safetensors"), OFFICIAL_META)  # no "prompts"
    with pytest.raises(MissingConceptsError, match=r"unnamed\.safetensors does not say .*'concepts' input"):
        _load(model, clip, "unnamed.safetensors")
    reference, reference_clip = _load(model, clip, "circle.safetensors")
    context = _encode(reference_clip, PROMPTS)
    with torch.inference_mode():
        typed, _ = erasekit.NODE_CLASS_MAPPINGS[NODE]().load(model, clip, "unnamed.safetensors", 1.0, True,
                                                             "additive", concepts=" circle ")
        renamed, _ = erasekit.NODE_CLASS_MAPPINGS[NODE]().load(model, clip, "circle.safetensors", 1.0, True,
                                                               "additive", concepts="square, star")
    assert torch.equal(membrane_gates(typed, context), membrane_gates(reference, context))
    assert membrane_gates(renamed, _encode(reference_clip, ["a blue square"]))[0, 0] == 1.0  # overrides the file
    plain_lora, _ = _load(model, clip, "unnamed.safetensors", ft=False)  # FT off needs no concepts
    assert plain_lora.object_patches == model.object_patches and plain_lora.patches


def test_a_sampler_scores_each_distinct_prompt_once(comfy, loaded, spm_folder, monkeypatch, caplog):
    """A prompt list's conditioning (one prompt per batch item) and the empty negative, sampled by KSampler's code."""
    import nodes
    from erasekit.erasers.spm import transport as spm_transport

    model, clip = loaded
    gated, gated_clip = _load(model, clip, "circle.safetensors")
    with torch.inference_mode():
        (a,), (b,), (negative,) = (nodes.CLIPTextEncode().encode(gated_clip, t)[0] for t in PROMPTS)
    positive = [[torch.cat([a[0], b[0]]), {"pooled_output": torch.cat([a[1]["pooled_output"],
                                                                       b[1]["pooled_output"]])}]]
    scored = []
    original = spm_transport.transport_strengths

    def counting(contexts, tokens, concepts, metric="clipcos_tokenuni"):
        scored.extend(tokens)
        return original(contexts, tokens, concepts, metric)

    monkeypatch.setattr(spm_transport, "transport_strengths", counting)
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    with caplog.at_level(logging.WARNING, logger="erasekit"), torch.inference_mode():
        (samples,) = nodes.common_ksampler(gated, 0, 3, 7.0, "euler", "normal", positive, [negative], latent)
    assert samples["samples"].shape == (2, 4, 8, 8) and torch.isfinite(samples["samples"]).all()
    assert len(scored) == 3 and None not in scored  # circle, square, "": once each for 3 steps × (cond + uncond)
    assert "clipcos alone" not in caplog.text


def test_an_unrecorded_prompt_is_gated_by_clipcos_and_warns_once(loaded, spm_folder, caplog):
    from erasekit.nodes.membrane_adapter import membrane_gates

    model, clip = loaded
    gated, gated_clip = _load(model, clip, "circle.safetensors")
    plain = _encode(clip, ["a circle nobody recorded", "another circle nobody recorded"])  # the input CLIP
    with caplog.at_level(logging.WARNING, logger="erasekit"):
        gates = membrane_gates(gated, plain[:1])
        membrane_gates(gated, plain[1:])
    assert caplog.text.count("clipcos alone") == 1
    assert gates[0, 0] < 1  # "circle" is named, but without token ids only clipcos counts
    # A clone of the loader's CLIP (CLIPSetLastLayer and LoRA loaders clone it) still records.
    again = _encode(gated_clip.clone(), ["a circle nobody recorded"])
    assert membrane_gates(gated, again)[0, 0] == 1.0


def test_a_context_cast_or_repeated_by_comfyui_keeps_its_tokens(loaded, spm_folder, caplog):
    """A half-precision model gets the context cast to its dtype; ComfyUI batches a 77-token context with a
    154-token one by repeating it. A concatenation of two prompts is neither."""
    from erasekit.nodes.membrane_adapter import membrane_gates

    model, clip = loaded
    gated, gated_clip = _load(model, clip, "circle.safetensors")
    circle, square = _encode(gated_clip, PROMPTS[:2])
    with caplog.at_level(logging.WARNING, logger="erasekit"):
        assert membrane_gates(gated, circle.repeat(2, 1)[None])[0, 0] == 1.0
        for dtype in (torch.float16, torch.bfloat16):
            assert membrane_gates(gated, circle[None].to(dtype))[0, 0] == 1.0
        assert "clipcos alone" not in caplog.text
        assert membrane_gates(gated, torch.cat([circle, square])[None])[0, 0] < 1
    assert "clipcos alone" in caplog.text


# --- 3. the input MODEL and CLIP stay as they were ----------------------------------------------------------------


def test_inputs_are_untouched(loaded, spm_folder):
    model, clip = loaded
    context = _encode(clip, PROMPTS)
    before = _apply(model, context)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    patches, object_patches = {k: list(v) for k, v in model.patches.items()}, dict(model.object_patches)
    for ft in (True, False):
        gated, gated_clip = _load(model, clip, "circle.safetensors", ft=ft)
        assert not torch.allclose(_apply(gated, _encode(gated_clip, PROMPTS)), before, rtol=1e-3, atol=1e-3)
    assert torch.equal(_apply(model, context), before)
    assert torch.equal(_encode(clip, PROMPTS), context)
    assert all(torch.equal(v, weights[k]) for k, v in model.model.state_dict().items())
    assert {k: list(v) for k, v in model.patches.items()} == patches and model.object_patches == object_patches
    assert not {"encode_from_tokens", "clone"} & set(vars(clip))


# --- 4. chains ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combine", ["additive", "official"])
def test_a_chain_is_one_membrane_set(loaded, membranes, spm_folder, combine):
    from erasekit.nodes.membrane_adapter import membrane_gates

    model, clip = loaded
    first, first_clip = _load(model, clip, "circle.safetensors", 1.0, combine=combine)
    chained, chained_clip = _load(first, first_clip, "square.safetensors", 0.5, combine=combine)
    context = _encode(chained_clip, PROMPTS)
    gates = membrane_gates(chained, context)
    assert gates.shape == (3, 2)
    assert gates[0, 0] == 1.0 and gates[1, 1] == 0.5  # each prompt names one concept; square at strength 0.5
    pair = [membranes["circle"], membranes["square"]]
    if combine == "official":  # cross terms: not the sum of the two membranes' deltas
        merged = spm.merged_deltas(pair, gates[0].tolist(), combine)
        summed = spm.merged_deltas(pair, gates[0].tolist(), "additive")
        assert not torch.allclose(merged[next(iter(merged))], summed[next(iter(summed))])
    _assert_rows_close(_apply(chained, context), _per_sample_reference(model, pair, gates, context, combine))
    # The first loader's output still has its one membrane.
    assert membrane_gates(first, context).shape == (3, 1)


def test_official_ft_off_and_mixed_combines(loaded, membranes, spm_folder):
    from erasekit.nodes.membrane_adapter import membrane_gates

    model, clip = loaded
    static, static_clip = _load(model, clip, "circle.safetensors", 0.5, ft=False, combine="official")
    context = _encode(static_clip, PROMPTS[:1])
    assert membrane_gates(static, context).tolist() == [[0.5]]
    # infer_spm.py scales both factors: the delta is 0.5² U D.
    _assert_rows_close(_apply(static, context),
                       _per_sample_reference(model, [membranes["circle"]], torch.tensor([[0.5]]), context, "official"))
    with pytest.raises(ValueError, match="chose 'official'"):
        _load(static, static_clip, "square.safetensors", combine="additive", ft=True)


# --- 5. errors ----------------------------------------------------------------------------------------------------


def test_wrong_family_shape_and_corrupt_files(loaded, spm_folder):
    from erasekit.testing.tiny_models import SD15_UNET_CONFIG

    model, clip = loaded
    _write_official(spm_folder / "full-sd15.safetensors", SD15_UNET_CONFIG, "circle", seed=3)
    with pytest.raises(FamilyMismatchError, match=r"no layer down_blocks\.0\.attentions\.1\.proj_in .*Stable Diff"):
        _load(model, clip, "full-sd15.safetensors")  # SD1.5 has two attention blocks per level, the tiny one one
    g = torch.Generator().manual_seed(0)
    to_k = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # 640 wide in the tiny model
    wide = Membrane({to_k: MembraneLayer(torch.randn(1, 768, generator=g), torch.randn(1280, 1, generator=g), 1.0)},
                    ["circle"], 1.0)
    spm.save_membrane(wide, spm_folder / "wide.safetensors")
    with pytest.raises(FamilyMismatchError, match=rf"layer {to_k}: the membrane fits a \(1280, 768\) weight, "
                                                  r"the model's is \(640, 768\); the membrane is for Stable Diff"):
        _load(model, clip, "wide.safetensors")
    sdxl = Membrane({to_k: MembraneLayer(torch.randn(1, 2048, generator=g), torch.randn(640, 1, generator=g), 1.0)},
                    ["circle"], 1.0)
    spm.save_membrane(sdxl, spm_folder / "sdxl.safetensors")
    with pytest.raises(FamilyMismatchError, match=rf"Stable Diffusion XL \(its layer {to_k} reads a 2048-wide.*"
                                                  r"cannot apply to a Stable Diffusion 1\.x model"):
        _load(model, clip, "sdxl.safetensors", ft=False)
    (spm_folder / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MembraneFileError, match="not a readable .safetensors"):
        _load(model, clip, "corrupt.safetensors")
    with pytest.raises(FileError, match=r"'membrane_name': expected a file in models/spm, found no file "
                                        r"'missing.safetensors'"):
        _load(model, clip, "missing.safetensors")


# --- 6. a real server ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_trained_membrane_loads_in_comfyuis_lora_loader(comfy_server, tiny_checkpoint, tmp_path):
    """Our trainer's file in ComfyUI's own LoraLoader, in a real server: every key is taken and the latents move."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    from erasekit.erasers.spm.train import SPMTrainConfig, train_spm
    from erasekit.shapes.model import build_tokenizer
    from erasekit.testing.tiny_models import build_tiny_sd15_models

    models = build_tiny_sd15_models(seed=0)  # the tiny checkpoint's weights, as diffusers modules
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=build_tokenizer(),
                                   unet=models.unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    config = SPMTrainConfig(iterations=2, ddim_steps=3, warmup=0, lr=1e-2, checkpoint_every=0, resolution=64,
                            dynamic_resolution=False)
    train_spm(pipe, "circle", config=config, out=comfy_server.models_dir / "loras" / "trained-circle.safetensors")

    def branch(model: list, prefix: str, node: int) -> dict:
        return {
            str(node): {"class_type": "KSampler", "inputs": {
                "model": model, "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 0,
                "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            str(node + 1): {"class_type": "SaveLatent",
                            "inputs": {"samples": [str(node), 0], "filename_prefix": prefix}},
        }

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "strength_model": 20.0,
                                                     "strength_clip": 1.0, "lora_name": "trained-circle.safetensors"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        **branch(["1", 0], "erasekit_base", 10), **branch(["2", 0], "erasekit_trained", 20),
    }
    log_before = comfy_server.client.log_tail(100_000)
    comfy_server.client.run(prompt)
    new_log = comfy_server.client.log_tail(100_000)[len(log_before):]
    assert "lora key not loaded" not in new_log, new_log
    latents = {prefix: load_file(str(next(comfy_server.output_dir.rglob(f"{prefix}_*.latent"))))["latent_tensor"]
               for prefix in ("erasekit_base", "erasekit_trained")}
    assert (latents["erasekit_trained"] - latents["erasekit_base"]).abs().max() > 1e-3


@pytest.mark.slow
def test_membrane_workflow_in_a_server(comfy_server, tiny_checkpoint, membranes):
    shutil.copy(membranes["folder"] / "circle.safetensors", comfy_server.models_dir / "spm" / "circle.safetensors")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
        "2": {"class_type": NODE, "inputs": {"model": ["1", 0], "clip": ["1", 1], "membrane_name": "circle.safetensors",
                                             "strength": 1.0, "facilitated_transport": True, "combine": "additive"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 0,
            "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "erasekit_spm"}},
    }
    client = comfy_server.client
    (png,) = client.images(client.run(prompt))
    assert Image.open(io.BytesIO(png)).size == (64, 64)
