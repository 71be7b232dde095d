"""`erasekit train-advunlearn`: an AdvUnlearn text encoder (adversarial unlearning) on the shapes world or a
diffusers SD1.x/SD2.x folder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ...erasers.advunlearn.train import SHAPES_DEFAULTS, AdvUnlearnConfig, train_advunlearn
from ...erasers.io.prompt_lists import read_prompt_file
from ...erasers.training.resumable import resume_path
from ..common import add_run_arguments, error, number, refuse_outputs, training_progress
from ..pipelines import load_pipeline, model_folder, parse_device

ENCODER_FILES = ("config.json", "pytorch_model.bin", "model.safetensors")  # what save_encoder writes into --out


def register(subparsers) -> None:
    world = SHAPES_DEFAULTS
    train = subparsers.add_parser(
        "train-advunlearn", help="train an AdvUnlearn text encoder that erases a concept (adversarial unlearning)",
        description="Train a robust replacement text encoder (AdvUnlearn's bilevel objective: a soft-prompt attacker, "
                    "the ESD erase loss on its prompt, a utility loss on retain prompts) on the shipped shapes world "
                    "(default) or a diffusers SD1.x/SD2.x folder, written as a folder in the released layout plus "
                    "model.safetensors. An interrupted run resumes from DIR.resume.pt.")
    train.add_argument("--concept", required=True, metavar="TEXT", help="the concept to erase")
    train.add_argument("--out", required=True, metavar="DIR", help="the encoder folder to write")
    train.add_argument("--retain", default=None, metavar="FILE",
                       help="retain prompts (text or CSV with 'prompt'); needed on SD, default on the shapes world: "
                            "its captions of images without the concept")
    train.add_argument("--context", action="append", default=[], metavar="TEMPLATE",
                       help="a prompt with '{}' where the concept goes (repeatable; default: the bare concept on SD, "
                            "every prompt naming it on the shapes world)")
    train.add_argument("--iterations", type=number(0, 10**7, integer=True), default=None,
                       help=f"0 to 10^7; default: 1000 (SD), {world['iterations']} (shapes world)")
    train.add_argument("--warmup", type=number(0, 10**7, integer=True), default=None,
                       help=f"iterations without the attacker, 0 to 10^7; default: 200 (SD), {world['warmup']} "
                            "(shapes world)")
    train.add_argument("--lr", type=number(0, 1, low_inclusive=False), default=None,
                       help=f"in (0, 1]; default: 1e-5 (SD), {world['lr']:g} (shapes world)")
    train.add_argument("--attack-steps", type=number(0, 1000, integer=True), default=None,
                       help=f"0 to 1000; default: 30 (SD), {world['attack_steps']} (shapes world)")
    train.add_argument("--retain-weight", type=number(0, 1000), default=None,
                       help=f"γ of the utility loss, 0 to 1000; default: 1 (SD), {world['retain_weight']:g} "
                            "(shapes world)")
    train.add_argument("--ddim-steps", type=number(1, 1000, integer=True), default=None,
                       help=f"1 to 1000; default: 50 (SD), {world['ddim_steps']} (shapes world)")
    add_run_arguments(train)
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...erasers.training.objectives import prompt_settings

    started = time.perf_counter()
    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: a file is in the way; the encoder is written as a folder")
        written = [out, *(out / name for name in ENCODER_FILES), resume_path(out)]
        refuse_outputs(written, [model_folder(args.model), args.retain])
        device = parse_device(args.device)
        pipe, kind = load_pipeline(args.model, device, user="AdvUnlearn training")
        overrides = {name: value for name, value in (
            ("iterations", args.iterations), ("warmup", args.warmup), ("lr", args.lr), ("seed", args.seed),
            ("attack_steps", args.attack_steps), ("retain_weight", args.retain_weight),
            ("ddim_steps", args.ddim_steps)) if value is not None}
        config = AdvUnlearnConfig.shapes(**overrides) if kind == "shapes" else AdvUnlearnConfig(**overrides)
        config.validate()
        contexts, retain = args.context, [item.prompt for item in read_prompt_file(args.retain)] if args.retain else []
        if kind == "shapes":
            from ...shapes.methods import spm_contexts, world_captions

            contexts = contexts or spm_contexts(args.concept)
            retain = retain or world_captions(without=args.concept)
        elif not retain:
            raise ValueError("--retain FILE is needed on SD models: the prompts whose images must not change (a text "
                             "file, one per line, or a CSV with a 'prompt' column; the official set is 243 'a photo "
                             "of {object}' COCO objects)")
        prompt_settings(args.concept, args.concept, "", contexts)  # validates templates
    except (NotImplementedError, OSError, ValueError) as err:
        return error(err)
    print(f"model: {args.model or 'shapes world (shipped)'} ({kind}, {device}); concept {args.concept!r}, "
          f"{len(contexts)} contexts, {len(retain)} retain prompts", flush=True)
    print(f"{config.iterations} iterations ({config.warmup} warm-up), lr {config.lr:g}, attack {config.attack_steps} "
          f"steps at {config.attack_lr:g}, {config.ddim_steps} DDIM steps, seed {config.seed}", flush=True)
    try:
        train_advunlearn(pipe, args.concept, retain, config, contexts, training_progress(config.iterations), out,
                         resume=not args.fresh)
    except (NotImplementedError, ValueError) as err:
        return error(err)
    print(f"wrote {out}/ (config.json, pytorch_model.bin, model.safetensors) in {time.perf_counter() - started:.1f} s")
    return 0
