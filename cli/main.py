"""The `erasekit` command: a parser with one subcommand per module of cli/commands/, each a thin layer over one
function of the core."""
from __future__ import annotations

import argparse
import sys

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erasekit", description="Concept erasure for text-to-image diffusion models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
