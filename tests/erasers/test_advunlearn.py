"""AdvUnlearn text encoders: every layout they come in, written as the official code and release write them; the
ComfyUI node (in-process and in a real server) and the diffusers swap, checked against transformers' CLIPTextModel
loaded from the same released folder; the errors for what is not an SD1.x CLIP-L."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import erasekit
from erasekit.erasers.advunlearn.encoder import load_advunlearn, restore_text_encoder, swap_text_encoder
from erasekit.erasers.io.clip_names import file_state_dict, text_transformer
from erasekit.erasers.io.text_encoders import TextEncoderError, build_clip_text_model

NODE = "EraseKitLoadAdvUnlearn"
POSITION_IDS = "text_model.embeddings.position_ids"
PROMPTS = ["a photo of a naked person", "a red circle", ""]
# CLIP-L's width with few layers and a small vocabulary, for the layout tests; the released config's token ids.
TINY = dict(vocab_size=99, hidden_size=768, intermediate_size=32, num_hidden_layers=2, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
            pad_token_id=1)


def _clip(seed: int, **config):
    """A seeded CLIPTextModel whose state dict holds position_ids, as the transformers (4.2x) of the releases saved."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**{**TINY, **config})).eval()
    model.config.architectures = ["CLIPTextModel"]
    embeddings = text_transformer(model).embeddings
    embeddings.register_buffer("position_ids", embeddings.position_ids.clone(), persistent=True)
    return model


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in file_state_dict(model).items() if k != POSITION_IDS}


def _write_released(folder: Path, model, safetensors: bool = False) -> Path:
    """A folder of HF OPTML-Group/AdvUnlearn: config.json and pytorch_model.bin (torch.save of the state dict), or
    the model.safetensors a conversion adds."""
    folder.mkdir(parents=True)
    model.config.to_json_file(folder / "config.json")
    if safetensors:
        save_file({k: v.contiguous() for k, v in _weights(model).items()}, folder / "model.safetensors")
    else:
        torch.save(file_state_dict(model), folder / "pytorch_model.bin")
    return folder


class _CustomTextEncoder(torch.nn.Module):
    """The module the official training script saves (train-scripts/utils/text_encoder.py): the CLIPTextModel and
    three of its submodules again as attributes, so its state dict names every tensor twice."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder
        self.embedding = text_transformer(text_encoder).embeddings
        self.encoder = text_transformer(text_encoder).encoder
        self.final_layer_norm = text_transformer(text_encoder).final_layer_norm

    def saved(self) -> dict[str, torch.Tensor]:
        """Its state dict as the training script's file holds it (the CLIPTextModel under text_encoder.text_model.)"""
        own = {f"text_encoder.{k}": v for k, v in file_state_dict(self.text_encoder).items()}
        return {**{k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}, **own}


# --- layouts -------------------------------------------------------------------------------------------------------


def test_every_layout_reads_as_the_same_encoder(tmp_path):
    model = _clip(1)
    expected = _weights(model)
    paths = {
        "released .bin folder": _write_released(tmp_path / "nudity_unlearned", model),
        "released .bin file": tmp_path / "nudity_unlearned" / "pytorch_model.bin",
        "released .safetensors folder": _write_released(tmp_path / "converted", model, safetensors=True),
        "training .pt": tmp_path / "TextEncoder-text_encoder_full-epoch_999.pt",
        "transformers .safetensors": tmp_path / "transformers.safetensors",
        "checkpoint .safetensors": tmp_path / "checkpoint.safetensors",
    }
    torch.save(_CustomTextEncoder(model).saved(), paths["training .pt"])
    save_file({k: v.contiguous() for k, v in expected.items()}, paths["transformers .safetensors"])
    save_file({**{f"cond_stage_model.transformer.{k}": v.contiguous() for k, v in expected.items()},
               "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, paths["checkpoint .safetensors"])
    written = torch.load(paths["training .pt"], weights_only=True)
    assert {"encoder.layers.0.mlp.fc1.weight", "embedding.token_embedding.weight", "final_layer_norm.weight",
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight"} <= set(written)  # the duplicated aliases

    for what, path in paths.items():
        encoder = load_advunlearn(path)
        assert encoder.state_dict.keys() == expected.keys(), what
        assert all(torch.equal(encoder.state_dict[k], v) for k, v in expected.items()), what
        assert encoder.layers == 2
    assert load_advunlearn(paths["released .bin folder"]).config.eos_token_id == 2  # its config.json, as shipped


def test_a_released_folder_encodes_as_transformers_loads_it(tmp_path):
    from transformers import CLIPTextModel

    folder = _write_released(tmp_path / "vangogh_unlearned", _clip(2))
    encoder = load_advunlearn(folder)
    ids = torch.randint(0, TINY["vocab_size"], (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = build_clip_text_model(encoder.state_dict, encoder.config)(ids)
        theirs = CLIPTextModel.from_pretrained(folder)(ids)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert torch.equal(ours.pooler_output, theirs.pooler_output)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_a_pickle_of_python_objects_is_refused_with_how_to_convert_it(tmp_path):
    path = tmp_path / "TextEncoder-whole-module.pt"
    torch.save(_clip(1), path)  # the module itself, not its state dict
    with pytest.raises(TextEncoderError, match=r"could run code.*does not load it.*convert it to \.safetensors"):
        load_advunlearn(path)


def test_other_families_text_encoders_are_named(tmp_path):
    sd2 = _clip(1, hidden_size=1024, num_attention_heads=16, num_hidden_layers=1)
    save_file({k: v.contiguous() for k, v in _weights(sd2).items()}, tmp_path / "sd2-transformers.safetensors")
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(99, 1024),
               "cond_stage_model.model.transformer.resblocks.0.ln_1.weight": torch.zeros(1024)},
              tmp_path / "sd2-checkpoint.safetensors")
    clip_l = "conditioner.embedders.0.transformer.text_model."
    save_file({f"{clip_l}embeddings.token_embedding.weight": torch.zeros(99, 768),
               f"{clip_l}encoder.layers.0.layer_norm1.weight": torch.zeros(768),
               "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(99, 1280),
               "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight": torch.zeros(1280)},
              tmp_path / "sdxl-checkpoint.safetensors")
    for name, family in (("sd2-transformers", "Stable Diffusion 2.x: clip_h (OpenCLIP ViT-H/14, 1024 wide)"),
                         ("sd2-checkpoint", "Stable Diffusion 2.x: clip_h (OpenCLIP ViT-H/14, 1024 wide)"),
                         ("sdxl-checkpoint", "Stable Diffusion XL: clip_g (OpenCLIP ViT-bigG/14, 1280 wide), clip_l")):
        with pytest.raises(TextEncoderError, match=rf"holds the text encoders? of {re.escape(family)}.*"
                                                   r"CLIP-L text encoder of Stable Diffusion 1.x"):
            load_advunlearn(tmp_path / f"{name}.safetensors")


def test_unknown_damaged_and_incomplete_files_say_what_they_hold(tmp_path):
    unet = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4), "model.diffusion_model.out.2.bias": torch.zeros(4),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4)}, unet)
    with pytest.raises(TextEncoderError, match=r"no CLIP text encoder.*key prefixes found: model.diffusion_model.\* "
                                               r"\(2 keys\), first_stage_model.decoder.\* \(1 keys\)"):
        load_advunlearn(unet)

    model = _clip(1)
    truncated = tmp_path / "truncated.safetensors"
    save_file({k: v.contiguous() for k, v in _weights(model).items()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100_000])
    with pytest.raises(TextEncoderError, match="not a complete safetensors file"):
        load_advunlearn(truncated)

    incomplete = tmp_path / "incomplete.safetensors"
    save_file({k: v.contiguous() for k, v in _weights(model).items() if "layers.1.mlp.fc2" not in k}, incomplete)
    with pytest.raises(TextEncoderError, match=r"missing text_model.encoder.layers.1.mlp.fc2"):
        load_advunlearn(incomplete)

    _write_released(tmp_path / "AdvUnlearn" / "church_unlearned", model)
    with pytest.raises(TextEncoderError, match="no config.json.*subfolders church_unlearned"):
        load_advunlearn(tmp_path / "AdvUnlearn")


# --- a full-size released folder, and diffusers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_checkpoint) -> Path:
    """A released-layout folder at CLIP-L's full size: the tiny checkpoint's text encoder with its layers and final
    norm moved (the embeddings stay, as AdvUnlearn trains them), every value one float16 holds, so that ComfyUI's
    float16 text encoder holds exactly these weights."""
    from transformers import CLIPTextConfig

    from erasekit.erasers.io.checkpoints import read_checkpoint, split_checkpoint
    from erasekit.testing.tiny_models import CLIP_L_TEXT_CONFIG

    base = split_checkpoint(read_checkpoint(tiny_checkpoint)).text_encoder
    g = torch.Generator().manual_seed(7)
    state = {}
    for key, tensor in base.items():
        frozen = ".embeddings." in key
        moved = tensor.float() if frozen else tensor.float() + 0.01 * torch.randn(tensor.shape, generator=g)
        state[key] = moved.half().float()
    state[POSITION_IDS] = torch.arange(77).unsqueeze(0)
    folder = tmp_path_factory.mktemp("advunlearn") / "nudity_unlearned"
    folder.mkdir()
    config = CLIPTextConfig(**{**CLIP_L_TEXT_CONFIG, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})
    config.architectures = ["CLIPTextModel"]
    config.to_json_file(folder / "config.json")
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def reference(released):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(released).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from erasekit.cli.comfy_server import locate_comfyui

    return CLIPTokenizer.from_pretrained(locate_comfyui() / "comfy" / "sd1_tokenizer")


def _pipeline(tokenizer, width: int = 768, **text_config):
    """A StableDiffusionPipeline with a small UNet and VAE of this context width and a seeded text encoder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.testing.tiny_models import CLIP_L_TEXT_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**CLIP_L_TEXT_CONFIG, **text_config}))
        vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                    attention_head_dim=2, norm_num_groups=8, cross_attention_dim=width,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _encode_prompt(pipe) -> torch.Tensor:
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, True, negative_prompt=["", "blurry"])
    return torch.cat([positive, negative])


def test_diffusers_swap_matches_transformers_and_restores_exactly(released, reference, tokenizer):
    pipe = _pipeline(tokenizer)
    encoder = load_advunlearn(released)
    before = _encode_prompt(pipe)
    weights = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}

    swap_text_encoder(pipe, encoder, strength=0.0)
    assert torch.equal(_encode_prompt(pipe), before)

    swap_text_encoder(pipe, encoder)
    swapped = _encode_prompt(pipe)
    ids = tokenizer([*PROMPTS[:2], "", "blurry"], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).last_hidden_state  # the negative prompts go through the robust encoder too
    assert (swapped - expected).abs().max() <= 1e-4
    assert (swapped - before).abs().max() > 1e-2

    restore_text_encoder(pipe)
    assert torch.equal(_encode_prompt(pipe), before)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.text_encoder.state_dict().items())


def test_diffusers_swap_refuses_other_widths_and_layer_counts(released, tokenizer):
    encoder = load_advunlearn(released)
    sd2 = _pipeline(tokenizer, width=1024, hidden_size=1024, num_attention_heads=16, num_hidden_layers=1,
                    intermediate_size=64, vocab_size=1000)
    with pytest.raises(TextEncoderError, match=r"Stable Diffusion 2.x pipeline \(its text_encoder is 1024 wide\)"):
        swap_text_encoder(sd2, encoder)
    short = _pipeline(tokenizer, num_hidden_layers=2)
    before = {k: v.clone() for k, v in short.text_encoder.state_dict().items()}
    with pytest.raises(TextEncoderError, match="has 2 layers .* nudity_unlearned 12"):
        swap_text_encoder(short, encoder)
    assert all(torch.equal(v, before[k]) for k, v in short.text_encoder.state_dict().items())


# --- ComfyUI --------------------------------------------------------------------------------------------------------


@pytest.fixture
def encoders_folder(comfy, released, monkeypatch):
    """models/clip (models/text_encoders in the newest ComfyUI) holding the released folder."""
    import folder_paths

    name = getattr(folder_paths, "map_legacy", lambda n: n)("clip")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                        ([str(released.parent)], set(folder_paths.supported_pt_extensions)))
    return f"{released.name}/pytorch_model.bin"


def _load(clip, name: str, strength: float = 1.0):
    with torch.inference_mode():
        return erasekit.NODE_CLASS_MAPPINGS[NODE]().load(clip, name, strength)[0]


def _comfy_encode(clip) -> torch.Tensor:
    import nodes

    with torch.inference_mode():
        return torch.cat([nodes.CLIPTextEncode().encode(clip, text)[0][0][0] for text in PROMPTS]).float()


def _comfy_ids(clip) -> torch.Tensor:
    return torch.tensor([[t[0] for t in clip.tokenize(text)["l"][0]] for text in PROMPTS])


def test_comfy_node_matches_transformers_and_leaves_the_input_clip(loaded, reference, encoders_folder):
    clip = loaded[1]
    assert encoders_folder in erasekit.NODE_CLASS_MAPPINGS[NODE].INPUT_TYPES()["required"]["encoder_name"][0]
    before = _comfy_encode(clip)
    robust = _load(clip, encoders_folder)
    ours = _comfy_encode(robust)
    with torch.no_grad():
        expected = reference(_comfy_ids(clip)).last_hidden_state
    assert (ours - expected).abs().max() <= 1e-4
    assert (ours - before).abs().max() > 1e-2
    assert torch.equal(_comfy_encode(clip), before)  # the input CLIP, and the module it shares, unchanged
    assert torch.equal(_comfy_encode(_load(clip, encoders_folder, 0.0)), before)


def test_comfy_strength_blends_from_the_original_weights_under_other_patches(loaded, released, tiny_checkpoint,
                                                                            encoders_folder):
    from erasekit.erasers.io.checkpoints import read_checkpoint
    from erasekit.nodes.comfy_adapter import _patched

    clip = loaded[1]
    name = "text_model.encoder.layers.3.mlp.fc1.weight"
    key = f"clip_l.transformer.{name}"
    base = read_checkpoint(tiny_checkpoint)[f"cond_stage_model.transformer.{name}"].float()
    new = torch.load(released / "pytorch_model.bin", weights_only=True)[name]
    _comfy_encode(_load(clip, encoders_folder))  # the shared module now holds another clone's patched weights
    half = _load(clip, encoders_folder, 0.5)
    assert torch.allclose(_patched(half.patcher, key, base), (base + new) / 2, atol=1e-6)
    assert not any("embeddings" in k for k in half.patcher.patches)  # frozen by AdvUnlearn: nothing to patch
    lora = clip.clone()
    lora.add_patches({key: (torch.full_like(base, 0.01),)}, 1.0)  # a LoRA-like patch already on the CLIP
    assert torch.allclose(_patched(_load(lora, encoders_folder).patcher, key, base), new + 0.01, atol=1e-6)


def test_comfy_sd2_and_sdxl_clips_are_refused(comfy, loaded, encoders_folder):
    import comfy.sdxl_clip

    try:
        from comfy.sd2_clip import SD2ClipModel
    except ImportError:  # the newest ComfyUI
        from comfy.text_encoders.sd2_clip import SD2ClipModel
    for module, family in ((SD2ClipModel, r"Stable Diffusion 2.x: clip_h \(OpenCLIP ViT-H/14, 1024 wide\)"),
                           (comfy.sdxl_clip.SDXLClipModel, r"Stable Diffusion XL: clip_g .*1280 wide.*clip_l")):
        other = loaded[1].clone()
        with torch.no_grad():
            other.cond_stage_model = module(device="meta")  # ComfyUI's own module for that family, no weights
        with pytest.raises(TextEncoderError, match=rf"this CLIP holds the text encoders? of {family}"):
            _load(other, encoders_folder)


@pytest.mark.slow
def test_released_folder_in_a_server(comfy_server, tiny_checkpoint, released):
    """In a real ComfyUI: the released folder through the node gives the latents of ComfyUI's own CLIPLoader on the
    same weights; strength 0 gives the checkpoint's own."""
    clip_dir = comfy_server.models_dir / "clip"
    clip_dir.mkdir(exist_ok=True)
    # A copy: a model file linked from outside ComfyUI's folders is refused (issue #22, confinement).
    shutil.copytree(released, clip_dir / released.name, dirs_exist_ok=True)
    weights = torch.load(released / "pytorch_model.bin", weights_only=True)
    save_file({k: v for k, v in weights.items() if k != POSITION_IDS}, clip_dir / "advunlearn-hf.safetensors")
    node = {"class_type": NODE, "inputs": {"clip": ["1", 1], "encoder_name": f"{released.name}/pytorch_model.bin"}}

    def branch(clip: list, prefix: str, n: int) -> dict:
        return {
            f"{n}": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPTS[0], "clip": clip}},
            f"{n + 1}": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
            f"{n + 2}": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "positive": [f"{n}", 0], "negative": [f"{n + 1}", 0], "latent_image": ["5", 0],
                "seed": 0, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            f"{n + 3}": {"class_type": "SaveLatent", "inputs": {"samples": [f"{n + 2}", 0], "filename_prefix": prefix}},
        }

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
        "2": {**node, "inputs": {**node["inputs"], "strength": 1.0}},
        "3": {**node, "inputs": {**node["inputs"], "strength": 0.0}},
        "4": {"class_type": "CLIPLoader", "inputs": {"clip_name": "advunlearn-hf.safetensors",
                                                      "type": "stable_diffusion"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        **branch(["1", 1], "advu_plain", 10), **branch(["2", 0], "advu_robust", 20),
        **branch(["3", 0], "advu_zero", 30), **branch(["4", 0], "advu_cliploader", 40),
    }
    comfy_server.client.run(prompt)
    latents = {prefix: load_file(str(next(comfy_server.output_dir.rglob(f"{prefix}_*.latent"))))["latent_tensor"]
               for prefix in ("advu_plain", "advu_robust", "advu_zero", "advu_cliploader")}
    assert torch.equal(latents["advu_robust"], latents["advu_cliploader"])
    assert torch.equal(latents["advu_zero"], latents["advu_plain"])
    assert (latents["advu_robust"] - latents["advu_plain"]).abs().max() > 1e-3
