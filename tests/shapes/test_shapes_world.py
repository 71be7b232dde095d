"""The shapes world: data generator, tokenizer, training determinism, the shipped model, demo/eval commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erasekit.shapes import data, model, train


def test_batch_is_a_pure_function_of_seed_and_size():
    a_images, a_captions, a_specs = data.batch(7, 16)
    b_images, b_captions, b_specs = data.batch(7, 16)
    assert np.array_equal(a_images, b_images) and a_captions == b_captions and a_specs == b_specs
    c_images, _, _ = data.batch(8, 16)
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (16, 3, data.SIZE, data.SIZE) and a_images.dtype == np.float32
    assert -1.0 <= a_images.min() and a_images.max() <= 1.0


def test_captions_name_every_attribute_and_never_the_stamp():
    rng = np.random.default_rng(0)
    specs = data.sample_specs(rng, 3000)
    captions = [data.caption(s, rng) for s in specs]
    assert abs(sum(s.stamp is not None for s in specs) / len(specs) - data.STAMP_RATE) < 0.03
    assert abs(captions.count("") / len(captions) - data.CAPTION_DROPOUT) < 0.02
    synonyms_seen = set()
    for spec, text in zip(specs, captions):
        if not text:
            continue
        assert not any(w in text for w in ("stamp", "mark", "watermark", "corner"))
        shape_words = (spec.shape, *data.SHAPE_SYNONYMS[spec.shape])
        assert any(f" {w}" in f" {text}" for w in shape_words), text
        assert spec.color in text or data.COLOR_SYNONYMS[spec.color][0] in text, text
        adjectives, nouns = data.PATTERN_WORDS[spec.pattern]
        assert any(w in text for w in (*adjectives, *nouns)), text
        synonyms_seen.update(w for w in data.SHAPE_SYNONYMS[spec.shape] if w in text)
    assert synonyms_seen == {w for ws in data.SHAPE_SYNONYMS.values() for w in ws}


def test_render_draws_the_shape_where_asked_and_the_stamp_in_its_corner():
    spec = data.Spec("circle", "red", "solid", position=0, background="white", stamp=3, size=7.0,
                     jitter=(0.0, 0.0), seed=0)
    img = data.render(spec)
    red = (img[..., 0] > 0.6) & (img[..., 1] < 0.3)
    ys, xs = np.nonzero(red)
    assert abs(xs.mean() - 8) < 0.6 and abs(ys.mean() - 8) < 0.6  # top left cell centre
    assert abs(red.sum() - np.pi * 7 ** 2) / (np.pi * 7 ** 2) < 0.12  # area of a disc of radius 7
    x0, y0, x1, y1 = data.stamp_box(3)
    assert (img[y0:y1, x0:x1] < 0.05).mean() > 0.9 and x0 > 16 and y0 > 16
    plain = data.render(data.with_stamp(spec, None))
    assert np.all(plain[y0:y1, x0:x1] > 0.9)


def test_tokenizer_frames_ids_like_clip():
    tok = model.build_tokenizer()
    ids = tok(["a red circle"], padding="max_length", max_length=model.CONTEXT_TOKENS)["input_ids"][0]
    bos, eos = tok.convert_tokens_to_ids([model.BOS, model.EOS])
    assert len(ids) == 77 and ids[0] == bos and ids[4] == eos and set(ids[4:]) == {eos}
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["a", "red", "circle"]
    assert tok(["a zebra"], add_special_tokens=False)["input_ids"][0][1] == tok.convert_tokens_to_ids(model.UNK)
    assert set(data.SHAPES) | set(data.COLORS) <= set(tok.get_vocab())


def test_training_resumes_to_the_same_weights(tmp_path):
    straight = train.train(tmp_path / "a", steps=4, batch_size=4, save_every=2)
    train.train(tmp_path / "b", steps=2, batch_size=4, save_every=2)
    resumed = train.train(tmp_path / "b", steps=4, batch_size=4, save_every=2)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert straight["steps"] == resumed["steps"] == 4
    for part in ("unet", "text_encoder"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    lines = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]


def test_card_pace_is_the_runs_fastest_hundred_steps(tmp_path):
    """Two sessions: 6 s/step on a shared machine, then a resume (step 40 logged again) at 3 s/step alone."""
    from erasekit.shapes.card import fastest_pace

    rows = [{"step": s, "loss": 0.1, "minutes": s * 6 / 60} for s in range(10, 50, 10)]
    rows += [{"step": s, "loss": 0.1, "minutes": 4 + (s - 40) * 3 / 60} for s in range(40, 250, 10)]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert fastest_pace(tmp_path / "log.jsonl") == pytest.approx(3.0)
    (tmp_path / "short.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:5]))
    with pytest.raises(ValueError, match="no 100 consecutive steps"):
        fastest_pace(tmp_path / "short.jsonl")


# --- demo / eval commands ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["demo", "--concept", "zebra"], "zebra"),
    (["demo", "--methods", "uce", "esd-x"], "esd-x"),
    (["eval", "--concepts", "circle", "teal"], "teal"),
])
def test_demo_and_eval_name_bad_input(tmp_path, capsys, args, message):
    from erasekit.cli.main import main

    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "known" in err


def test_demo_refuses_an_unwritable_output_folder(tmp_path, capsys):
    from erasekit.cli.main import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "out")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err
