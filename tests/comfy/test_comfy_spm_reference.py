"""SPM's reference gating in ComfyUI: the Load SPM Membrane node's uncond_gate="positive" with combine="official",
sampled by ComfyUI's own sampler (euler, 3 steps, cfg 7.5) on one batch of mixed prompts, against a float64 rebuild
of infer_spm.py (testing/infer_spm.py) run on a float64 copy of the same UNet; the default "own" against it; the
fallback when ComfyUI runs the negative prompt alone; chains that disagree."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import erasekit
from erasekit.erasers.errors import InputError
from erasekit.testing import infer_spm as reference

NODE = "EraseKitLoadMembrane"
PROMPTS = ["a red circle", "a blue square", "a photo of a star", "a house by the sea"]
NEGATIVE = "a striped triangle"
STEPS, GUIDANCE = 3, 7.5
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory, monkeypatch_module):
    """Official-layout files for the tiny checkpoint's UNet, erasing "circle" and "star, box", in models/spm."""
    import folder_paths
    from diffusers import UNet2DConditionModel

    from erasekit.testing.tiny_models import TINY_SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY_SD15_UNET_CONFIG)
    folder = tmp_path_factory.mktemp("spm")
    written = [reference.write_official_spm(folder / "circle.safetensors", unet, "circle", seed=1, scale=0.1),
               reference.write_official_spm(folder / "star.safetensors", unet, "star,box", seed=2, scale=0.1)]
    monkeypatch_module.setitem(folder_paths.folder_names_and_paths, "spm", ([str(folder)], {".safetensors"}))
    return written, reference.diffusers_layer_paths(unet)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _chain(model, clip, uncond_gate: str, combine: str = "official"):
    node = erasekit.NODE_CLASS_MAPPINGS[NODE]
    with torch.inference_mode():
        model, clip = node().load(model, clip, "circle.safetensors", 1.0, True, combine, "", uncond_gate)
        return node().load(model, clip, "star.safetensors", 1.0, True, combine, "", uncond_gate)


def _encode(clip, texts: list[str]) -> torch.Tensor:
    import nodes

    with torch.inference_mode():
        return torch.cat([nodes.CLIPTextEncode().encode(clip, text)[0][0][0] for text in texts])


def _noise() -> torch.Tensor:
    return torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))


def _sample(model, clip, uncond_gate: str) -> dict[str, list]:
    """ComfyUI's sampler on one conditioning holding a prompt per sample; each UNet call's branches."""
    import comfy.model_management as mm
    import comfy.sample

    gated, gated_clip = _chain(model, clip, uncond_gate)
    positive, negative = _encode(gated_clip, PROMPTS), _encode(gated_clip, [NEGATIVE])
    calls = []

    def capture(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        calls.append((list(args["cond_or_uncond"]), out.float().clone()))
        return out

    watched = gated.clone()
    watched.set_model_unet_function_wrapper(capture)
    noise = _noise()
    with torch.inference_mode():
        final = comfy.sample.sample(watched, noise, STEPS, GUIDANCE, "euler", "normal", [[positive, {}]],
                                    [[negative, {}]], torch.zeros_like(noise), seed=0).float()
        mm.load_models_gpu([model])  # the plain model back, for whoever runs next
    assert [chunks for chunks, _ in calls] == [[1, 0]] * STEPS  # uncond and cond in one UNet batch each step
    half = len(PROMPTS)
    return {"denoised_uncond": [out[:half] for _, out in calls], "denoised_cond": [out[half:] for _, out in calls],
            "final": [final]}


@pytest.fixture(scope="module")
def expected(comfy, loaded, files):
    """infer_spm.py's computation in float64 on a copy of the tiny checkpoint's UNet, each prompt on its own."""
    import comfy.model_management as mm
    import comfy.samplers

    from erasekit.erasers.families import UNetLayout

    model, clip = loaded
    paths, names = files
    with torch.inference_mode():
        mm.load_models_gpu([model])  # unpatched: no other clone's object patches on its modules
    base = model.model.diffusion_model
    assert not any("forward" in vars(m) for m in base.modules())
    unet = copy.deepcopy(base).double()
    layout = UNetLayout.from_ldm_keys(name for name, _ in base.named_parameters())
    layers = {name: unet.get_submodule(layout.to_ldm(path)) for name, path in names.items()}
    tokenizer = clip.tokenizer.clip_l.tokenizer  # the HF CLIPTokenizer under ComfyUI's
    special = set(tokenizer.convert_tokens_to_ids(list(tokenizer.special_tokens_map.values())))

    def ids(text: str) -> list[int]:
        return [token[0] for chunk in clip.tokenize(text)["l"] for token in chunk]

    states, metadata = zip(*(reference.read_spm(p) for p in paths))
    erased = [c for m in metadata for c in m["prompts"].split(",")]
    counts = [len(m["prompts"].split(",")) for m in metadata]
    erased_contexts = _encode(clip, erased).double()
    negative = _encode(clip, [NEGATIVE]).double()
    sampling = model.model.model_sampling
    if hasattr(comfy.samplers, "calculate_sigmas_scheduler"):  # the 2024 ComfyUI
        sigmas = comfy.samplers.calculate_sigmas_scheduler(model.model, "normal", STEPS)
    else:  # 0.3.64
        sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", STEPS)
    timesteps = [float(sampling.timestep(sigma)) for sigma in sigmas[:-1]]
    start = _noise().double() * (1 + float(sigmas[0]) ** 2) ** 0.5  # ComfyUI's max_denoise from σ_max

    def eps(x, t, context):
        return unet(x, t, context=context)

    runs = []
    for b, prompt in enumerate(PROMPTS):
        context = _encode(clip, [prompt]).double()
        scores = reference.matching_scores(context[0], ids(prompt), erased_contexts, [ids(c) for c in erased],
                                           special)
        factors = reference.multipliers(scores, counts)
        with torch.no_grad(), reference.spm_network(layers, reference.weighted_state(states, factors), metadata[0]):
            run = reference.sample_euler_cfg(eps, start[b:b + 1], sigmas.tolist(), timesteps, context, negative,
                                             GUIDANCE)
        run["final"] = [model.model.process_latent_out(run["final"][0])]
        run["multipliers"] = factors
        runs.append(run)
    return runs


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs).abs().max() / theirs.abs().max()).item()


def _worst(ours: dict, expected: list[dict], key: str) -> float:
    return max(_relative(ours[key][step][b:b + 1], run[key][step])
               for b, run in enumerate(expected) for step in range(len(run[key])))


def test_positive_uncond_gate_matches_the_rebuilt_infer_spm_in_one_sampler_batch(loaded, files, expected):
    assert expected[0]["multipliers"][0] == 1.0 and expected[2]["multipliers"][1] == 1.0
    assert all(m < 1.0 for m in expected[1]["multipliers"] + expected[3]["multipliers"])
    ours = _sample(*loaded, "positive")
    errors = {key: _worst(ours, expected, key) for key in ("denoised_cond", "denoised_uncond", "final")}
    print(f"ComfyUI positive vs rebuilt infer_spm.py, max relative difference: {errors}")
    assert all(error <= TOLERANCE for error in errors.values()), errors


def test_own_uncond_gate_differs_from_the_reference(loaded, files, expected):
    ours = _sample(*loaded, "own")
    uncond, final = _worst(ours, expected, "denoised_uncond"), _worst(ours, expected, "final")
    print(f"ComfyUI own vs rebuilt infer_spm.py, max relative difference: uncond {uncond:.2e} final {final:.2e}")
    assert uncond > 100 * TOLERANCE and final > 100 * TOLERANCE


def test_a_negative_prompt_run_alone_falls_back_to_own_with_one_warning(loaded, files, caplog):
    from erasekit.nodes.membrane_adapter import membrane_gates

    model, clip = loaded
    gated, gated_clip = _chain(model, clip, "positive")
    context = _encode(gated_clip, [NEGATIVE, NEGATIVE, *PROMPTS[:2]])
    with caplog.at_level(logging.WARNING, logger="erasekit"):
        alone = membrane_gates(gated, context[:2], [1, 1])
        membrane_gates(gated, context[:2], [1, 1])
        batched = membrane_gates(gated, context, [1, 0])
    assert caplog.text.count("ran the negative prompt in a UNet call of its own") == 1
    own = membrane_gates(gated, context)
    assert torch.equal(alone, own[:2])
    assert torch.equal(batched[:2], own[2:]) and torch.equal(batched[2:], own[2:])


def test_a_chain_must_agree_on_the_uncond_gate(loaded, files):
    model, clip = loaded
    node = erasekit.NODE_CLASS_MAPPINGS[NODE]
    with torch.inference_mode():
        first, first_clip = node().load(model, clip, "circle.safetensors", 1.0, True, "official", "", "positive")
        with pytest.raises(InputError, match=r"gates the unconditional rows 'own' .* chose 'positive'"):
            node().load(first, first_clip, "star.safetensors", 1.0, True, "official", "", "own")
        with pytest.raises(InputError, match="'uncond_gate': expected 'own'"):
            node().load(model, clip, "star.safetensors", 1.0, True, "official", "", "negative")
    assert node.INPUT_TYPES()["optional"]["uncond_gate"][1]["default"] == "own"
