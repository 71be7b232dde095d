"""SPM training (erase_with_la) on the untrained shapes-world model: frozen base, file layout, the loss terms,
anchors, determinism and resume. Every run is a few iterations of a short DDIM schedule."""
from __future__ import annotations

import types

import pytest
import torch
from safetensors import safe_open

from erasekit.erasers.spm import train as spm_train
from erasekit.erasers.spm.hooks import attach_membranes, detach_membranes, membrane_targets
from erasekit.erasers.spm.membrane import kohya_name, load_membrane
from erasekit.erasers.spm.train import SPMTrainConfig, SPMTrainer, anchor_batch, sample_anchors, train_spm
from erasekit.erasers.training.objectives import erase_target

# Warm-up 0 and a large LR so that a few iterations visibly move the zero-initialised up factors.
FAST = dict(iterations=3, ddim_steps=4, warmup=0, lr=1e-2, checkpoint_every=0)


@pytest.fixture(scope="module")
def pipe():
    from erasekit.shapes import model

    tokenizer, text_encoder, unet = model.build_models(seed=0)
    return model.ShapesPipeline(tokenizer, text_encoder.eval(), unet.eval(), model.build_scheduler())


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unet_eps(pipe, x, t, prompts):
    with torch.no_grad():
        return pipe.unet(x.expand(len(prompts), -1, -1, -1), t, encoder_hidden_states=pipe.encode(prompts)).sample


def test_training_changes_only_the_membrane_and_writes_the_official_layout(pipe, tmp_path):
    unet_before, te_before = _snapshot(pipe.unet), _snapshot(pipe.text_encoder)
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    out = tmp_path / "circle.safetensors"

    membrane = train_spm(pipe, "circle", config=SPMTrainConfig(**FAST), out=out)

    # The base is bit-identical, its requires_grad flags and eval mode restored, and no hook is left behind.
    for name, value in _snapshot(pipe.unet).items():
        assert torch.equal(value, unet_before[name]), name
    for name, value in _snapshot(pipe.text_encoder).items():
        assert torch.equal(value, te_before[name]), name
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert not any(m._forward_hooks for m in membrane_targets(pipe).values())

    # Every transformer Linear/Conv2d has a trained rank-1 membrane.
    targets = membrane_targets(pipe)
    assert set(membrane.layers) == set(targets) and len(targets) == 84
    assert membrane.rank == 1 and membrane.concepts == ["circle"] and membrane.family == "shapes"
    assert all(layer.up.abs().sum() > 0 for layer in membrane.layers.values())

    # The file: official kohya key names, metadata, and it loads back to the same factors.
    with safe_open(str(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {kohya_name(p) + s for p in targets for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert {k: v for k, v in meta.items() if not k.startswith("erasekit_")} == {"prompts": "circle", "rank": "1",
                                                                                "alpha": "1.0"}
    assert {"erasekit_writer", "erasekit_sha256"} <= set(meta)  # the content hash, checked on load
    loaded = load_membrane(out)
    for path, layer in membrane.layers.items():
        assert torch.equal(loaded.layers[path].down, layer.down) and torch.equal(loaded.layers[path].up, layer.up)
        assert loaded.layers[path].alpha == 1.0

    # Attached with spm_diffusers (FT on), the membrane changes what the UNet predicts for the target prompt.
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor(500)
    before = _unet_eps(pipe, x, t, ["circle"])
    attach_membranes(pipe, [loaded])
    try:
        after = _unet_eps(pipe, x, t, ["circle"])
    finally:
        detach_membranes(pipe)
    assert (after - before).abs().max() > 1e-6
    assert torch.equal(_unet_eps(pipe, x, t, ["circle"]), before)


def test_training_forward_is_the_inference_membrane(pipe):
    """The trainer's membrane-on UNet equals spm_diffusers with the exported membrane attached (FT off)."""
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor(700)
    with SPMTrainer(pipe, "circle", config=SPMTrainConfig(**FAST)) as trainer:
        with torch.no_grad():
            for up in trainer.up.values():
                up.normal_(0, 0.05, generator=torch.Generator().manual_seed(up.numel()))
            contexts = torch.cat([trainer.c_tar, trainer.c_unc])
            with trainer.active(True):
                trained = trainer.eps(x, t, contexts)
            with trainer.active(False):
                off = trainer.eps(x, t, contexts)
        membrane = trainer.membrane()
    attach_membranes(pipe.unet, [membrane], ft=False)
    try:
        with torch.no_grad():
            attached = pipe.unet(x.expand(2, -1, -1, -1), t, encoder_hidden_states=contexts).sample
    finally:
        detach_membranes(pipe.unet)
    with torch.no_grad():
        plain = pipe.unet(x.expand(2, -1, -1, -1), t, encoder_hidden_states=contexts).sample
    assert torch.allclose(trained, attached, atol=1e-5)
    assert torch.equal(off, plain)
    assert (trained - plain).abs().max() > 1e-3


def test_erase_target_and_anchor_reference_are_the_frozen_model(pipe):
    """For a fixed x_t: target = ε_neu − g (ε_pos − ε_neu), all with the membrane off, computed independently."""
    config = SPMTrainConfig(**FAST, erase_guidance=2.0)
    x_t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with SPMTrainer(pipe, "circle", positive="red circle", neutral="square", config=config) as trainer:
        with torch.no_grad():  # a non-zero membrane: the reference must not see it
            for up in trainer.up.values():
                up.fill_(0.1)
        t = trainer.timestep(3)
        anchors = trainer.anchor_rows()
        target, anchor_ref = trainer.reference(x_t, t, anchors)
        losses = trainer.losses(x_t, t, anchors)
    assert t == trainer.train_timesteps[int(3 * 1000 / 4)] == 999 - 750
    eps_pos, eps_neu = _unet_eps(pipe, x_t, t, ["red circle"]), _unet_eps(pipe, x_t, t, ["square"])
    assert torch.allclose(target, eps_neu - 2.0 * (eps_pos - eps_neu), atol=1e-5)
    assert torch.allclose(target, erase_target(eps_pos, eps_neu, 2.0), atol=1e-5)
    with torch.no_grad():
        independent = pipe.unet(x_t.expand(len(anchors), -1, -1, -1), t, encoder_hidden_states=anchors).sample
    assert torch.allclose(anchor_ref, independent, atol=1e-5)
    # Official anchor batch: (∅, a_3, ∅, a_4); the total is L_erase + β L_LA.
    unconditional = pipe.encode([""])[0]
    assert torch.allclose(anchors[0], unconditional) and torch.allclose(anchors[2], unconditional)
    assert losses["anchoring"] > 0
    assert torch.isclose(losses["loss"], losses["erase"] + 1000.0 * losses["anchoring"])


def test_anchors_have_the_targets_norm_and_the_official_arrangement():
    target = torch.randn(77, 64, generator=torch.Generator().manual_seed(4)) * 3
    anchors = sample_anchors(target, 64, torch.Generator().manual_seed(5))
    assert anchors.shape == (64, 77, 64)
    ratio = anchors.flatten(1).norm(dim=1) / target.norm()
    assert ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.2 + 1e-5 and ratio.std() > 0.05
    cos = torch.nn.functional.cosine_similarity(anchors.flatten(1), target.flatten()[None], dim=1)
    assert cos.abs().max() < 0.1  # random directions in 77×64 dimensions
    uncond = torch.zeros(1, 77, 64)
    four = anchors[:4]
    rows = anchor_batch(four, uncond, official=True)
    assert torch.equal(rows, torch.stack([uncond[0], four[2], uncond[0], four[3]]))
    assert torch.equal(anchor_batch(four, uncond, official=False), four)


def test_same_seed_same_membrane_and_resume_continues_exactly(pipe, tmp_path):
    config = SPMTrainConfig(**{**FAST, "iterations": 4, "checkpoint_every": 2, "ddim_steps": 2, "anchors": 2})
    first = train_spm(pipe, "circle", config=config)
    second = train_spm(pipe, "circle", config=config)
    for path, layer in first.layers.items():
        assert torch.equal(layer.down, second.layers[path].down) and torch.equal(layer.up, second.layers[path].up)
    other = train_spm(pipe, "circle", config=SPMTrainConfig(**{**FAST, "iterations": 1, "seed": 1}))
    assert any(not torch.equal(layer.down, other.layers[p].down) for p, layer in first.layers.items())

    # Interrupted after iteration 2 (just checkpointed), then resumed: the same membrane as the straight run.
    out = tmp_path / "circle.safetensors"

    class Stop(Exception):
        pass

    def stop_at_two(step, total, losses):
        assert set(losses) == {"loss", "erase", "anchoring"} and total == 4
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        train_spm(pipe, "circle", config=config, out=out, progress=stop_at_two)
    assert spm_train.resume_path(out).is_file() and not out.exists()
    steps = []
    resumed = train_spm(pipe, "circle", config=config, out=out, progress=lambda s, n, loss: steps.append(s))
    assert steps == [3, 4]
    assert out.is_file() and not spm_train.resume_path(out).exists()
    for path, layer in first.layers.items():
        assert torch.equal(layer.up, resumed.layers[path].up) and torch.equal(layer.down, resumed.layers[path].down)


def test_resume_refuses_another_runs_checkpoint(pipe, tmp_path):
    out = tmp_path / "m.safetensors"
    with SPMTrainer(pipe, "circle", config=SPMTrainConfig(**FAST)) as trainer:
        torch.save(trainer.state_dict(), spm_train.resume_path(out))
    with pytest.raises(ValueError, match="different run"):
        train_spm(pipe, "square", config=SPMTrainConfig(**{**FAST, "checkpoint_every": 2}), out=out)


def test_sd1_pipeline_trains_with_conv_projections():
    """An SD1.x-structured pipeline (768-wide context, 1×1-conv proj_in/out, a VAE): latents from the UNet
    config, random resolution buckets, conv factors in the file's [r, in, 1, 1] / [out, r, 1, 1] shapes."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.shapes.model import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, layers_per_block=1)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=2, norm_num_groups=8).eval()
    sd = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    config = SPMTrainConfig(**{**FAST, "iterations": 2}, resolution=256, dynamic_resolution=True)
    with SPMTrainer(sd, "circle", config=config) as trainer:
        assert trainer.vae_scale == 1 and trainer.channels == 4
        assert {trainer.latent_size() for _ in range(20)} <= {(h, w) for h in (128, 192) for w in (128, 192)}
    config = SPMTrainConfig(**{**FAST, "iterations": 2}, resolution=16, dynamic_resolution=False)
    membrane = train_spm(sd, "circle", config=config)
    assert membrane.family == "sd1"
    proj_in = membrane.layers["down_blocks.0.attentions.0.proj_in"]
    assert proj_in.down.shape == (1, 16, 1, 1) and proj_in.up.shape == (16, 1, 1, 1) and proj_in.up.abs().sum() > 0


def test_sdxl_is_refused_clearly(pipe):
    xl = types.SimpleNamespace(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, unet=pipe.unet,
                               text_encoder_2=pipe.text_encoder)
    with pytest.raises(NotImplementedError, match="pooled text embedding"):
        SPMTrainer(xl, "circle")
    with pytest.raises(ValueError, match="comma"):
        SPMTrainer(pipe, "circle, square")


def test_cli_trains_on_a_shapes_folder(pipe, tmp_path, capsys):
    from erasekit.cli.main import main

    pipe.save(tmp_path / "world")
    out = tmp_path / "circle.safetensors"
    code = main(["train-spm", "--target", "circle", "--model", str(tmp_path / "world"), "--out", str(out),
                 "--iterations", "2", "--ddim-steps", "3", "--lr", "1e-3", "--seed", "7"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "step 2/2" in printed and "wrote" in printed and " s" in printed.splitlines()[-1]
    assert load_membrane(out).concepts == ["circle"]
    assert main(["train-spm", "--target", "circle", "--model", str(tmp_path), "--out", str(out)]) == 2


def test_prompt_settings_place_the_prompts_in_each_context():
    assert spm_train.prompt_settings("circle", "circle", "") == [("circle", "circle", "")]
    assert spm_train.prompt_settings("circle", "red circle", "", ["a {}", "a striped {} at the top"]) == [
        ("a circle", "a red circle", "a"), ("a striped circle at the top", "a striped red circle at the top",
                                            "a striped at the top")]
    with pytest.raises(ValueError, match="exactly one"):
        spm_train.prompt_settings("circle", "circle", "", ["a {} and a {}"])
    with pytest.raises(ValueError, match="exactly one"):
        spm_train.prompt_settings("circle", "circle", "", ["a red shape"])


def test_contexts_are_drawn_per_iteration_and_used_in_every_term(pipe):
    """With contexts each iteration draws one setting; the rollout, the frozen references and the membrane-on
    prediction all use that setting's encoded prompts; the file still names the bare concept."""
    contexts = ["a red solid {}", "a blue striped {}", "a green dotted {}"]
    config = SPMTrainConfig(**{**FAST, "iterations": 12, "ddim_steps": 2, "anchors": 1})
    with SPMTrainer(pipe, "circle", config=config, contexts=contexts) as trainer:
        expected = pipe.encode(["a blue striped circle", "a blue striped circle", "a blue striped"])
        assert torch.allclose(trainer.c_tar[1], expected[0]) and torch.allclose(trainer.c_neu[1], expected[2])
        seen, contexts_used = set(), []
        original_eps = trainer.eps

        def recording_eps(x, t, rows):
            contexts_used.append(rows)
            return original_eps(x, t, rows)

        trainer.eps = recording_eps
        for _ in range(config.iterations):
            contexts_used.clear()
            trainer.step()
            i = trainer.setting
            seen.add(i)
            rollout, reference, trained = contexts_used[0], contexts_used[-2], contexts_used[-1]
            assert torch.equal(rollout[1], trainer.c_tar[i]) and torch.equal(rollout[0], trainer.c_unc[0])
            assert torch.equal(reference[0], trainer.c_pos[i]) and torch.equal(reference[1], trainer.c_neu[i])
            assert torch.equal(trained[0], trainer.c_tar[i])
        assert seen == {0, 1, 2}
        assert trainer.fingerprint()["contexts"] == contexts
        assert trainer.membrane().concepts == ["circle"]


def test_shapes_world_contexts_name_the_concept_in_every_canonical_prompt():
    from erasekit.shapes import data
    from erasekit.shapes.methods import spm_contexts

    circle = spm_contexts("circle")
    assert len(circle) == len(data.COLORS) * len(data.PATTERNS)
    assert "a red striped {}" in circle and all(c.endswith(" {}") for c in circle)
    red = spm_contexts("red")
    assert len(red) == len(data.SHAPES) * len(data.PATTERNS) and "a {} dotted star" in red
    assert len(spm_contexts("striped")) == len(data.SHAPES) * len(data.COLORS)
    with pytest.raises(ValueError, match="implicit"):
        spm_contexts("stamp")
