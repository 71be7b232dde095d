"""Checkpoint text encoders as transformers models, checked against ComfyUI's own CLIP code as the reference.

- Names: open_clip <-> transformers, round trip checked with ComfyUI's `comfy.utils.clip_text_transformers_convert`.
- Tokenizer: built from open_clip's packaged BPE list; vocabulary and ids equal ComfyUI's (comfy/sd1_tokenizer).
- Encoders: equal to ComfyUI's SD1 CLIP (the tiny checkpoint), SD2ClipModel (ViT-H) and SDXLClipModel (L + bigG)
  on the same weights. ComfyUI's SD2/SDXL models are built at full size, without weight initialisation, and their
  towers cut to the same few layers as ours (ComfyUI picks its layer by index from the end of the layer list at call
  time, so its "penultimate" follows the cut); the full-size ViT-H runs once, in a slow test.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from erasekit.erasers.io import text_encoders as te
from erasekit.erasers.io.clip_names import file_state_dict
from erasekit.erasers.text import TruncationWarning
from erasekit.testing.tiny_models import random_open_clip_tower

PROMPTS = ["a red circle", "", "Hello, World!! a cat's photo from 1990: über café"]  # no "(...)": ComfyUI weights it


def _comfy_tokenizer_dir(comfy) -> Path:
    return Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"




def _random_clip_l(layers: int, seed: int) -> dict[str, torch.Tensor]:
    """OpenAI CLIP-L in transformers names, `layers` deep, from transformers' own initialisation."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.testing.tiny_models import CLIP_L_TEXT_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**{**CLIP_L_TEXT_CONFIG, "num_hidden_layers": layers}))
    return {k: v for k, v in file_state_dict(model).items() if k != "text_model.embeddings.position_ids"}


def _cut_comfy_tower(tower, layers: int) -> None:
    """Keep the first `layers` layers of a ComfyUI SDClipModel's transformer (see the module notes)."""
    encoder = tower.transformer.text_model.encoder
    encoder.layers = torch.nn.ModuleList(list(encoder.layers)[:layers])
    tower.transformer.num_layers = layers


def _comfy_encode(model, tokenizer, prompts) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.encode_token_weights(tokenizer.tokenize_with_weights(p))[0][:, :77] for p in prompts])


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    if te.open_clip_bpe_path() is None:
        pytest.skip("open_clip_torch is not installed")
    return te.tokenizer_files(cache_dir=tmp_path_factory.mktemp("erasekit-cache"))


# ---------------------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("width,heads", [(1024, 16), (1280, 20)], ids=["sd2-h", "sdxl-g"])
def test_open_clip_round_trip_agrees_with_comfyui(comfy, width, heads):
    """transformers -> open_clip (ours) -> transformers, by ours and by ComfyUI's converter: exact."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=4 * width, projection_dim=width,
                            num_hidden_layers=2, num_attention_heads=heads, hidden_act="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = file_state_dict(CLIPTextModelWithProjection(config))
    reference.pop("text_model.embeddings.position_ids", None)

    open_clip = te.transformers_to_open_clip(reference)
    assert open_clip["transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * width, width)
    assert open_clip["text_projection"].shape == (width, width) and "positional_embedding" in open_clip

    ours = te.open_clip_to_transformers(open_clip)
    theirs = comfy.utils.clip_text_transformers_convert({f"clip_x.{k}": v for k, v in open_clip.items()},
                                                        "clip_x.", "clip_x.transformer.")
    theirs = {k.removeprefix("clip_x.transformer."): v for k, v in theirs.items()}
    assert set(ours) == set(theirs) == set(reference)
    for key, tensor in reference.items():
        assert torch.equal(ours[key], tensor), key
        assert torch.equal(theirs[key], tensor), key


def test_open_clip_conversion_options_and_errors():
    tower = random_open_clip_tower(64, 3, seed=1, vocab=100)
    tower["attn_mask"] = torch.zeros(77, 77)
    cut = te.open_clip_to_transformers(tower, layers=2, projection=False)
    assert te.transformers_layers(cut) == 2 and "text_projection.weight" not in cut
    assert not any("logit_scale" in k or "attn_mask" in k for k in cut)
    full = te.open_clip_to_transformers(tower)
    assert torch.equal(full["text_projection.weight"], tower["text_projection"].T)
    assert te.drop_last_layers(full, 2).keys() == {**cut, "text_projection.weight": 0}.keys()
    with pytest.raises(te.TextEncoderError, match="not part of an open_clip text tower: transformer.foo"):
        te.open_clip_to_transformers({**tower, "transformer.foo": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_bpe_conversion_gives_comfyuis_vocabulary(comfy, bpe_dir):
    reference = _comfy_tokenizer_dir(comfy)
    ours = json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    assert ours == json.loads((reference / "vocab.json").read_text(encoding="utf-8"))
    assert len(ours) == 49408 and ours["<|endoftext|>"] == 49407 and ours["!"] == 0
    merges = (bpe_dir / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
    assert merges[1:48895] == (reference / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:48895]


def test_tokenizer_files_are_cached_and_missing_open_clip_is_explained(bpe_dir, tmp_path, monkeypatch):
    again = te.tokenizer_files(cache_dir=bpe_dir.parent)
    assert again == bpe_dir
    assert te.tokenizer_files(tokenizer_dir=bpe_dir) == bpe_dir
    with pytest.raises(te.TextEncoderError, match="no vocab.json and merges.txt"):
        te.tokenizer_files(tokenizer_dir=tmp_path)
    monkeypatch.setattr(te, "open_clip_bpe_path", lambda: None)
    with pytest.raises(te.TextEncoderError, match=r"pip install open_clip_torch.*--tokenizer DIR"):
        te.tokenizer_files(cache_dir=tmp_path)


def test_token_ids_match_comfyuis_tokenizers(comfy, bpe_dir):
    import comfy.sd1_clip
    import comfy.sd2_clip
    import comfy.sdxl_clip

    prompts = PROMPTS + ["wow! !! a dog!", "Ünïcödé — “quotes” 123"]
    comfy_l = comfy.sd1_clip.SDTokenizer()
    comfy_h = comfy.sd2_clip.SD2ClipHTokenizer()
    comfy_xl = comfy.sdxl_clip.SDXLTokenizer()
    for name, pad, theirs in (("l", 49407, comfy_l), ("h", 0, comfy_h), ("g", 0, comfy_xl.clip_g)):
        ours = te.clip_tokenizer(bpe_dir, pad)(prompts, padding="max_length", max_length=77, truncation=True,
                                              return_tensors="pt").input_ids
        for i, prompt in enumerate(prompts):
            expected = [t for t, _ in theirs.tokenize_with_weights(prompt)[0]]
            assert ours[i].tolist() == expected, (name, prompt)
    # a plain CLIPTokenizer with pad token "!" would turn every typed "!" into the pad id: ours does not.
    ids = te.clip_tokenizer(bpe_dir, 0)(["wow!"])["input_ids"][0]
    assert ids == [49406, 2781, 256, 49407]


# ---------------------------------------------------------------------------------------------------------------
# Encoders against ComfyUI


@pytest.mark.slow
def test_sd1_encoder_equals_comfyui_on_the_tiny_checkpoint(comfy, tiny_checkpoint, bpe_dir):
    from erasekit.erasers.io.checkpoints import read_checkpoint

    with torch.no_grad():
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=False,
                                                              output_clip=True)
        expected = torch.cat([clip.encode_from_tokens(clip.tokenize(p))[:, :77].float() for p in PROMPTS])
    state = read_checkpoint(tiny_checkpoint)
    encoder = te.encoder_from_checkpoint(state, "sd1", tokenizer_dir=bpe_dir)
    result = encoder(PROMPTS)
    assert result.embeddings.shape == (3, 77, 768)
    assert result.lengths[:2] == [3, 0]
    torch.testing.assert_close(result.embeddings, expected, atol=1e-4, rtol=1e-4)


def _sd2_comparison(comfy, bpe_dir, layers: int, cut: bool):
    import comfy.sd2_clip
    import comfy.utils

    tower = random_open_clip_tower(1024, layers, seed=2)
    checkpoint = {f"cond_stage_model.model.{k}": v.half() for k, v in tower.items()}
    with torch.no_grad():
        theirs = comfy.sd2_clip.SD2ClipModel()  # penultimate layer, final norm applied (ComfyUI's default)
        if cut:
            _cut_comfy_tower(theirs.clip_h, layers)
        prefix = "cond_stage_model.model."
        converted = comfy.utils.clip_text_transformers_convert(
            {f"clip_h.{k[len(prefix):]}": v.float() for k, v in checkpoint.items()}, "clip_h.", "clip_h.transformer.")
        missing, unexpected = theirs.clip_h.load_sd({k.removeprefix("clip_h.transformer."): v
                                                     for k, v in converted.items()})
        assert not [k for k in missing if "position_ids" not in k]
        expected = _comfy_encode(theirs, comfy.sd2_clip.SD2Tokenizer(), PROMPTS)
    del theirs
    encoder = te.encoder_from_checkpoint(checkpoint, "sd2", tokenizer_dir=bpe_dir)
    (model,) = encoder.text_encoders
    assert model.config.num_hidden_layers == layers - 1 and model.config.hidden_act == "gelu"
    assert model.config.num_attention_heads == 16 and not encoder.penultimate
    result = encoder(PROMPTS)
    assert result.embeddings.shape == (3, 77, 1024)
    torch.testing.assert_close(result.embeddings, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_sd2_encoder_equals_comfyuis_sd2_clip(comfy, bpe_dir):
    """ViT-H at full width, 3 layers (ComfyUI's cut to the same): penultimate + final layer norm."""
    _sd2_comparison(comfy, bpe_dir, layers=3, cut=True)


@pytest.mark.slow
def test_sd2_encoder_equals_comfyuis_sd2_clip_full_size(comfy, bpe_dir):
    """The full 24-layer ViT-H (354 M parameters) against ComfyUI's unmodified SD2ClipModel."""
    started = time.perf_counter()
    _sd2_comparison(comfy, bpe_dir, layers=24, cut=False)
    assert time.perf_counter() - started < 120


def _sdxl_comparison(comfy, bpe_dir, layers_l: int, layers_g: int):
    import comfy.sdxl_clip
    import comfy.utils

    clip_l = {k: v.half() for k, v in _random_clip_l(layers_l, seed=3).items()}
    clip_g = {k: v.half() for k, v in random_open_clip_tower(1280, layers_g, seed=4).items()}
    with torch.no_grad():
        theirs = comfy.sdxl_clip.SDXLClipModel()  # both towers: penultimate layer, no final norm
        if layers_l < 12:
            _cut_comfy_tower(theirs.clip_l, layers_l)
        if layers_g < 32:
            _cut_comfy_tower(theirs.clip_g, layers_g)
        g = comfy.utils.clip_text_transformers_convert({f"clip_g.{k}": v for k, v in clip_g.items()},
                                                       "clip_g.", "clip_g.transformer.")
        theirs.clip_g.load_sd({k.removeprefix("clip_g.transformer."): v.float() for k, v in g.items()})
        del g
        theirs.clip_l.load_sd({k: v.float() for k, v in clip_l.items()})
        expected = _comfy_encode(theirs, comfy.sdxl_clip.SDXLTokenizer(), PROMPTS)
    del theirs
    checkpoint = {f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_l.items()}
    checkpoint.update({f"conditioner.embedders.1.model.{k}": v for k, v in clip_g.items()})
    del clip_l, clip_g
    encoder = te.encoder_from_checkpoint(checkpoint, "sdxl", tokenizer_dir=bpe_dir)
    del checkpoint
    model_l, model_g = encoder.text_encoders
    assert type(model_g).__name__ == "CLIPTextModelWithProjection" and encoder.penultimate
    assert model_l.config.hidden_act == "quick_gelu" and model_g.config.hidden_act == "gelu"
    assert model_g.config.num_attention_heads == 20 and model_g.config.num_hidden_layers == layers_g
    result = encoder(PROMPTS)
    assert result.embeddings.shape == (3, 77, 2048)
    torch.testing.assert_close(result.embeddings, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_sdxl_encoder_equals_comfyuis_sdxl_clip(comfy, bpe_dir):
    """CLIP-L and bigG at full width, 3 layers each (ComfyUI's cut to the same): penultimate hidden states
    without the final norm, L then G."""
    _sdxl_comparison(comfy, bpe_dir, layers_l=3, layers_g=3)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ERASEKIT_FULL_SIZE_TESTS"),
                    reason="about 75 s and 10 GB on 2 CPU cores; set ERASEKIT_FULL_SIZE_TESTS=1 to run")
def test_sdxl_encoder_equals_comfyuis_sdxl_clip_full_size(comfy, bpe_dir):
    """Full-size CLIP-L (123 M) and bigG (694 M parameters) against ComfyUI's unmodified SDXLClipModel."""
    _sdxl_comparison(comfy, bpe_dir, layers_l=12, layers_g=32)


def _write_component(folder: Path, tower: dict[str, torch.Tensor], hidden_act: str) -> None:
    from erasekit.erasers.io.checkpoints import write_checkpoint

    write_checkpoint(folder / "model.safetensors", tower)
    te.clip_text_config(tower, hidden_act).to_json_file(folder / "config.json")


@pytest.mark.slow
def test_diffusers_folders_encode_like_single_files(tmp_path, bpe_dir):
    """SD2: diffusers keeps 23 of ViT-H's 24 layers (here 2 of 3) and takes the last hidden state, which is ComfyUI's
    penultimate one. SDXL: text_encoder_2 is bigG with its projection; without tokenizer_2/ the BPE files serve."""
    h = {k: v.half() for k, v in random_open_clip_tower(1024, 3, seed=8).items()}
    single = te.encoder_from_checkpoint({f"cond_stage_model.model.{k}": v for k, v in h.items()}, "sd2",
                                        tokenizer_dir=bpe_dir)
    folder = tmp_path / "sd2"
    _write_component(folder / "text_encoder", te.open_clip_to_transformers(h, layers=2, projection=False), "gelu")
    shutil.copytree(bpe_dir, folder / "tokenizer")
    diffusers = te.encoder_from_diffusers(folder, "sd2")
    torch.testing.assert_close(diffusers(PROMPTS).embeddings, single(PROMPTS).embeddings, atol=1e-6, rtol=1e-6)

    clip_l = {k: v.half() for k, v in _random_clip_l(1, seed=9).items()}
    g = {k: v.half() for k, v in random_open_clip_tower(1280, 2, seed=10).items()}
    state = {f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_l.items()}
    state.update({f"conditioner.embedders.1.model.{k}": v for k, v in g.items()})
    single = te.encoder_from_checkpoint(state, "sdxl", tokenizer_dir=bpe_dir)
    folder = tmp_path / "sdxl"
    _write_component(folder / "text_encoder", clip_l, "quick_gelu")
    _write_component(folder / "text_encoder_2", te.open_clip_to_transformers(g), "gelu")
    shutil.copytree(bpe_dir, folder / "tokenizer")
    diffusers = te.encoder_from_diffusers(folder, "sdxl", cache_dir=bpe_dir.parent)
    assert type(diffusers.text_encoders[1]).__name__ == "CLIPTextModelWithProjection"
    assert diffusers.tokenizers[1].pad_id == 0 and diffusers.tokenizers[0].pad_id == 49407
    torch.testing.assert_close(diffusers(PROMPTS).embeddings, single(PROMPTS).embeddings, atol=1e-6, rtol=1e-6)
    with pytest.raises(te.TextEncoderError, match="no text_encoder_2/ folder"):
        shutil.rmtree(folder / "text_encoder_2")
        te.encoder_from_diffusers(folder, "sdxl", cache_dir=bpe_dir.parent)


# ---------------------------------------------------------------------------------------------------------------
# Errors and small pieces


def test_missing_tower_is_a_clear_error():
    with pytest.raises(te.TextEncoderError, match=r"no clip_g text encoder.*conditioner\.embedders\.1\.model"):
        te.checkpoint_text_towers({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}, "sdxl")
    with pytest.raises(te.TextEncoderError, match="no clip_l text encoder"):
        te.checkpoint_text_towers({"model.diffusion_model.x": torch.zeros(1)}, "sd1")


def test_wrong_tower_width_is_refused(bpe_dir):
    tower = random_open_clip_tower(64, 2, seed=5, vocab=49408)
    state = {f"cond_stage_model.model.{k}": v for k, v in tower.items()}
    with pytest.raises(te.TextEncoderError, match="64 wide, not 1024"):
        te.encoder_from_checkpoint(state, "sd2", tokenizer_dir=bpe_dir)


def test_long_concept_warns_with_the_cut_text(bpe_dir):
    clip_l = _random_clip_l(1, seed=6)
    encoder = te.encoder_from_checkpoint({f"cond_stage_model.transformer.{k}": v for k, v in clip_l.items()}, "sd1",
                                         tokenizer_dir=bpe_dir)
    words = " ".join(["cat"] * 75)
    with pytest.warns(TruncationWarning, match=r"77 tokens.*the last 2 were cut: 'zebra giraffe'"):
        result = encoder([f"{words} zebra giraffe"])
    assert result.lengths == [75]
