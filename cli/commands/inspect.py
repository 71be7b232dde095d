"""`erasekit inspect`: a checkpoint's family, cross-attention layers and text encoders."""
from __future__ import annotations

import argparse
from pathlib import Path

from ...erasers.families import describe_model
from ..common import error

UNET_PREFIXES = ("down_blocks", "mid_block", "up_blocks")  # a diffusers UNet's keys; LDM's hold "diffusion_model."


def register(subparsers) -> None:
    inspect = subparsers.add_parser(
        "inspect", help="report a checkpoint's model family, cross-attention layers and text encoders")
    inspect.add_argument("checkpoint", help="a single-file checkpoint (.safetensors, .ckpt) in the LDM/ComfyUI layout")
    inspect.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...erasers.io.checkpoints import CheckpointError, read_checkpoint_shapes

    try:
        shapes = read_checkpoint_shapes(Path(args.checkpoint))
    except CheckpointError as err:
        return error(err)
    unet = {k: v for k, v in shapes.items() if "diffusion_model." in k or k.startswith(UNET_PREFIXES)}
    print(describe_model(unet, shapes).text())
    return 0
