"""`erasekit eval`: the shapes-world table, every method on several concepts (eval.md + eval.json), optionally
with each erasure attacked by UnlearnDiffAtk."""
from __future__ import annotations

import argparse
from pathlib import Path

from ...erasers.attack.unlearn_diff import STEPS as ATTACK_STEPS
from ...shapes.demo import DEFAULT_EVAL_CONCEPTS, PROTOCOLS, OutputDirError, run_eval
from ...shapes.methods import METHODS, NEGATIVE, UnknownMethodError
from ..common import error, number


def register(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval", help="the shapes-world table: every method on several concepts (markdown + JSON)")
    ev.add_argument("--out", required=True, help="output folder for eval.md and eval.json")
    ev.add_argument("--methods", nargs="+", metavar="METHOD",
                    help=f"default: all of {', '.join(METHODS)} ({NEGATIVE}: the concept's name as negative prompt, "
                         "the papers' baseline)")
    ev.add_argument("--concepts", nargs="+", metavar="CONCEPT",
                    help=f"default: {' '.join(DEFAULT_EVAL_CONCEPTS)}")
    ev.add_argument("-n", type=number(1, 10_000, integer=True), default=50,
                    help="images per metric cell, 1 to 10000 (default 50)")
    ev.add_argument("--attack", nargs="?", const="quick", choices=PROTOCOLS, default=None,
                    help="also attack each erasure with UnlearnDiffAtk (adversarial prompt prefix) on its efficacy "
                         "prompts and report the attack success rate (ASR) next to efficacy. 'quick' (the default): "
                         "one attacked prompt per prompt; 'official': UnlearnDiffAtk's own protocol, a check after "
                         "each of 50 timesteps until the first success (up to 50x the time)")
    ev.add_argument("--attack-steps", type=number(0, 10_000, integer=True), default=None, metavar="N",
                    help=f"0 to 10000 Adam steps of the attack per prompt, per timestep with 'official' (default "
                         f"{ATTACK_STEPS}, as UnlearnDiffAtk); implies --attack")
    ev.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        # --attack-steps alone also asks for the attack: a step count without the attack would be silently unused.
        steps = args.attack_steps if args.attack_steps is not None else ATTACK_STEPS if args.attack else None
        run_eval(Path(args.out), args.methods, args.concepts, args.n, attack_steps=steps,
                 attack_protocol=args.attack or "quick")
    except (OutputDirError, UnknownMethodError, ValueError) as err:
        return error(err)
    return 0
