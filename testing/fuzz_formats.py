"""The file formats the fuzzer (testing/fuzz.py) mutates: a tiny valid seed of each, written by EraseKit's writers or
in the official layout, and the loader a user's call goes through. cli/fuzz.py adds the batch manifest (a CLI file).

Seeds are small (kilobytes) so that thousands of cases run in minutes; they keep what each loader checks: context
width 768 (SD1.x) for erasures, membranes and official releases, a complete CLIP text model for AdvUnlearn.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..erasers.advunlearn.encoder import load_advunlearn
from ..erasers.closed_form import official
from ..erasers.erasure import Erasure, LayerDelta
from ..erasers.geom.negatives import LocationTokens
from ..erasers.io.checkpoints import write_checkpoint
from ..erasers.io.clip_names import file_state_dict, save_text_model
from ..erasers.io.model_files import open_model
from ..erasers.io.prompt_lists import read_prompt_file
from ..erasers.spm.membrane import Membrane, MembraneLayer, load_membrane, save_membrane
from .fuzz import Format
from .tiny_models import SMALL_SD15_UNET_CONFIG, cross_attention_weights

TEXT_WIDTH = 64  # the tiny CLIP text model's width; AdvUnlearn files are loaded expecting it
KV = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- EraseKit's own files ---------------------------------------------------------------------------------------


def _write_erasure(folder: Path) -> None:
    g = _generator(1)
    down = torch.randn(2, 768, generator=g)
    layers = {
        f"unet.{KV}.to_k.weight": LayerDelta(up=torch.randn(16, 2, generator=g), down=down),
        f"unet.{KV}.to_v.weight": LayerDelta(up=torch.randn(16, 2, generator=g), down=down),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            LayerDelta(dense=torch.randn(32, 768, generator=g) * 1e-2),
    }
    Erasure(layers, method="uce", family="sd1", concepts=["van gogh"], guide=[""], preserve=["monet"],
            params={"erase_scale": 1.0, "preserve_scale": 0.5}, base_fingerprint=[1.5, 2.25, 3.0]
            ).save(folder / "erasure.safetensors")


def _write_location_tokens(folder: Path) -> None:
    vectors = torch.randn(9, TEXT_WIDTH, generator=_generator(2))
    LocationTokens("watermark", 3, list(range(9)), vectors, family="sd1",
                   extra={"erasekit.fixture": "seeded"}).save(folder / "watermark.safetensors")


def _small_unet_targets() -> dict[str, tuple[int, ...]]:
    """Weight shapes of the SPM targets of the small SD1.5-shaped UNet (built on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    from ..erasers.spm.hooks import membrane_targets

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SMALL_SD15_UNET_CONFIG)
    return {path: tuple(module.weight.shape) for path, module in membrane_targets(unet).items()}


def _write_membrane(folder: Path) -> None:
    g = _generator(3)
    layers = {}
    for path, shape in _small_unet_targets().items():
        down = torch.randn(2, *shape[1:], generator=g) / max(1, torch.Size(shape[1:]).numel()) ** 0.5
        up = 0.1 * torch.randn(shape[0], 2, *(1,) * (len(shape) - 2), generator=g)
        layers[path] = MembraneLayer(down, up, 1.0)
    save_membrane(Membrane(layers, ["van gogh"], 1.0), folder / "vangogh_spm.safetensors")


# --- AdvUnlearn text encoders -----------------------------------------------------------------------------------


def _tiny_text_model():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=1000, hidden_size=TEXT_WIDTH, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=TEXT_WIDTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        return CLIPTextModel(config).eval()


def _tower() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in file_state_dict(_tiny_text_model()).items()
            if not k.endswith("position_ids")}


def _write_encoder_safetensors(folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(_tower(), str(folder / "advunlearn.safetensors"), metadata={"format": "pt"})


def _write_encoder_training_pt(folder: Path) -> None:
    """The training script's TextEncoder-*.pt: the wrapper's state dict, the CLIPTextModel under ``text_encoder.``
    and the wrapper's aliases of its parts beside it."""
    tower = _tower()
    state = {f"text_encoder.{k}": v for k, v in tower.items()}
    state.update({k.replace("text_model.embeddings.", "embedding."): v.clone() for k, v in tower.items()
                  if k.startswith("text_model.embeddings.")})
    state.update({k.replace("text_model.final_layer_norm.", "final_layer_norm."): v.clone() for k, v in tower.items()
                  if k.startswith("text_model.final_layer_norm.")})
    torch.save(state, folder / "TextEncoder-nudity.pt")


def _write_encoder_folder(folder: Path) -> None:
    save_text_model(_tiny_text_model(), folder / "nudity_unlearned")


def _load_encoder(path: Path):
    return load_advunlearn(path, width=TEXT_WIDTH)


# --- official UCE / RECE / TRCE releases ------------------------------------------------------------------------


def _base() -> dict[str, torch.Tensor]:
    """The base the official files were "made from": the small UNet's K/V weights, one attn1.to_q, and conv_in."""
    g = _generator(5)
    base = dict(cross_attention_weights(SMALL_SD15_UNET_CONFIG, seed=5))
    base[f"{KV[:-len('attn2')]}attn1.to_q.weight"] = torch.randn(16, 16, generator=g) / 4
    base["conv_in.weight"] = torch.randn(16, 4, 3, 3, generator=g) / 6
    base["conv_in.bias"] = torch.zeros(16)
    return base


@functools.cache
def official_base() -> dict[str, torch.Tensor]:
    return _base()


def _edited(keys, stage2: bool = False) -> dict[str, torch.Tensor]:
    """The base with a rank-2 edit of every K/V weight (one right factor: a closed-form edit's shape), and with
    `stage2` a dense edit of attn1.to_q (TRCE's stage 2)."""
    g = _generator(6)
    base = official_base()
    shared = torch.randn(2, 768, generator=g) / 768 ** 0.5
    out = {}
    for key in keys:
        weight = base[key]
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            weight = weight + 0.05 * torch.randn(weight.shape[0], 2, generator=g) @ shared
        elif stage2 and ".attn1." in key:
            weight = weight + 1e-2 * torch.randn(weight.shape, generator=g)
        out[key] = weight.contiguous()
    return out


def _kv_keys() -> list[str]:
    return [k for k in official_base() if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]


def _write_uce_2025(folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(_edited(_kv_keys()), str(folder / "vangogh_uce.safetensors"))


def _write_unet_state_dict(folder: Path) -> None:
    torch.save(_edited(list(official_base())), folder / "nudity_rece.pt")


def _write_trce_folder(folder: Path) -> None:
    from safetensors.torch import save_file

    unet = folder / "trce_unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30",
                                                  "cross_attention_dim": 768, "block_out_channels": [16, 32]}))
    keys = [k for k in official_base() if not k.startswith("conv_in")]
    save_file(_edited(keys, stage2=True), str(unet / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def _convert(path: Path):
    erasure, _report = official.convert(path, official_base(), concepts=["van gogh"])
    return erasure


# --- checkpoints, prompt lists ----------------------------------------------------------------------------------


def _checkpoint_state() -> dict[str, torch.Tensor]:
    """A single-file SD1.x checkpoint in LDM names, as small as `open_model` reads one: the small UNet's K/V
    weights, a res-block and downsampler per level (the layout is read off them), a text and a VAE tensor."""
    from ..erasers.families import UNetLayout
    from ..erasers.io.checkpoints import unet_diffusers_to_ldm

    g = _generator(7)
    kv = cross_attention_weights(SMALL_SD15_UNET_CONFIG, seed=7, dtype=torch.float16)
    unet = dict(unet_diffusers_to_ldm(kv, UNetLayout((1, 1))))
    for key in ("input_blocks.1.0.in_layers.0.weight", "input_blocks.2.0.op.weight",
                "input_blocks.3.0.in_layers.0.weight"):
        unet[key] = torch.randn(16, generator=g).half()
    return {
        **{f"model.diffusion_model.{k}": v for k, v in unet.items()},
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
            torch.randn(100, 32, generator=g).half(),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=g),
    }


def _read_model(path: Path) -> dict:
    """What `erasekit erase` reads of a model: its family, UNet layout and K/V weights (a 4 GB checkpoint is not read
    whole: what is not read cannot be wrong)."""
    model = open_model(path)
    return {"family": model.family.name, "layout": model.layout.num_res_blocks, "kv": model.kv_weights()}


def _write_checkpoint(folder: Path) -> None:
    write_checkpoint(folder / "model.safetensors", _checkpoint_state(), {"erasekit.model": "fuzz"})


def _write_ckpt(folder: Path) -> None:
    torch.save({"state_dict": _checkpoint_state(), "global_step": 470000, "epoch": 6}, folder / "model.ckpt")


PROMPTS_CSV = ('prompt,evaluation_seed,evaluation_guidance,categories\n'
               'a painting of a cat,42,7.5,animals\n'
               '"a dog, running",7,,animals\n'
               'starry night by van gogh,1234,5,art\n'
               'an empty room,,,\n'
               'a red apple,99,12.5,"food,still life"\n')
PROMPTS_TXT = "a painting of a cat\n  a dog running  \n\nstarry night by van gogh\nan empty room\n"


def _writer(name: str, text: str):
    def write(folder: Path) -> None:
        (folder / name).write_text(text, encoding="utf-8")

    return write


def formats() -> list[Format]:
    """Every format of the core and the test models; cli/fuzz.py adds the CLI's."""
    return [
        Format("erasure", _write_erasure, ("erasure.safetensors",),
               lambda d: Erasure.load(d / "erasure.safetensors")),
        Format("spm-membrane", _write_membrane, ("vangogh_spm.safetensors",),
               lambda d: load_membrane(d / "vangogh_spm.safetensors")),
        Format("advunlearn-safetensors", _write_encoder_safetensors, ("advunlearn.safetensors",),
               lambda d: _load_encoder(d / "advunlearn.safetensors")),
        Format("advunlearn-pt", _write_encoder_training_pt, ("TextEncoder-nudity.pt",),
               lambda d: _load_encoder(d / "TextEncoder-nudity.pt")),
        Format("advunlearn-folder", _write_encoder_folder,
               ("nudity_unlearned/model.safetensors", "nudity_unlearned/config.json"),
               lambda d: _load_encoder(d / "nudity_unlearned")),
        Format("geom-tokens", _write_location_tokens, ("watermark.safetensors",),
               lambda d: LocationTokens.load(d / "watermark.safetensors")),
        Format("uce-2025", _write_uce_2025, ("vangogh_uce.safetensors",),
               lambda d: _convert(d / "vangogh_uce.safetensors")),
        Format("uce-2023-rece-pt", _write_unet_state_dict, ("nudity_rece.pt",),
               lambda d: _convert(d / "nudity_rece.pt")),
        Format("trce-folder", _write_trce_folder,
               ("trce_unet/diffusion_pytorch_model.safetensors", "trce_unet/config.json"),
               lambda d: _convert(d / "trce_unet")),
        Format("checkpoint-safetensors", _write_checkpoint, ("model.safetensors",),
               lambda d: _read_model(d / "model.safetensors")),
        Format("checkpoint-ckpt", _write_ckpt, ("model.ckpt",), lambda d: _read_model(d / "model.ckpt")),
        Format("prompts-csv", _writer("prompts.csv", PROMPTS_CSV), ("prompts.csv",),
               lambda d: read_prompt_file(d / "prompts.csv")),
        Format("prompts-txt", _writer("prompts.txt", PROMPTS_TXT), ("prompts.txt",),
               lambda d: read_prompt_file(d / "prompts.txt")),
    ]
