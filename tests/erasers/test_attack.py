"""UnlearnDiffAtk (erasers/attack/unlearn_diff.py) on the shipped shapes world: it optimises only the prompt prefix,
lowers its own loss against an erased model, is seeded, projects to typeable prompts, and measures ASR through
methods.erased for any method (SPM's Facilitated Transport included)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from erasekit.erasers import attack
from erasekit.erasers.attack import soft_prompt
from erasekit.erasers.io.clip_names import text_transformer
from erasekit.erasers.spm import hooks as spm_diffusers
from erasekit.shapes import demo, methods, metrics
from erasekit.shapes.judge import Judge
from erasekit.shapes.model import ShapesPipeline

HELD_OUT_DRAWS = 16


@pytest.fixture(scope="module")
def pipe():
    return ShapesPipeline.load()


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _circle_probes(pipe, n: int):
    probes = metrics.probe_sets("circle", n)["efficacy"]
    prompts, seeds = [p.prompt for p in probes], [p.seed for p in probes]
    return prompts, seeds, _pixels(pipe(prompts, seeds))  # the original model's circles: the targets


@pytest.fixture(scope="module")
def rece_attack(pipe):
    """A 25-step attack on three circle prompts against RECE (which erases circles here), with what the test
    needs from before and after it."""
    prompts, seeds, targets = _circle_probes(pipe, 3)
    # A caller's mixed requires_grad flags, to see them come back as they were.
    text_transformer(pipe.text_encoder).final_layer_norm.requires_grad_(False)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
    flags = {name: [p.requires_grad for p in m.parameters()] for name, m in modules.items()}
    g = torch.Generator().manual_seed(1234)
    timesteps = torch.randint(1000, (HELD_OUT_DRAWS, len(prompts)), generator=g)
    noise = torch.randn(HELD_OUT_DRAWS, *targets.shape, generator=g)
    with methods.erased(pipe, "rece", "circle"):
        result = attack.unlearn_diff_attack(pipe, prompts, targets, seeds=seeds, steps=25)
        ids = soft_prompt.prefixed_ids(pipe.tokenizer, prompts, attack.K)
        with torch.no_grad():
            held_out = {name: torch.stack([attack.attack_loss(pipe, ids, prefix, targets, timesteps[r], noise[r])
                                           for r in range(HELD_OUT_DRAWS)]).mean(0)
                        for name, prefix in (("initial", result.initial_prefix), ("attacked", result.prefix))}
    after = {name: m.state_dict() for name, m in modules.items()}
    yield dict(prompts=prompts, result=result, held_out=held_out, before=before, after=after, flags=flags,
               modules=modules)
    text_transformer(pipe.text_encoder).final_layer_norm.requires_grad_(True)


def test_attack_lowers_its_loss_on_held_out_draws(rece_attack):
    # Same (t, ε) draws for both prefixes, none of them the training draws: every prompt's loss goes down.
    initial, attacked = rece_attack["held_out"]["initial"], rece_attack["held_out"]["attacked"]
    assert torch.all(attacked < initial), (initial, attacked)
    assert rece_attack["result"].losses.shape == (25, 3)


def test_the_callers_model_is_bit_identical_and_gets_no_gradients(rece_attack, pipe):
    for name, module in rece_attack["modules"].items():
        for key, tensor in rece_attack["before"][name].items():
            assert torch.equal(tensor, rece_attack["after"][name][key]), (name, key)
        assert [p.requires_grad for p in module.parameters()] == rece_attack["flags"][name]
        assert all(p.grad is None for p in module.parameters()), name
        assert not module.training
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks


def test_discrete_prompts_are_vocabulary_tokens_that_type_as_the_context(rece_attack, pipe):
    result = rece_attack["result"]
    special = set(pipe.tokenizer.all_special_ids)
    vocab = len(pipe.tokenizer)
    assert result.discrete and result.prefix_ids.shape == (3, attack.K)
    assert all(0 <= i < vocab and i not in special for i in result.prefix_ids.flatten().tolist())
    assert torch.equal(result.ids[:, 1:1 + attack.K], result.prefix_ids)
    # The attacked prompt is an ordinary prompt: typing it gives exactly the context the attack returns.
    assert all(h.endswith(p) for h, p in zip(result.hard_prompts, rece_attack["prompts"]))
    assert torch.allclose(pipe.encode(result.hard_prompts), result.contexts, atol=1e-6)


def test_attack_is_a_function_of_its_seed_and_of_each_prompt_alone(pipe):
    prompts, seeds, targets = _circle_probes(pipe, 2)
    run = lambda **kw: attack.unlearn_diff_attack(pipe, **{"prompts": prompts, "targets": targets, "seeds": seeds,  # noqa: E731
                                                             "steps": 3, **kw})
    a, b, other = run(), run(), run(seed=1)
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.ids, b.ids) and torch.equal(a.losses, b.losses)
    assert not torch.equal(a.prefix, other.prefix)
    alone = attack.unlearn_diff_attack(pipe, prompts[1:], targets[1:], seeds=seeds[1:], steps=3)
    assert torch.allclose(alone.prefix[0], a.prefix[1], atol=1e-5)
    continuous = run(discrete=False)
    assert not continuous.discrete and torch.equal(continuous.prefix, a.prefix)
    placeholder = soft_prompt.placeholder_id(pipe.tokenizer)
    assert (continuous.ids[:, 1:1 + attack.K] == placeholder).all()
    with torch.no_grad():
        expected = soft_prompt.encode(pipe.text_encoder, continuous.ids, continuous.prefix)
    assert torch.equal(continuous.contexts, expected)


def test_shapes_world_asr_against_a_closed_form_erasure(pipe, judge):
    n, steps = 6, 6
    probes = metrics.probe_sets("circle", n)["efficacy"]
    with methods.erased(pipe, "rece", "circle"):
        images = pipe([p.prompt for p in probes], [p.seed for p in probes])
    pre = float(np.mean(judge(images).shape == metrics.VALUES["shape"].index("circle")))
    result = demo.attack_success_rate(pipe, judge, "rece", "circle", n=n, steps=steps)
    assert result["asr_n"] == len(probes) and result["asr_steps"] == steps
    assert result["asr_pre"] == pre
    assert result["asr_attacked"] == round((1 - pre) * len(probes)) == len(result["asr_prompts"])
    hits = sum(p["shows"] for p in result["asr_prompts"])
    assert result["asr"] == pytest.approx(pre + hits / len(probes))
    assert result["asr"] >= result["asr_pre"]
    assert all(p["attacked"].endswith(p["prompt"]) for p in result["asr_prompts"])


def test_the_stamp_has_no_asr_and_the_table_says_so(pipe, judge):
    assert demo.attack_success_rate(pipe, judge, "uce", "stamp", n=4)["asr"] is None
    rows, _ = demo.evaluate(pipe, judge, ["original"], ["stamp"], n=3, attack_steps=2, log=lambda line: None)
    assert rows[0]["asr"] is None and rows[0]["asr_prompts"] == []
    table = demo.markdown_table(rows)
    assert "ASR ↓" in table and table.splitlines()[-1].split(" | ")[3] == "—"
    assert "ASR" not in demo.markdown_table([{k: v for k, v in rows[0].items() if not k.startswith("asr")}])


def test_spm_gates_see_the_attacked_prompts_tokens(pipe):
    # FT opens each membrane by token overlap with the prompt the text encoder saw: the attacked prompts still
    # name "circle", so their gates must be fully open (1), which needs the record made through the prefix hook.
    prompts, seeds, targets = _circle_probes(pipe, 2)
    with methods.erased(pipe, "spm", "circle"), warnings.catch_warnings():
        warnings.simplefilter("error", spm_diffusers.TransportFallbackWarning)
        for discrete in (True, False):
            result = attack.unlearn_diff_attack(pipe, prompts, targets, seeds=seeds, steps=2, discrete=discrete)
            assert torch.equal(spm_diffusers.membrane_gates(pipe, result.contexts), torch.ones(2, 1))
            pipe(prompts, seeds, context=result.contexts)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_latent_sd_pipeline_is_attacked_on_vae_latents(prediction):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.shapes.model import build_tokenizer

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=2, bos_token_id=0,
                                                    eos_token_id=1, pad_token_id=1))
        vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                    attention_head_dim=2, norm_num_groups=8, cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=DDIMScheduler(prediction_type=prediction),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    result = attack.unlearn_diff_attack(pipe, ["a red circle", "a blue star"], latents, steps=2)
    assert result.losses.shape == (2, 2) and torch.isfinite(result.losses).all()
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    assert all(h.endswith(p) and len(h.split()) == len(p.split()) + attack.K
               for h, p in zip(result.hard_prompts, ["a red circle", "a blue star"]))
    out = pipe(prompt_embeds=result.contexts, num_inference_steps=2, output_type="latent", height=16,
               width=16).images
    assert out.shape == latents.shape
    searched = attack.unlearn_diff_search(pipe, ["a red circle", "a blue star"], latents,
                                          lambda rows, ids: np.zeros(len(rows), bool), iterations=1, timesteps=2)
    assert searched.checks.tolist() == [2, 2] and torch.isfinite(searched.losses).all()
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    xl = SimpleNamespace(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=pipe.scheduler,
                         text_encoder_2=text_encoder)
    with pytest.raises(ValueError, match="SDXL"):
        attack.unlearn_diff_attack(xl, ["a red circle"], latents[:1])


def test_eval_refuses_negative_attack_steps(tmp_path, capsys):
    from erasekit.cli.main import main

    assert main(["eval", "--out", str(tmp_path / "out"), "--attack-steps", "-1"]) == 2
    assert "--attack-steps" in capsys.readouterr().err


# --- UnlearnDiffAtk's own protocol (attack.unlearn_diff_search) ---------------------------------------------------

def _bisection_projection(v: torch.Tensor) -> torch.Tensor:
    """text_grad's rule, written independently: the μ with Σ clip(v − μ, 0, 1) = 1, found by bisection."""
    out = []
    for row in v.double():
        low, high = float(row.min()) - 1, float(row.max())
        for _ in range(200):
            mid = (low + high) / 2
            if float((row - mid).clamp(0, 1).sum()) > 1:
                low = mid
            else:
                high = mid
        out.append((row - (low + high) / 2).clamp(0, 1))
    return torch.stack(out).to(v.dtype)


def test_simplex_projection_is_texts_grads_bisection():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g) * 0.01 + 1 / 9,
                   torch.full((1, 9), 1 / 9), torch.eye(9)[:2] * 3])
    projected = attack.project_to_simplex(v)
    assert torch.allclose(projected, _bisection_projection(v), atol=1e-6)
    assert torch.allclose(projected.sum(-1), torch.ones(len(v))) and (projected >= 0).all()


def test_search_timesteps_are_the_classifier_tasks():
    # Diffusion-MU-Attack tasks/classifier_.py: start = T // n // 2, every T // n, n of them.
    assert attack.search_timesteps(1000) == list(range(10, 1000, 20))
    assert attack.search_timesteps(1000, 4) == [125, 375, 625, 875]


def test_search_checks_each_block_and_stops_a_prompt_at_its_first_success(pipe):
    prompts, seeds, targets = _circle_probes(pipe, 3)
    calls = []

    def succeeded(rows, ids):
        calls.append((list(rows), ids.clone()))
        return np.array([r == 1 and len(calls) == 2 for r in rows])  # prompt 1 "breaks" at its second check

    with methods.erased(pipe, "rece", "circle"):
        result = attack.unlearn_diff_search(pipe, prompts, targets, succeeded, seeds=seeds, iterations=2,
                                            timesteps=4)
    assert [rows for rows, _ in calls] == [[0, 1, 2], [0, 1, 2], [0, 2], [0, 2]]
    assert result.success.tolist() == [False, True, False] and result.checks.tolist() == [4, 2, 4]
    assert torch.equal(result.ids[1], calls[1][1][1]) and torch.equal(result.ids[0], calls[3][1][0])
    assert result.losses.shape == (8, 3) and torch.isnan(result.losses[4:, 1]).all()
    assert torch.isfinite(result.losses[:4]).all() and torch.isfinite(result.losses[:, [0, 2]]).all()
    special, vocab = set(pipe.tokenizer.all_special_ids), len(pipe.tokenizer)
    prefix = result.ids[:, 1:1 + attack.K]
    assert all(0 <= i < vocab and i not in special for i in prefix.flatten().tolist())
    assert all(h.endswith(p) for h, p in zip(result.hard_prompts, prompts))
    assert torch.allclose(pipe.encode(result.hard_prompts), pipe.text_encoder(result.ids)[0], atol=1e-6)


def test_search_is_a_function_of_its_seed_and_of_each_prompt_alone(pipe):
    prompts, seeds, targets = _circle_probes(pipe, 2)
    never = lambda rows, ids: np.zeros(len(rows), bool)  # noqa: E731
    run = lambda p, t, s, **kw: attack.unlearn_diff_search(pipe, p, t, never, seeds=s, iterations=3,  # noqa: E731
                                                           timesteps=2, **kw)
    a, b, other = run(prompts, targets, seeds), run(prompts, targets, seeds), run(prompts, targets, seeds, seed=1)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.losses, b.losses)
    assert not torch.equal(a.losses, other.losses)
    alone = run(prompts[1:], targets[1:], seeds[1:])
    assert torch.equal(alone.ids[0], a.ids[1])
    assert torch.allclose(alone.losses[:, 0], a.losses[:, 1], atol=1e-5)


def test_shapes_world_asr_with_the_official_protocol(pipe, judge):
    n, blocks = 6, 3
    result = demo.attack_success_rate(pipe, judge, "rece", "circle", n=n, steps=2, protocol="official",
                                      timesteps=blocks)
    assert result["asr_protocol"] == "official" and result["asr_steps"] == 2
    attacked = result["asr_prompts"]
    assert len(attacked) == result["asr_attacked"] == round((1 - result["asr_pre"]) * n)
    assert result["asr"] == pytest.approx(result["asr_pre"] + sum(p["shows"] for p in attacked) / n)
    # A prompt that never broke was drawn after every block; one that broke, up to the block it broke at.
    assert all(p["images"] == blocks for p in attacked if not p["shows"])
    assert all(1 <= p["images"] <= blocks for p in attacked)
    assert result["asr_images"] == sum(p["images"] for p in attacked)
    # The recorded prompt is an ordinary typed prompt: drawn again from its text, it gives the same verdict.
    with methods.erased(pipe, "rece", "circle"):
        again = pipe([p["attacked"] for p in attacked], [p["seed"] for p in attacked])
    shows = judge(again).shape == metrics.VALUES["shape"].index("circle")
    assert shows.tolist() == [p["shows"] for p in attacked]


def test_eval_takes_the_official_protocol_and_refuses_an_unknown_one(tmp_path, capsys):
    from erasekit.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--out", str(tmp_path / "bad"), "--attack", "thorough"])
    assert exit_.value.code == 2 and "invalid choice: 'thorough'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown attack protocol 'thorough'"):
        demo.run_eval(tmp_path / "bad", ["rece"], ["circle"], n=2, attack_steps=1, attack_protocol="thorough")
    assert main(["eval", "--out", str(tmp_path / "out"), "--methods", "rece", "--concepts", "circle", "-n", "2",
                 "--attack", "official", "--attack-steps", "1"]) == 0
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["attack"]["protocol"] == "official" and summary["attack"]["timesteps"] == 50
    row = summary["rows"][0]
    assert row["asr_protocol"] == "official" and row["asr_steps"] == 1
    assert all(p["images"] == 50 for p in row["asr_prompts"] if not p["shows"])


def test_search_refuses_bad_settings_and_a_checker_that_answers_for_other_rows(pipe):
    prompts, seeds, targets = _circle_probes(pipe, 2)
    never = lambda rows, ids: np.zeros(len(rows), bool)  # noqa: E731
    with pytest.raises(ValueError, match="timesteps >= 1"):
        attack.unlearn_diff_search(pipe, prompts, targets, never, timesteps=0)
    with pytest.raises(ValueError, match="k must be"):
        attack.unlearn_diff_search(pipe, prompts, targets, never, k=0)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        attack.unlearn_diff_search(pipe, prompts, targets, never, seeds=[0])
    with pytest.raises(ValueError, match=r"returned \(1,\) results for 2 prompts"):
        attack.unlearn_diff_search(pipe, prompts, targets, lambda rows, ids: np.zeros(1, bool), iterations=1,
                                   timesteps=1)
