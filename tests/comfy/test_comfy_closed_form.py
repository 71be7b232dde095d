"""Closed-form erasure nodes in ComfyUI (in-process), checked against the library path on the same weights."""
from __future__ import annotations

import warnings

import pytest
import torch

import erasekit
from erasekit.erasers.closed_form import recipes
from erasekit.erasers.erasure import BaseMismatchWarning, Erasure, FamilyMismatchError
from erasekit.erasers.io.clip_names import load_file_state_dict
from erasekit.erasers.text import TransformersEncoder

NODES = erasekit.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def transformers_encoder(comfy, tiny_checkpoint):
    """An independent encoder: transformers' CLIP on the checkpoint's text weights, ComfyUI's vocabulary files."""
    from pathlib import Path

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from erasekit.erasers.io.checkpoints import read_checkpoint, split_checkpoint
    from erasekit.testing.tiny_models import CLIP_L_TEXT_CONFIG

    tokenizer = CLIPTokenizer.from_pretrained(Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer")
    text = split_checkpoint(read_checkpoint(tiny_checkpoint)).text_encoder
    model = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    load_file_state_dict(model, {k: v.float() for k, v in text.items()})
    return TransformersEncoder([tokenizer], [model.eval()])


def _erase(model, clip, **kwargs):
    args = dict(method="uce", concepts="red circle", guide="", preserve="", strength=1.0)
    args.update(kwargs)
    with torch.inference_mode():
        return NODES["EraseKitEraseConcepts"]().erase(model, clip, **args)


def test_comfy_encoder_matches_transformers(loaded, transformers_encoder):
    from erasekit.nodes.comfy_adapter import ComfyEncoder

    prompts = ["red circle", "", "a photo of a striped blue star in the top left corner"]
    with torch.inference_mode():
        ours = ComfyEncoder(loaded[1])(prompts)
    theirs = transformers_encoder(prompts)
    assert ours.lengths == theirs.lengths == [2, 0, 12]
    assert torch.allclose(ours.embeddings, theirs.embeddings, atol=1e-4, rtol=1e-4)


def test_erase_node_patches_a_clone_with_the_library_edit(loaded, transformers_encoder):
    from erasekit.nodes.comfy_adapter import kv_weights

    model, clip = loaded
    before = {k: list(v) for k, v in model.patches.items()}
    edited, erasure = _erase(model, clip, preserve="blue square")
    assert edited is not model and {k: list(v) for k, v in model.patches.items()} == before
    assert len(edited.patches) - len(model.patches) == 14  # 7 attn2 blocks x (to_k, to_v)
    expected = recipes.erase(kv_weights(model), transformers_encoder, "sd1", recipes.EraseOptions(
        concepts=["red circle"], preserve=["blue square"]))
    for name, delta in erasure.layers.items():
        ref = expected.layers[name].materialize()
        assert torch.allclose(delta.materialize(), ref, atol=1e-5 * ref.abs().max().item())
    assert erasure.family == "sd1" and erasure.concepts == ["red circle"]


def test_effective_weights_follow_the_loaded_clone(comfy, loaded):
    """Loading the erased clone patches the shared module; loading the original restores it bit-exactly."""
    import comfy.model_management as mm

    model, clip = loaded
    edited, erasure = _erase(model, clip)
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    module = model.model
    original = module.state_dict()[key].clone()
    delta = erasure.layers["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].materialize()
    with torch.inference_mode():
        mm.load_models_gpu([edited])
        assert torch.allclose(module.state_dict()[key].float(), original.float() + delta, atol=1e-5)
        # While the edited clone is loaded, the original's weights read back as unpatched.
        from erasekit.nodes.comfy_adapter import kv_weights

        mid_k = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        assert torch.equal(kv_weights(model)[mid_k], original.float())
        mm.load_models_gpu([model])
        assert torch.equal(module.state_dict()[key], original)
    mm.unload_all_models()


def test_rece_and_trce_nodes_run(loaded):
    model, clip = loaded
    _, rece = _erase(model, clip, method="rece", token_selection="suffix", rece_preset="nudity", rece_epochs=1)
    assert rece.method == "rece" and rece.params["epochs"] == 1
    assert next(iter(rece.layers.values())).rank > 1
    _, trce = _erase(model, clip, method="trce", guide="a person wearing clothes", trce_prior_captions=20)
    assert trce.method == "trce"
    assert all(torch.isfinite(d.materialize()).all() for d in trce.layers.values())


def test_save_and_load_nodes_round_trip(comfy, loaded, tmp_path):
    import folder_paths

    folder_paths.folder_names_and_paths["erasers"] = ([str(tmp_path)], {".safetensors"})
    model, clip = loaded
    edited, erasure = _erase(model, clip)
    NODES["EraseKitSaveErasure"]().save(erasure, "test/red")
    (saved,) = list((tmp_path / "test").glob("red_*.safetensors"))
    assert "test/red_00001.safetensors" in NODES["EraseKitLoadErasure"].INPUT_TYPES()["required"]["erasure_name"][0]
    reloaded, loaded_erasure = NODES["EraseKitLoadErasure"]().load(model, "test/red_00001.safetensors", 0.5)
    key = next(iter(edited.patches.keys() - model.patches.keys()))
    assert reloaded.patches[key][-1][0] == 0.5
    assert torch.equal(reloaded.patches[key][-1][1][0], edited.patches[key][-1][1][0])


def test_family_and_fine_tune_checks(loaded):
    from erasekit.nodes.comfy_adapter import apply_erasure

    model, clip = loaded
    _, erasure = _erase(model, clip)
    sdxl = Erasure(layers=erasure.layers, method="uce", family="sdxl", concepts=["x"])
    with pytest.raises(FamilyMismatchError, match="made for the sdxl family and cannot apply to a sd1 model"):
        apply_erasure(model, sdxl)
    tuned = Erasure(layers=erasure.layers, method="uce", family="sd1", concepts=["x"],
                    base_fingerprint=[v * 1.01 for v in erasure.base_fingerprint])
    with pytest.warns(BaseMismatchWarning, match="different fine-tune"):
        apply_erasure(model, tuned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_erasure(model, erasure)


def test_bad_node_input_is_named(loaded):
    model, clip = loaded
    with pytest.raises(ValueError, match="no concept to erase"):
        _erase(model, clip, concepts=" ,; ")
    with pytest.raises(ValueError, match="2 guide concepts for 1 erased concepts"):
        _erase(model, clip, guide="a;b")


def test_a_concept_longer_than_the_window_warns_with_the_cut_words(loaded):
    from erasekit.erasers.text import TruncationWarning
    from erasekit.nodes.comfy_adapter import ComfyEncoder

    long_concept = " ".join(["red"] * 80) + " zebra"
    with torch.inference_mode(), pytest.warns(TruncationWarning, match="zebra"):
        encoded = ComfyEncoder(loaded[1])([long_concept])
    assert encoded.lengths == [75] and encoded.embeddings.shape[1] == 77
