"""The `erasekit` command. Each subcommand is a thin layer over one function of the core."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _selfcheck(args: argparse.Namespace) -> int:
    """Start a real ComfyUI with this pack in custom_nodes/ and list the nodes it registered."""
    from .. import NODE_CLASS_MAPPINGS
    from .comfy_server import ComfyError, ComfyServer, locate_comfyui

    source = locate_comfyui()
    print(f"starting ComfyUI from {source} (CPU) ...", flush=True)
    try:
        with ComfyServer(source=source) as client:
            info = client.object_info()
    except ComfyError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    print(f"ComfyUI registered {len(NODE_CLASS_MAPPINGS) - len(missing)} EraseKit node(s):")
    for name in sorted(NODE_CLASS_MAPPINGS):
        if name in info:
            entry = info[name]
            print(f"  {name:32s} {entry.get('display_name', '')}  [{entry.get('category', '')}]")
    if missing:
        print(f"FAILED: not registered: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Report a checkpoint's family, cross-attention layers and text encoders."""
    from .checkpoints import CheckpointError, read_checkpoint_shapes
    from .families import describe_model

    try:
        shapes = read_checkpoint_shapes(Path(args.checkpoint))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    unet = {k: v for k, v in shapes.items() if "diffusion_model." in k or k.startswith(("down_blocks", "mid_block", "up_blocks"))}
    print(describe_model(unet, shapes).text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erasekit", description="Concept erasure for text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = sub.add_parser("selfcheck", help="start a real ComfyUI with the pack and list the nodes it registered")
    check.set_defaults(run=_selfcheck)

    inspect = sub.add_parser("inspect", help="report a checkpoint's model family, cross-attention layers and text encoders")
    inspect.add_argument("checkpoint", help="a single-file checkpoint (.safetensors, .ckpt) in the LDM/ComfyUI layout")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
