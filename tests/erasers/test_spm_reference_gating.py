"""SPM's reference gating on diffusers: uncond_gate="positive" with combine="official" against a float64 rebuild
of infer_spm.py (testing/infer_spm.py), both branches of 3 Euler steps at guidance 7.5 in one batch of mixed
prompts; the default "own" against the same reference; record_prompts for precomputed prompt embeddings."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from erasekit.erasers import spm
from erasekit.erasers.errors import InputError
from erasekit.erasers.spm.hooks import (
    TransportFallbackWarning,
    UncondGateWarning,
    attach_membranes,
    detach_membranes,
    membrane_gates,
)
from erasekit.testing import infer_spm as reference

# Mixed: the first and third name an erased concept (circle, star), the others neither.
PROMPTS = ["a red circle", "a blue square", "a green star", "a yellow cross"]
NEGATIVES = ["a striped triangle"] * len(PROMPTS)  # diffusers wants the negative prompt's type to be the prompt's
NEGATIVE = NEGATIVES[0]
STEPS, GUIDANCE = 3, 7.5
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pipe():
    """A tiny SD1.x-shaped StableDiffusionPipeline (SMALL_SD15_UNET_CONFIG, a 2-layer 768-wide CLIP text tower)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.shapes.model import build_tokenizer
    from erasekit.testing.tiny_models import SMALL_SD15_UNET_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = build_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
        unet = UNet2DConditionModel(**SMALL_SD15_UNET_CONFIG).eval()
        vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                            layers_per_block=1).eval()
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    return [reference.write_official_spm(folder / "circle.safetensors", pipe.unet, "circle", seed=1, scale=0.3),
            reference.write_official_spm(folder / "star.safetensors", pipe.unet, "star,box", seed=2, scale=0.3)]


@pytest.fixture(scope="module")
def start():
    return torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True)
def _clean(pipe):
    yield
    detach_membranes(pipe)


@pytest.fixture(scope="module")
def expected(pipe, files, start):
    """infer_spm.py's computation, rebuilt in float64, for each prompt on its own."""
    from diffusers import EulerDiscreteScheduler

    tokenizer = pipe.tokenizer
    # Deep-copied before any test attaches hooks to the UNet. transformers' CLIP cannot run in float64 (its causal
    # mask overflows), so the prompts are encoded in float32, as the pipeline encodes them, and all else in float64.
    unet = copy.deepcopy(pipe.unet).double()
    special = set(tokenizer.convert_tokens_to_ids(list(tokenizer.special_tokens_map.values())))

    def encode(texts):
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0].double(), ids

    states, metadata = zip(*(reference.read_spm(f) for f in files))
    erased = [c for m in metadata for c in m["prompts"].split(",")]
    counts = [len(m["prompts"].split(",")) for m in metadata]
    erased_contexts, erased_ids = encode(erased)
    negative, _ = encode([NEGATIVE])
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    layers = reference.diffusers_layers(unet)

    def eps(x, t, context):
        return unet(x, t, encoder_hidden_states=context).sample

    runs = []
    for b, prompt in enumerate(PROMPTS):
        context, ids = encode([prompt])
        scores = reference.matching_scores(context[0], ids[0].tolist(), erased_contexts, erased_ids.tolist(), special)
        factors = reference.multipliers(scores, counts)
        with torch.no_grad(), reference.spm_network(layers, reference.weighted_state(states, factors), metadata[0]):
            runs.append(reference.sample_euler_cfg(
                eps, start[b:b + 1].double() * float(scheduler.init_noise_sigma), scheduler.sigmas.tolist(),
                scheduler.timesteps.tolist(), context, negative, GUIDANCE))
        runs[-1]["multipliers"] = factors
    return runs


def _sample(pipe, files, start, uncond_gate: str) -> dict[str, list]:
    """One pipeline call on the whole batch of mixed prompts; each branch's ε per step and the final latents."""
    attach_membranes(pipe, [spm.load_membrane(f) for f in files], combine="official", uncond_gate=uncond_gate)
    outputs = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: outputs.append(output[0].clone()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", TransportFallbackWarning)
            warnings.simplefilter("error", UncondGateWarning)
            final = pipe(PROMPTS, negative_prompt=NEGATIVES, latents=start.clone(), num_inference_steps=STEPS,
                         guidance_scale=GUIDANCE, height=8, width=8, output_type="latent").images
    finally:
        handle.remove()
    half = len(PROMPTS)
    return {"eps_uncond": [o[:half] for o in outputs], "eps_cond": [o[half:] for o in outputs], "final": [final]}


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs).abs().max() / theirs.abs().max()).item()


def _worst(ours: dict, expected: list[dict], key: str) -> float:
    return max(_relative(ours[key][step][b:b + 1], run[key][step])
               for b, run in enumerate(expected) for step in range(len(run[key])))


def test_positive_uncond_gate_matches_the_rebuilt_infer_spm_in_one_mixed_batch(pipe, files, start, expected):
    # The batch is mixed: each erased concept drives its membrane fully for its prompt, the others only partly.
    assert expected[0]["multipliers"][0] == 1.0 and expected[2]["multipliers"][1] == 1.0
    assert all(m < 1.0 for m in expected[1]["multipliers"] + expected[3]["multipliers"])
    ours = _sample(pipe, files, start, "positive")
    errors = {key: _worst(ours, expected, key) for key in ("eps_cond", "eps_uncond", "final")}
    print(f"positive vs rebuilt infer_spm.py, max relative difference: {errors}")
    assert all(error <= TOLERANCE for error in errors.values()), errors


def test_own_uncond_gate_differs_from_the_reference_on_the_unconditional_branch(pipe, files, start, expected):
    ours = _sample(pipe, files, start, "own")
    cond, uncond, final = (_worst(ours, expected, key) for key in ("eps_cond", "eps_uncond", "final"))
    print(f"own vs rebuilt infer_spm.py, max relative difference: cond {cond:.2e} uncond {uncond:.2e} "
          f"final {final:.2e}")
    # The first step's conditional branch sees the same latents and gates: only the unconditional one differs.
    first_cond = max(_relative(ours["eps_cond"][0][b:b + 1], run["eps_cond"][0]) for b, run in enumerate(expected))
    assert first_cond <= TOLERANCE
    assert uncond > 100 * TOLERANCE and final > 100 * TOLERANCE


def _used_and_own_gates(pipe, **call) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per UNet call of a pipeline run: the gates the layers used, and each row's own gates."""
    state = pipe.unet._erasekit_membranes
    seen = []
    # Registered after attach_membranes' pre-hook, so it runs after it.
    handle = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (state.current.clone(), state.transport.gates(kwargs["encoder_hidden_states"]).clone())), with_kwargs=True)
    try:
        pipe(PROMPTS, height=8, width=8, output_type="latent", **call)
    finally:
        handle.remove()
    return seen


def test_positive_gates_are_the_positive_prompts_per_image(pipe, files, start):
    """Inside one CFG call, unconditional row i carries exactly the gates of conditional row B + i."""
    attach_membranes(pipe, [spm.load_membrane(f) for f in files], combine="official", uncond_gate="positive")
    seen = _used_and_own_gates(pipe, negative_prompt=NEGATIVES, latents=start.clone(), num_inference_steps=2,
                               guidance_scale=GUIDANCE)
    half = len(PROMPTS)
    assert len(seen) == 2
    for used, own in seen:
        assert used.shape == (2 * half, 2)
        assert torch.equal(used[:half], own[half:]) and torch.equal(used[half:], own[half:])
        assert not torch.equal(used[:half], own[:half])  # the negative prompt's own gates are others


def test_positive_without_guidance_gates_each_sample_by_its_own_prompt(pipe, files, start):
    attach_membranes(pipe, [spm.load_membrane(f) for f in files], combine="official", uncond_gate="positive")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncondGateWarning)  # no CFG batch: nothing to warn about
        seen = _used_and_own_gates(pipe, latents=start.clone(), num_inference_steps=1, guidance_scale=1.0)
    used, own = seen[0]
    assert used.shape == (len(PROMPTS), 2) and torch.equal(used, own)


def test_a_guided_batch_of_another_layout_falls_back_to_own_with_one_warning(pipe, files):
    attach_membranes(pipe, [spm.load_membrane(f) for f in files], uncond_gate="positive")
    pipe._guidance_scale = GUIDANCE  # as inside a guided pipeline call
    context, _ = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, False)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # two halves that differ
    try:
        with pytest.warns(UncondGateWarning) as caught, torch.no_grad():
            pipe.unet(x, 10, encoder_hidden_states=context)
            pipe.unet(x, 10, encoder_hidden_states=context)
    finally:
        del pipe._guidance_scale
    assert sum(issubclass(w.category, UncondGateWarning) for w in caught) == 1


def test_attach_refuses_an_unknown_uncond_gate(pipe, files):
    with pytest.raises(InputError, match=r"'uncond_gate': expected 'own' .* found 'negative'"):
        attach_membranes(pipe, [spm.load_membrane(files[0])], uncond_gate="negative")


# --- record_prompts -------------------------------------------------------------------------------------------------


def _gates_of_a_run(pipe, **call) -> list[torch.Tensor]:
    gates = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: gates.append(membrane_gates(pipe, kwargs["encoder_hidden_states"])),
        with_kwargs=True)
    try:
        pipe(num_inference_steps=1, guidance_scale=GUIDANCE, height=8, width=8, output_type="latent", **call)
    finally:
        handle.remove()
    return gates


def test_record_prompts_gives_precomputed_embeddings_the_gates_of_their_prompts(pipe, files):
    with torch.no_grad():
        embeds, negative_embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVES)  # before attaching
    attach_membranes(pipe, [spm.load_membrane(f) for f in files])
    from_prompts = _gates_of_a_run(pipe, prompt=PROMPTS, negative_prompt=NEGATIVES)
    attach_membranes(pipe, [spm.load_membrane(f) for f in files])  # a fresh record: only record_prompts fills it
    with pytest.warns(TransportFallbackWarning):
        unrecorded = _gates_of_a_run(pipe, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
    assert unrecorded[0][len(PROMPTS), 0] < 1.0  # "a red circle" by clipcos alone: the gate falls short of 1
    spm.record_prompts(pipe, PROMPTS, embeds)
    spm.record_prompts(pipe, [NEGATIVE], negative_embeds)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TransportFallbackWarning)
        recorded = _gates_of_a_run(pipe, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
    assert recorded[0][len(PROMPTS), 0] == 1.0
    assert torch.equal(recorded[0], from_prompts[0])


def test_record_prompts_takes_token_ids(pipe, files):
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, False)
    ids = pipe.tokenizer(PROMPTS[:2], padding="max_length", max_length=77, return_tensors="pt").input_ids
    attach_membranes(pipe, [spm.load_membrane(f) for f in files])
    spm.record_prompts(pipe, ids, embeds)
    by_ids = membrane_gates(pipe, embeds)
    attach_membranes(pipe, [spm.load_membrane(f) for f in files])
    spm.record_prompts(pipe, PROMPTS[:2], embeds)
    assert torch.equal(by_ids, membrane_gates(pipe, embeds)) and by_ids[0, 0] == 1.0


def test_record_prompts_refuses_what_it_cannot_record(pipe, files):
    embeds = torch.zeros(2, 77, 768)
    with pytest.raises(InputError, match="'pipe': expected a pipeline with SPM membranes attached"):
        spm.record_prompts(pipe, PROMPTS[:2], embeds)
    attach_membranes(pipe, [spm.load_membrane(files[0])])
    with pytest.raises(InputError, match=r"'prompts': expected 1 or 2 .* found 3 prompts"):
        spm.record_prompts(pipe, PROMPTS[:3], embeds)
    with pytest.raises(InputError, match="'prompt_embeds': expected a tensor"):
        spm.record_prompts(pipe, PROMPTS[:2], embeds[0])
