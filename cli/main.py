"""The `erasekit` command: a parser with one subcommand per module of cli/commands/, each a thin layer over one
function of the core."""
from __future__ import annotations

import argparse
import sys

from ..erasers.errors import InputError
from .commands import COMMANDS
from .common import Parser, error


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="erasekit", description="Concept erasure for text-to-image diffusion models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input (an InputError, an OSError such as a full disk or a read-only folder) is one
    `error: ...` line and exit code 2. Any other exception is a bug in EraseKit and keeps its traceback."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (InputError, OSError) as err:
        return error(_describe(err))


def _describe(err: Exception) -> str:
    if isinstance(err, OSError) and not isinstance(err, InputError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
