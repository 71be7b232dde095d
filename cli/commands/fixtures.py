"""`erasekit fixtures`: the model files the shipped workflows name, as tiny SD1.5-shaped stand-ins (cli/fixtures.py)."""
from __future__ import annotations

import argparse

from .. import fixtures
from ..common import error


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fixtures", help="write the model files the shipped workflows name (tiny SD1.5-shaped stand-ins)",
        description="Write into a ComfyUI models folder every model file the workflows in workflows/ name, made for "
                    "a tiny SD1.5-shaped checkpoint with seeded random weights: the checkpoint (checkpoints/), SPM "
                    "membranes (spm/), an erasure (erasers/), an AdvUnlearn encoder folder in the released layout "
                    "(clip/) and Geom-Erasing location tokens (embeddings/). Files that exist are kept unless "
                    "--force.")
    parser.add_argument("--models-dir", required=True, metavar="DIR", help="ComfyUI's models folder")
    parser.add_argument("--checkpoint-name", default=fixtures.CHECKPOINT, metavar="NAME",
                        help=f"file name of the checkpoint under checkpoints/ (default: {fixtures.CHECKPOINT})")
    parser.add_argument("--force", action="store_true", help="replace files that exist")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="CLIP's vocab.json and merges.txt, for the erasure (default: from open_clip)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...erasers.io.checkpoints import CheckpointError
    from ...erasers.io.text_encoders import TextEncoderError

    try:
        fixtures.write_fixtures(args.models_dir, args.checkpoint_name, args.force, args.tokenizer)
    except (CheckpointError, TextEncoderError, ValueError) as err:
        return error(err)
    return 0
