"""Models with the shapes of real Stable Diffusion ones and seeded random weights, for tests and demos.

No weights can be downloaded where EraseKit is tested, yet its code must run against real ComfyUI, which recognises
an SD1.x checkpoint only by the shapes of its tensors. `build_tiny_sd15_checkpoint` writes the smallest file it
still accepts: a UNet with SD1.5's widths (320 channels, 768-wide context) but two levels of one res-block, and the
full-size CLIP-L text encoder and VAE, whose shapes ComfyUI fixes.

The cross-attention helpers give the K/V projection weights of the full SD1.5 and SDXL UNets (names and shapes),
for the closed-form methods, whose inputs are exactly those weights, without building a UNet.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from ..erasers.families import UNetLayout
from ..erasers.io.checkpoints import checkpoint_from_diffusers, write_checkpoint
from ..erasers.io.clip_names import file_state_dict

if TYPE_CHECKING:
    from ..erasers.spm.membrane import Membrane

# diffusers UNet2DConditionModel configurations. attention_head_dim is, for SD1.x, the number of heads (a
# historical misnomer in diffusers); SDXL's is per level.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# What ComfyUI still detects as SD1.x: model_channels 320, context 768, a conv proj_in, no class embedding.
# A smaller SD1.x-shaped UNet (one cross-attention level, 16/32 channels) for benchmark and kernel tests.
SMALL_SD15_UNET_CONFIG = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                              attention_head_dim=2, norm_num_groups=8)

TINY_SD15_UNET_CONFIG = {
    "sample_size": 64,
    "block_out_channels": (320, 640),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# transformers CLIPTextConfig of OpenAI's ViT-L/14 text tower, the SD1.x text encoder.
CLIP_L_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# diffusers AutoencoderKL of SD1.x/SD2.x/SDXL.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}


class TinySD15(NamedTuple):
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    vae: torch.nn.Module  # diffusers AutoencoderKL


def build_tiny_sd15_models(seed: int = 0) -> TinySD15:
    """The tiny SD1.5-shaped UNet, CLIP-L and VAE in float32, each initialised by its library after
    ``torch.manual_seed(seed)``. The caller's random state is left as it was."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        # Seeding before each model keeps each one's weights independent of how the others are built.
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SD15_UNET_CONFIG)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
        torch.manual_seed(seed)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    return TinySD15(unet.eval(), text_encoder.eval(), vae.eval())


def build_tiny_sd15_checkpoint(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the tiny SD1.5-shaped model as one LDM-layout ``.safetensors`` checkpoint; the same seed and dtype
    give the same bytes. About 315 M parameters (630 MB in float16)."""
    models = build_tiny_sd15_models(seed)
    state_dict = checkpoint_from_diffusers(
        unet=models.unet.state_dict(),
        vae=models.vae.state_dict(),
        text_encoder=file_state_dict(models.text_encoder),
        layout=UNetLayout((1, 1)),
    )
    del models
    state_dict = {key: tensor.to(dtype) for key, tensor in state_dict.items()}
    metadata = {"erasekit.model": "tiny-sd15", "erasekit.seed": str(seed)}
    return write_checkpoint(path, state_dict, metadata)


def unet_cross_attention_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """``{diffusers attn2 path: (inner_dim, context_dim)}`` of a UNet2DConditionModel config, in the order the UNet
    runs them (down, mid, up).

    Follows diffusers' block structure: each cross-attention level has one attention per res-block going down and
    one more going up, and the mid block has as many transformer blocks as the deepest level.
    """
    channels = tuple(config["block_out_channels"])
    levels = len(channels)
    layout = UNetLayout((int(config["layers_per_block"]),) * levels)
    depths = config.get("transformer_layers_per_block", 1)
    depths = tuple(depths) if isinstance(depths, (tuple, list)) else (depths,) * levels
    context = int(config["cross_attention_dim"])
    down_attention = [kind.startswith("CrossAttn") for kind in config["down_block_types"]]
    up_attention = [kind.startswith("CrossAttn") for kind in config["up_block_types"]]

    shapes: dict[str, tuple[int, int]] = {}

    def add(block: str, depth: int, inner: int) -> None:
        for t in range(depth):
            shapes[f"{block}.transformer_blocks.{t}.attn2"] = (inner, context)

    for level in range(levels):
        if down_attention[level]:
            for block in range(layout.num_res_blocks[level]):
                add(f"down_blocks.{level}.attentions.{block}", depths[level], channels[level])
    add("mid_block.attentions.0", depths[-1], channels[-1])
    for up_level in range(levels):
        level = levels - 1 - up_level
        if up_attention[up_level]:
            for block in range(layout.num_res_blocks[level] + 1):
                add(f"up_blocks.{up_level}.attentions.{block}", depths[level], channels[level])
    return shapes


def cross_attention_weights(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random ``attn2.to_k.weight`` and ``attn2.to_v.weight`` tensors for every cross-attention of a UNet config.

    Drawn from N(0, 1/context_dim), the scale of trained projections (and of fan-in initialisation), so that
    keys and values of unit-scale text embeddings have unit scale too. Uses its own generator: the global random
    state is untouched, and the same seed gives the same tensors.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for block, (inner, context) in unet_cross_attention_shapes(config).items():
        for projection in ("to_k", "to_v"):
            weight = torch.randn(inner, context, generator=generator) / math.sqrt(context)
            weights[f"{block}.{projection}.weight"] = weight.to(dtype)
    return weights


def sd15_cross_attention_weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The 32 cross-attention K/V weights of SD1.5's UNet (16 blocks, context 768), random, in diffusers names."""
    return cross_attention_weights(SD15_UNET_CONFIG, seed, dtype)


def sdxl_cross_attention_weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The 140 cross-attention K/V weights of SDXL's UNet (70 blocks, context 2048), random, in diffusers names."""
    return cross_attention_weights(SDXL_UNET_CONFIG, seed, dtype)


def random_membranes(targets: dict[str, torch.nn.Module], concepts: Sequence[str], seed: int = 0) -> list["Membrane"]:
    """One seeded rank-1 SPM membrane (α = 1, as official SPM files are) per concept on every target module."""
    from ..erasers.spm.membrane import Membrane, MembraneLayer

    g = torch.Generator().manual_seed(seed)
    membranes = []
    for concept in concepts:
        layers = {}
        for path, module in targets.items():
            shape = module.weight.shape
            # Fan-in scaled, small: the membranes change every output but keep float16 runs finite.
            down = torch.randn(1, *shape[1:], generator=g) / shape[1:].numel() ** 0.5
            up = 0.1 * torch.randn(shape[0], 1, *(1,) * (len(shape) - 2), generator=g)
            layers[path] = MembraneLayer(down, up, 1.0)
        membranes.append(Membrane(layers, [concept], 1.0))
    return membranes


def random_open_clip_tower(width: int, layers: int, seed: int, vocab: int = 49408, projection: bool = True,
                           mlp_ratio: int = 4) -> dict[str, torch.Tensor]:
    """An open_clip text tower with scaled random weights (unit-ish activations through every layer)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "token_embedding.weight": rnd(vocab, width),
        "positional_embedding": rnd(77, width, std=0.01),
        "ln_final.weight": 1 + rnd(width, std=0.1),
        "ln_final.bias": rnd(width),
        "logit_scale": torch.tensor(4.6),
    }
    if projection:
        sd["text_projection"] = rnd(width, width)
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": 1 + rnd(width, std=0.1), p + "ln_1.bias": rnd(width),
            p + "ln_2.weight": 1 + rnd(width, std=0.1), p + "ln_2.bias": rnd(width),
            p + "attn.in_proj_weight": rnd(3 * width, width, std=width ** -0.5),
            p + "attn.in_proj_bias": rnd(3 * width),
            p + "attn.out_proj.weight": rnd(width, width, std=width ** -0.5), p + "attn.out_proj.bias": rnd(width),
            p + "mlp.c_fc.weight": rnd(mlp_ratio * width, width, std=width ** -0.5),
            p + "mlp.c_fc.bias": rnd(mlp_ratio * width),
            p + "mlp.c_proj.weight": rnd(width, mlp_ratio * width, std=(mlp_ratio * width) ** -0.5),
            p + "mlp.c_proj.bias": rnd(width),
        })
    return sd
