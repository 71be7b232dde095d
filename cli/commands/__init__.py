"""The `erasekit` subcommands, one module each (as diffusers-cli's commands/): `register(subparsers)` adds the
subcommand's parser and sets its `run`, and `run(args) -> int` runs it and returns the exit code (0 done, 2 bad
input; batch also 1, prompts missing, and 130, interrupted).

Imports: a module imports at its top what is light (the standard library, the other cli modules, the core's
torch-free modules) and the core modules its parser takes choices and defaults from; torch, diffusers and the core
modules that only `run` uses are imported in `run`, so that `erasekit --help` does not load them.
"""
from . import (
    apply,
    batch,
    bench,
    convert,
    demo,
    erase,
    eval,
    fixtures,
    inspect,
    selfcheck,
    train_advunlearn,
    train_geom,
    train_spm,
)

# In the order `erasekit --help` lists them.
COMMANDS = (selfcheck, inspect, erase, apply, convert, demo, eval, train_spm, train_advunlearn, train_geom, batch,
            fixtures, bench)
