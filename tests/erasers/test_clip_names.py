"""clip_names: CLIP text weights in file names (``text_model.*``) under whichever transformers is installed."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from erasekit.erasers.io import clip_names as cn

TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=16, bos_token_id=98, eos_token_id=99, pad_token_id=1)


def _models():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(**TINY)
    return CLIPTextModel(config).eval(), CLIPTextModelWithProjection(config).eval()


def test_file_names_round_trip_and_the_transformer_inside():
    for model in _models():
        inner = cn.text_transformer(model)
        assert {"embeddings", "encoder", "final_layer_norm"} <= {name for name, _ in inner.named_children()}
        weights = cn.file_state_dict(model)
        assert all(k.startswith(("text_model.", "text_projection.")) for k in weights)
        assert "text_model.embeddings.token_embedding.weight" in weights
        assert weights["text_model.final_layer_norm.weight"].data_ptr() == inner.final_layer_norm.weight.data_ptr()
        assert cn.to_model_names(weights, model).keys() == model.state_dict().keys()
        assert cn.to_file_names(model.state_dict(), model).keys() == weights.keys()


def test_loading_file_names_reports_keys_in_file_names():
    plain, _ = _models()
    other, _ = _models()
    weights = {k: torch.randn_like(v) for k, v in cn.file_state_dict(other).items()}
    missing, unexpected = cn.load_file_state_dict(plain, weights)
    assert not missing and not unexpected
    assert torch.equal(cn.text_transformer(plain).embeddings.token_embedding.weight,
                       weights["text_model.embeddings.token_embedding.weight"])
    del weights["text_model.encoder.layers.1.mlp.fc2.weight"]
    weights["not.a.clip.key"] = torch.zeros(1)
    missing, unexpected = cn.load_file_state_dict(plain, weights, strict=False)
    assert missing == ["text_model.encoder.layers.1.mlp.fc2.weight"] and unexpected == ["not.a.clip.key"]


def test_saved_folders_are_in_file_names_and_load_back(tmp_path):
    from transformers import CLIPTextModel

    plain, _ = _models()
    folder = cn.save_text_model(plain, tmp_path / "text_encoder")
    stored = load_file(folder / "model.safetensors")
    assert stored.keys() == cn.file_state_dict(plain).keys()
    again = CLIPTextModel.from_pretrained(folder)
    assert all(torch.equal(v, stored[k]) for k, v in cn.file_state_dict(again).items())
    # What transformers 5's save_pretrained writes, without the text_model. level, reads in file names too.
    bare = {k.removeprefix("text_model."): v for k, v in stored.items()}
    assert cn.as_file_names(bare).keys() == stored.keys()


def test_bytes_to_unicode_is_clips_table():
    table = cn.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256 and table[ord("a")] == "a"
