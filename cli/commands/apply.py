"""`erasekit apply`: merge an erasure into a copy of a checkpoint (single file or diffusers folder)."""
from __future__ import annotations

import argparse
import time

from ...erasers.families import FamilyError
from ..common import PrintedWarnings, error, number, refuse_outputs, size


def register(subparsers) -> None:
    apply = subparsers.add_parser(
        "apply", help="merge an erasure into a copy of a checkpoint",
        description="Write a full checkpoint in the input's layout (single file or diffusers folder) and dtypes with "
                    "the erasure merged (W + strength·ΔW); every other tensor and the metadata are kept as they are.",
    )
    apply.add_argument("--erasure", required=True, metavar="FILE")
    apply.add_argument("--checkpoint", required=True, metavar="PATH",
                       help="a single-file checkpoint (.safetensors, .ckpt) or a diffusers pipeline folder")
    apply.add_argument("--out", required=True, metavar="MERGED",
                       help="the merged .safetensors file, or a new folder for a diffusers input")
    apply.add_argument("--strength", type=number(-4, 4), default=1.0,
                       help="W + strength·ΔW, -4 to 4 (default 1)")
    apply.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...erasers.erasure import Erasure, ErasureFileError, FamilyMismatchError
    from ...erasers.io.checkpoints import CheckpointError
    from ...erasers.io.model_files import open_model

    started = time.perf_counter()
    with PrintedWarnings():
        try:
            refuse_outputs([args.out], [args.erasure, args.checkpoint])
            erasure = Erasure.load(args.erasure)
            model = open_model(args.checkpoint)
            print(f"model: {args.checkpoint} ({model.kind}, {model.family.label})", flush=True)
            print(f"erasure: {erasure.method} of {', '.join(map(repr, erasure.concepts))} for {erasure.family}, "
                  f"{len(erasure.layers)} layers", flush=True)
            summary = model.merge(erasure, args.out, strength=args.strength)
        except (CheckpointError, ErasureFileError, FamilyError, FamilyMismatchError, ValueError) as err:
            return error(err)
    copied = f", {summary.copied} other files copied" if summary.copied else ""
    print(f"merged {summary.layers} layers at strength {summary.strength:g} into {args.out}: "
          f"{len(summary.written)} weight file(s), {size(summary.nbytes())}{copied}, "
          f"in {time.perf_counter() - started:.1f} s")
    return 0
