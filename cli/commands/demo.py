"""`erasekit demo`: erase a concept from the shipped shapes-world model with every method; grid.png + metrics.json."""
from __future__ import annotations

import argparse
from pathlib import Path

from ...shapes.methods import METHODS, NEGATIVE, UnknownMethodError
from ..common import error, number


def register(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="erase a concept from the shipped shapes-world model with every method; "
                                              "writes grid.png and metrics.json")
    demo.add_argument("--out", default="erasekit-demo", help="output folder (default: ./erasekit-demo)")
    demo.add_argument("--concept", default="circle", help="a shape, colour, pattern or 'stamp' (default: circle)")
    demo.add_argument("--methods", nargs="+", metavar="METHOD",
                      help=f"of {', '.join(METHODS)} (default: all but {NEGATIVE}, the plain-word baseline)")
    demo.add_argument("-n", type=number(1, 10_000, integer=True), default=18,
                      help="images per metric cell, 1 to 10000 (default 18: one pass over a shape's prompts; eval "
                           "uses 50)")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...shapes.demo import OutputDirError, run_demo

    try:
        run_demo(Path(args.out), args.concept, args.methods, args.n)
    except (OutputDirError, UnknownMethodError, ValueError) as err:
        return error(err)
    return 0
