"""AdvUnlearn training (erasers/advunlearn/train.py) on the shapes world: what it changes and what it must not, its
attacker, determinism and resume, the released-layout output, and the shipped encoder erasing its concept."""
from __future__ import annotations

import json

import pytest
import torch

from erasekit.erasers import advunlearn
from erasekit.erasers.advunlearn.train import (
    AdvUnlearnConfig,
    AdvUnlearnTrainer,
    resume_path,
    save_encoder,
    train_advunlearn,
)
from erasekit.erasers.io.clip_names import file_state_dict, to_file_names
from erasekit.shapes import data, methods, metrics, model

CONCEPT = "circle"
# The smallest run that still has every part: warm-up, attacker, retain term, rollouts of a few steps.
QUICK = dict(iterations=3, warmup=1, attack_steps=2, ddim_steps=3, retain_batch=2, checkpoint_every=0)


@pytest.fixture(scope="module")
def pipe():
    return model.ShapesPipeline.load()


@pytest.fixture(scope="module")
def retain():
    return methods.world_captions(n=40, without=CONCEPT)


def _contexts():
    return methods.spm_contexts(CONCEPT)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, \
        {k: p.requires_grad for k, p in module.named_parameters()}


def test_training_changes_a_copy_of_the_encoder_layers_only(pipe, retain):
    encoder_before, encoder_flags = _snapshot(pipe.text_encoder)
    unet_before, unet_flags = _snapshot(pipe.unet)
    trained = train_advunlearn(pipe, CONCEPT, retain, AdvUnlearnConfig.shapes(**QUICK), _contexts())
    # The caller's models: bit-identical, flags as they were, no gradients left on them.
    for module, (before, flags) in ((pipe.text_encoder, (encoder_before, encoder_flags)),
                                    (pipe.unet, (unet_before, unet_flags))):
        assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
        assert {k: p.requires_grad for k, p in module.named_parameters()} == flags
        assert all(p.grad is None for p in module.parameters())
    after, encoder_before = file_state_dict(trained), to_file_names(encoder_before, pipe.text_encoder)
    changed = {k for k, v in after.items() if not torch.equal(v, encoder_before[k])}
    assert changed and all("embeddings" not in k for k in changed), sorted(changed)[:5]
    assert any(k.startswith("text_model.encoder.layers.") for k in changed)
    assert not any(p.requires_grad for p in trained.parameters())


def test_same_seed_same_encoder_and_resume_continues_exactly(pipe, retain, tmp_path):
    config = AdvUnlearnConfig.shapes(**QUICK)
    whole = train_advunlearn(pipe, CONCEPT, retain, config, _contexts())
    again = train_advunlearn(pipe, CONCEPT, retain, config, _contexts())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in whole.state_dict().items())

    with AdvUnlearnTrainer(pipe, CONCEPT, retain, config, _contexts()) as first:
        first.step()
        first.step()  # past the warm-up: the attacker's latest prefix is part of the state
        state = first.state_dict()
    assert state["delta"] is not None
    torch.save(state, tmp_path / "state.pt")
    with AdvUnlearnTrainer(pipe, CONCEPT, retain, config, _contexts()) as second:
        second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        second.step()
        resumed = second.text_encoder()
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())

    other = AdvUnlearnConfig.shapes(**{**QUICK, "lr": 1e-3})
    with AdvUnlearnTrainer(pipe, CONCEPT, retain, other, _contexts()) as third:
        with pytest.raises(ValueError, match="different run"):
            third.load_state_dict(state)


def test_interrupted_run_resumes_from_its_checkpoint(pipe, retain, tmp_path):
    config = AdvUnlearnConfig.shapes(**{**QUICK, "checkpoint_every": 1})
    whole = train_advunlearn(pipe, CONCEPT, retain, config, _contexts())
    out = tmp_path / "enc"
    calls = []

    def stop_after_two(step, total, losses):
        calls.append(step)
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_advunlearn(pipe, CONCEPT, retain, config, _contexts(), progress=stop_after_two, out=out)
    assert resume_path(out).is_file() and not out.exists()
    resumed = train_advunlearn(pipe, CONCEPT, retain, config, _contexts(), progress=lambda s, t, loss: calls.append(s),
                               out=out)
    assert calls == [1, 2, 3]  # the third iteration only, after the checkpoint at 2
    assert not resume_path(out).exists()
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())


def test_attacker_lowers_its_loss_and_leaves_the_encoder_alone(pipe, retain):
    config = AdvUnlearnConfig.shapes(**{**QUICK, "attack_lr": 0.05, "attack_init": "random"})
    with AdvUnlearnTrainer(pipe, CONCEPT, retain, config, _contexts()) as trainer:
        rows = trainer.retain_rows()
        *draws, _, _ = trainer.draws(0, 3, trainer.ids_retain[rows])
        x_t, t = draws[0]
        before = _snapshot(trainer.encoder)[0]

        def loss(delta):
            with torch.no_grad():
                target = trainer.eps(x_t, t, trainer.e0_concepts[:1])
                return torch.nn.functional.mse_loss(
                    trainer.eps(x_t, t, trainer.encode(trainer.ids_attack[:1], delta)), target).item()

        start = trainer.initial_prefix()
        first = loss(start)
        trainer.delta, trainer.config.attack_init = start, "latest"
        delta = trainer.attack(0, [(x_t, t)] * 20)
        assert loss(delta) < first
        assert all(torch.equal(v, before[k]) for k, v in trainer.encoder.state_dict().items())
        assert all(p.grad is None for p in trainer.encoder.parameters())


def test_output_is_the_released_layout_and_loads_back(pipe, retain, tmp_path):
    trained = train_advunlearn(pipe, CONCEPT, retain, AdvUnlearnConfig.shapes(**{**QUICK, "iterations": 1}),
                               _contexts())
    out = save_encoder(trained, tmp_path / "circle_unlearned")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "pytorch_model.bin"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["CLIPTextModel"]
    pickled = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert all(v.dtype == torch.float32 for v in pickled.values())
    (out / "model.safetensors").unlink()  # the released folders have the pickle only
    loaded = advunlearn.load_advunlearn(out, width=model.CONTEXT_DIM)
    for key, value in loaded.state_dict.items():
        assert torch.equal(value, file_state_dict(trained)[key])
    with pytest.raises(advunlearn.TextEncoderError, match="768-wide CLIP-L"):
        advunlearn.load_advunlearn(out)  # a shapes-world encoder is not an SD1.x one


def test_bad_input_is_refused_with_the_reason(pipe, retain):
    with pytest.raises(ValueError, match="retain prompts"):
        AdvUnlearnTrainer(pipe, CONCEPT, retain[:1], AdvUnlearnConfig.shapes(**QUICK), _contexts())
    with pytest.raises(ValueError, match="empty"):
        AdvUnlearnTrainer(pipe, " ", retain, AdvUnlearnConfig.shapes(**QUICK))
    with pytest.raises(ValueError, match="attack_init"):
        AdvUnlearnConfig(attack_init="best").validate()
    with pytest.raises(ValueError, match="exactly one"):
        AdvUnlearnTrainer(pipe, CONCEPT, retain, AdvUnlearnConfig.shapes(**QUICK), ["a red circle"])


def test_cli_needs_retain_prompts_on_sd_models(tmp_path, capsys):
    from erasekit.cli.main import main

    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert main(["train-advunlearn", "--concept", "x", "--out", str(tmp_path / "o"), "--model", str(folder)]) != 0
    assert "SDXL" in capsys.readouterr().err


@pytest.mark.skipif(not (methods.ENCODERS_DIR / CONCEPT / "config.json").is_file(), reason="no shipped encoder")
def test_shipped_encoder_erases_its_concept_and_keeps_colours(pipe):
    from erasekit.shapes.judge import Judge

    judge = Judge.load()
    sets = metrics.probe_sets(CONCEPT, n=12, seed=5)
    naming, other = sets["efficacy"][:12], sets["specificity"][:12]
    prompts, seeds = [p.prompt for p in naming + other], [p.seed for p in naming + other]
    before = judge(pipe(prompts, seeds))
    with methods.erased(pipe, "advunlearn", CONCEPT):
        during = judge(pipe(prompts, seeds))
    circle = data.SHAPES.index(CONCEPT)
    assert (before.shape[:12] == circle).sum() >= 10 and (during.shape[:12] == circle).sum() <= 2
    colours = [list(data.COLORS).index(p.color) for p in other]
    assert sum(int(c) == a for c, a in zip(during.color[12:], colours)) >= \
        sum(int(c) == a for c, a in zip(before.color[12:], colours)) - 2
