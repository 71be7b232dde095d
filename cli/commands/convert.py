"""`erasekit convert`: an official UCE / UCE-2023 / RECE / TRCE release as an EraseKit erasure against its base."""
from __future__ import annotations

import argparse
from pathlib import Path

from ...erasers.closed_form import official
from ...erasers.families import FamilyError
from ..common import PrintedWarnings, error, number, refuse_outputs, size


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert", help="convert an official UCE / RECE / TRCE release into an EraseKit erasure",
        description="Formats: " + "; ".join(official.FORMATS.values())
                    + ". The erasure is the difference against --base.")
    convert.add_argument("source", help="the official file or folder")
    convert.add_argument("--base", required=True, help="the model it was made from (single file or diffusers "
                         "folder; the official releases are made from SD1.4)")
    convert.add_argument("--out", required=True, help="the EraseKit erasure to write (.safetensors)")
    convert.add_argument("--tol", type=number(0, 1, low_inclusive=False), default=official.DEFAULT_TOL,
                         help=f"relative reconstruction error per layer, in (0, 1] (default {official.DEFAULT_TOL:g})")
    convert.add_argument("--method", help="method name to record (default: from the format)")
    convert.add_argument("--concept", action="append", help="erased concept to record (repeatable)")
    convert.add_argument("--no-strict", dest="strict", action="store_false",
                         help="keep differences outside the method's layers as dense deltas instead of refusing")
    convert.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...erasers.io.checkpoints import CheckpointError
    from ...erasers.io.model_files import open_model

    with PrintedWarnings():
        try:
            refuse_outputs([args.out], [args.source, args.base])
            base = open_model(args.base)
            print(f"base: {args.base} ({base.kind}, {base.family.label})", flush=True)
            erasure, report = official.convert(args.source, base.attention_weights(), tol=args.tol,
                                               method=args.method, concepts=args.concept, strict=args.strict)
        except (CheckpointError, FamilyError, ValueError) as err:
            return error(err)
    print(report.text())
    erasure.save(args.out)  # main turns a FileError (a read-only or full --out) into one error line
    print(f"wrote {args.out} ({size(Path(args.out).stat().st_size)})")
    return 0
