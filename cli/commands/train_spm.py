"""`erasekit train-spm`: an SPM membrane (the official erase_with_la objective) on the shapes world or a diffusers
SD1.x/SD2.x folder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ...erasers.spm.train import SHAPES_DEFAULTS, SPMTrainConfig, train_spm
from ...erasers.training.resumable import resume_path
from ..common import add_run_arguments, error, number, refuse_outputs, size, training_progress
from ..pipelines import load_pipeline, model_folder, parse_device


def register(subparsers) -> None:
    world = SHAPES_DEFAULTS
    train = subparsers.add_parser(
        "train-spm", help="train an SPM membrane that erases a concept (official erase_with_la objective)",
        description="Train a rank-1 SPM membrane (official layout; LoRA loaders and the SPM nodes read it) on the "
                    "shipped shapes world (default) or a diffusers SD1.x/SD2.x folder. Defaults: the official SD1.4 "
                    "settings for SD folders, shorter CPU-sized ones for the shapes world. An interrupted run "
                    "resumes from FILE.safetensors.resume.pt.")
    train.add_argument("--target", required=True, metavar="TEXT", help="the concept to erase")
    train.add_argument("--positive", default=None, metavar="TEXT", help="the concept's prompt (default: --target)")
    train.add_argument("--neutral", default="", metavar="TEXT",
                       help="what the target is pushed towards (default: the empty prompt)")
    train.add_argument("--context", action="append", default=[], metavar="TEMPLATE",
                       help="a prompt with '{}' where the concept goes (repeatable; each iteration draws one, and "
                            "target, positive and neutral are all placed in it). Default: none (the bare prompts, "
                            "as the official configs) on SD; on the shapes world, every prompt naming the concept")
    train.add_argument("--out", required=True, metavar="FILE", help="the membrane to write (.safetensors)")
    train.add_argument("--iterations", type=number(0, 10**7, integer=True), default=None,
                       help=f"0 to 10^7; default: 3000 (SD), {world['iterations']} (shapes world)")
    train.add_argument("--lr", type=number(0, 1, low_inclusive=False), default=None,
                       help=f"in (0, 1]; default: 1e-4 (SD), {world['lr']:g} (shapes world)")
    train.add_argument("--la-strength", type=number(0, 10**6), default=None,
                       help="β of latent anchoring, 0 to 10^6 (default 1000; 0 turns anchoring off)")
    train.add_argument("--ddim-steps", type=number(1, 1000, integer=True), default=None,
                       help=f"1 to 1000; default: 30 (SD), {world['ddim_steps']} (shapes world)")
    add_run_arguments(train)
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...erasers.training.objectives import prompt_settings

    started = time.perf_counter()
    try:
        out = Path(args.out)
        if out.suffix.lower() != ".safetensors":
            raise ValueError(f"--out {out.name}: membranes are written as .safetensors")
        refuse_outputs([out, resume_path(out)], [model_folder(args.model)])
        device = parse_device(args.device)
        pipe, kind = load_pipeline(args.model, device, user="SPM training")
        overrides = {name: value for name, value in (("iterations", args.iterations), ("lr", args.lr),
                     ("la_strength", args.la_strength), ("seed", args.seed), ("ddim_steps", args.ddim_steps))
                     if value is not None}
        config = SPMTrainConfig.shapes(**overrides) if kind == "shapes" else SPMTrainConfig(**overrides)
        config.validate()
        contexts = args.context
        if not contexts and kind == "shapes":
            from ...shapes.methods import spm_contexts

            contexts = spm_contexts(args.target)
        prompt_settings(args.target, args.positive or args.target, args.neutral, contexts)  # validates templates
    except (NotImplementedError, OSError, ValueError) as err:
        return error(err)
    print(f"model: {args.model or 'shapes world (shipped)'} ({kind}, {device}); target {args.target!r}, positive "
          f"{args.positive if args.positive is not None else args.target!r}, neutral {args.neutral!r}", flush=True)
    if contexts:
        print(f"{len(contexts)} contexts: {', '.join(repr(c) for c in contexts[:3])}"
              f"{', ...' if len(contexts) > 3 else ''}", flush=True)
    print(f"{config.iterations} iterations, lr {config.lr:g}, la_strength {config.la_strength:g}, "
          f"{config.ddim_steps} DDIM steps, rank {config.rank}, seed {config.seed}", flush=True)
    progress = training_progress(config.iterations)
    try:
        membrane = train_spm(pipe, args.target, args.positive, args.neutral, config, progress=progress, out=out,
                             resume=not args.fresh, contexts=contexts)
    except (NotImplementedError, ValueError) as err:
        return error(err)
    print(f"SPM membrane erasing {args.target!r}: {len(membrane.layers)} layers, rank {membrane.rank}")
    print(f"wrote {out} ({size(out.stat().st_size)}) in {time.perf_counter() - started:.1f} s")
    return 0
