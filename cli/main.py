"""The `erasekit` command. Each subcommand is a thin layer over one function of the core."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .pipelines import load_pipeline, parse_device


def _selfcheck(args: argparse.Namespace) -> int:
    """Start a real ComfyUI with this pack in custom_nodes/ and list the nodes it registered."""
    from .. import NODE_CLASS_MAPPINGS
    from .comfy_server import ComfyError, ComfyServer, locate_comfyui

    source = locate_comfyui()
    print(f"starting ComfyUI from {source} (CPU) ...", flush=True)
    try:
        with ComfyServer(source=source) as client:
            info = client.object_info()
    except ComfyError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    print(f"ComfyUI registered {len(NODE_CLASS_MAPPINGS) - len(missing)} EraseKit node(s):")
    for name in sorted(NODE_CLASS_MAPPINGS):
        if name in info:
            entry = info[name]
            print(f"  {name:32s} {entry.get('display_name', '')}  [{entry.get('category', '')}]")
    if missing:
        print(f"FAILED: not registered: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Report a checkpoint's family, cross-attention layers and text encoders."""
    from ..erasers.families import describe_model
    from ..erasers.io.checkpoints import CheckpointError, read_checkpoint_shapes

    try:
        shapes = read_checkpoint_shapes(Path(args.checkpoint))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    unet = {k: v for k, v in shapes.items() if "diffusion_model." in k or k.startswith(("down_blocks", "mid_block", "up_blocks"))}
    print(describe_model(unet, shapes).text())
    return 0


# ---------------------------------------------------------------------------------------------------------------
# erase / apply


def _error(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""  # pragma: no cover


class _Warnings:
    """While a command runs, print EraseKit's warnings (a cut concept, another fine-tune) as `warning: ...` lines on
    stderr as they occur, each once; other warnings are shown as usual."""

    def __enter__(self):
        from ..erasers.erasure import BaseMismatchWarning
        from ..erasers.text import TruncationWarning

        self._ours = (TruncationWarning, BaseMismatchWarning)
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        for category in self._ours:
            warnings.simplefilter("always", category)
        self._show, self._seen = warnings.showwarning, set()
        warnings.showwarning = self._print
        return self

    def _print(self, message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, self._ours):
            return self._show(message, category, filename, lineno, file, line)
        if str(message) not in self._seen:
            self._seen.add(str(message))
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)  # restores the filters and showwarning
        return False


def _erase_options(args: argparse.Namespace):
    from ..erasers.closed_form.recipes import EraseOptions

    opts = EraseOptions(
        method=args.method,
        concepts=list(args.concept),
        guide=list(args.guide or []),
        preserve=[p for p in (args.preserve or []) if p.strip()],
        lam=args.lam,
        erase_scale=args.erase_scale,
        preserve_scale=args.preserve_scale,
        technique=args.technique,
        tokens=args.tokens,
        expand=args.expand,
        preset=args.preset,
        epochs=args.epochs,
        reg=args.reg,
    )
    opts.validate()
    if not opts.erase_scale > 0:
        raise ValueError(f"--erase-scale must be > 0, got {opts.erase_scale}")
    if opts.epochs is not None and opts.epochs < 0:
        raise ValueError(f"--epochs must be >= 0, got {opts.epochs}")
    if opts.reg is not None and not opts.reg > 0:
        raise ValueError(f"--reg (RECE's λ_r) must be > 0, got {opts.reg}")
    return opts


def _erase(args: argparse.Namespace) -> int:
    """Compute a closed-form erasure (UCE, RECE, TRCE stage 1) on a checkpoint with its own text encoder."""
    import time

    from ..erasers.erasure import FamilyMismatchError
    from ..erasers.families import FamilyError
    from ..erasers.io.checkpoints import CheckpointError
    from ..erasers.io.text_encoders import TextEncoderError

    started = time.perf_counter()
    try:
        opts = _erase_options(args)
        out = Path(args.out)
        if out.suffix.lower() != ".safetensors":
            raise ValueError(f"--out {out.name}: erasures are written as .safetensors")
        if out.exists() and Path(args.checkpoint).exists() and out.resolve() == Path(args.checkpoint).resolve():
            raise ValueError(f"--out {out} is the input checkpoint")
        device = parse_device(args.device)
        if opts.method == "trce":
            from ..erasers.closed_form.captions import coco_captions

            captions = coco_captions(args.trce_prior_captions)
    except ValueError as err:
        return _error(err)

    from ..erasers.closed_form import recipes
    from ..erasers.io.model_files import open_model

    with _Warnings():
        try:
            model = open_model(args.checkpoint)
            family = model.family
            print(f"model: {args.checkpoint} ({model.kind}, {family.label})", flush=True)
            kv = {name: w.float() for name, w in model.kv_weights().items()}
            encoder = model.encoder(tokenizer_dir=args.tokenizer, device=device)
            prior = None
            if opts.method == "trce":
                print(f"TRCE prior: encoding {len(captions)} COCO captions ...", flush=True)
                prior = recipes.caption_prior(encoder, captions)

            def progress(done: int, total: int) -> None:
                print(f"RECE epoch {done}/{total}", flush=True)

            erasure = recipes.erase(kv, encoder, family.name, opts, progress=progress, prior=prior)
            del encoder
            path = erasure.save(out)
        except (CheckpointError, FamilyError, FamilyMismatchError, TextEncoderError, ValueError) as err:
            return _error(err)
    rank = max((delta.rank for delta in erasure.layers.values()), default=0)
    print(f"{opts.method} erasure of {', '.join(map(repr, erasure.concepts))} for {family.label} ({family.name}): "
          f"{len(erasure.layers)} layers edited, rank {rank}")
    print(f"wrote {path} ({_size(path.stat().st_size)}) in {time.perf_counter() - started:.1f} s")
    return 0


def _apply(args: argparse.Namespace) -> int:
    """Merge an erasure into a copy of a checkpoint (single file or diffusers folder)."""
    import time

    from ..erasers.erasure import Erasure, ErasureFileError, FamilyMismatchError
    from ..erasers.families import FamilyError
    from ..erasers.io.checkpoints import CheckpointError
    from ..erasers.io.model_files import open_model

    started = time.perf_counter()
    with _Warnings():
        try:
            erasure = Erasure.load(args.erasure)
            model = open_model(args.checkpoint)
            print(f"model: {args.checkpoint} ({model.kind}, {model.family.label})", flush=True)
            print(f"erasure: {erasure.method} of {', '.join(map(repr, erasure.concepts))} for {erasure.family}, "
                  f"{len(erasure.layers)} layers", flush=True)
            summary = model.merge(erasure, args.out, strength=args.strength)
        except (CheckpointError, ErasureFileError, FamilyError, FamilyMismatchError, ValueError) as err:
            return _error(err)
    copied = f", {summary.copied} other files copied" if summary.copied else ""
    print(f"merged {summary.layers} layers at strength {summary.strength:g} into {args.out}: "
          f"{len(summary.written)} weight file(s), {_size(summary.nbytes())}{copied}, "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Turn an official UCE / UCE-2023 / RECE / TRCE release into an EraseKit erasure against a base model."""
    from ..erasers.closed_form.official import convert
    from ..erasers.families import FamilyError
    from ..erasers.io.checkpoints import CheckpointError
    from ..erasers.io.model_files import open_model

    with _Warnings():
        try:
            base = open_model(args.base)
            print(f"base: {args.base} ({base.kind}, {base.family.label})", flush=True)
            erasure, report = convert(args.source, base.attention_weights(), tol=args.tol, method=args.method,
                                      concepts=args.concept, strict=args.strict)
        except (CheckpointError, FamilyError, ValueError) as err:
            return _error(err)
    print(report.text())
    erasure.save(args.out)
    print(f"wrote {args.out} ({_size(Path(args.out).stat().st_size)})")
    return 0


def _add_convert_parser(sub) -> None:
    from ..erasers.closed_form.official import DEFAULT_TOL, FORMATS

    convert = sub.add_parser(
        "convert", help="convert an official UCE / RECE / TRCE release into an EraseKit erasure",
        description="Formats: " + "; ".join(FORMATS.values()) + ". The erasure is the difference against --base.")
    convert.add_argument("source", help="the official file or folder")
    convert.add_argument("--base", required=True, help="the model it was made from (single file or diffusers "
                         "folder; the official releases are made from SD1.4)")
    convert.add_argument("--out", required=True, help="the EraseKit erasure to write (.safetensors)")
    convert.add_argument("--tol", type=float, default=DEFAULT_TOL, help="relative reconstruction error per layer")
    convert.add_argument("--method", help="method name to record (default: from the format)")
    convert.add_argument("--concept", action="append", help="erased concept to record (repeatable)")
    convert.add_argument("--no-strict", dest="strict", action="store_false",
                         help="keep differences outside the method's layers as dense deltas instead of refusing")
    convert.set_defaults(run=_convert)


def _add_erase_parser(sub) -> None:
    from ..erasers.closed_form.recipes import METHODS, RECE_PRESETS, TEMPLATES

    erase = sub.add_parser(
        "erase", help="compute a closed-form erasure (UCE, RECE, TRCE) on a checkpoint and save it",
        description="Erase concepts in closed form with the checkpoint's own text encoder(s) and write the erasure "
                    "(.safetensors) that `erasekit apply`, ComfyUI's Load Erasure node and the diffusers adapter read.",
    )
    erase.add_argument("--method", required=True, choices=METHODS)
    erase.add_argument("--concept", action="append", required=True, metavar="TEXT",
                       help="a concept to erase (repeat for several)")
    erase.add_argument("--guide", action="append", metavar="TEXT",
                       help="what erased concepts become: one for all or one per concept (default: the empty prompt, "
                            "or the RECE preset's)")
    erase.add_argument("--preserve", action="append", metavar="TEXT", help="a concept to keep unchanged (repeat)")
    erase.add_argument("--checkpoint", required=True, metavar="PATH",
                       help="an SD1.x/SD2.x/SDXL single-file checkpoint (.safetensors, .ckpt) or diffusers folder")
    erase.add_argument("--out", required=True, metavar="FILE", help="the erasure to write (.safetensors)")
    erase.add_argument("--lam", type=float, default=0.5, help="λ, the pull towards the original weights (> 0)")
    erase.add_argument("--erase-scale", type=float, default=1.0)
    erase.add_argument("--preserve-scale", type=float, default=None, help="default: the method's")
    erase.add_argument("--technique", choices=("replace", "tensor"), default="replace")
    erase.add_argument("--tokens", choices=("last", "suffix"), default="last",
                       help="UCE's token selection: the last word token (2025) or the suffix from it (2023)")
    erase.add_argument("--expand", choices=tuple(TEMPLATES), default=None,
                       help="add UCE's five prompt templates per concept")
    erase.add_argument("--preset", choices=tuple(RECE_PRESETS), default=None, help="RECE's per-kind defaults")
    erase.add_argument("--epochs", type=int, default=None, help="RECE epochs (default: the preset's, else 1)")
    erase.add_argument("--reg", type=float, default=None, help="RECE's λ_r (default: the preset's, else 0.1)")
    erase.add_argument("--trce-prior-captions", type=int, default=500, metavar="N",
                       help="COCO captions for TRCE's prior-preservation term (1-2000)")
    erase.add_argument("--device", default="cpu", help="where the text encoder runs (cpu, cuda, cuda:1, mps)")
    erase.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="a folder with CLIP's vocab.json and merges.txt (default: the diffusers folder's own, "
                            "else converted from open_clip's packaged vocabulary)")
    erase.set_defaults(run=_erase)


def _add_apply_parser(sub) -> None:
    apply = sub.add_parser(
        "apply", help="merge an erasure into a copy of a checkpoint",
        description="Write a full checkpoint in the input's layout (single file or diffusers folder) and dtypes with "
                    "the erasure merged (W + strength·ΔW); every other tensor and the metadata are kept as they are.",
    )
    apply.add_argument("--erasure", required=True, metavar="FILE")
    apply.add_argument("--checkpoint", required=True, metavar="PATH",
                       help="a single-file checkpoint (.safetensors, .ckpt) or a diffusers pipeline folder")
    apply.add_argument("--out", required=True, metavar="MERGED",
                       help="the merged .safetensors file, or a new folder for a diffusers input")
    apply.add_argument("--strength", type=float, default=1.0)
    apply.set_defaults(run=_apply)


# ---------------------------------------------------------------------------------------------------------------
# shapes world: demo / eval


def _demo(args: argparse.Namespace) -> int:
    """Erase a concept from the shipped shapes-world model with every method; grid.png + metrics.json."""
    from ..shapes.demo import OutputDirError, run_demo
    from ..shapes.methods import UnknownMethodError

    try:
        run_demo(Path(args.out), args.concept, args.methods, args.n)
    except (OutputDirError, UnknownMethodError, ValueError) as err:
        return _error(err)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..erasers.attack.unlearn_diff import STEPS as ATTACK_STEPS
    from ..shapes.demo import OutputDirError, run_eval
    from ..shapes.methods import UnknownMethodError

    try:
        # --attack-steps alone also asks for the attack: a step count without the attack would be silently unused.
        steps = args.attack_steps if args.attack_steps is not None else ATTACK_STEPS if args.attack else None
        run_eval(Path(args.out), args.methods, args.concepts, args.n, attack_steps=steps,
                 attack_protocol=args.attack or "quick")
    except (OutputDirError, UnknownMethodError, ValueError) as err:
        return _error(err)
    return 0


def _add_world_parsers(sub) -> None:
    from ..erasers.attack.unlearn_diff import STEPS as ATTACK_STEPS
    from ..shapes.demo import DEFAULT_EVAL_CONCEPTS, PROTOCOLS
    from ..shapes.methods import METHODS, NEGATIVE

    demo = sub.add_parser("demo", help="erase a concept from the shipped shapes-world model with every method; "
                                       "writes grid.png and metrics.json")
    demo.add_argument("--out", default="erasekit-demo", help="output folder (default: ./erasekit-demo)")
    demo.add_argument("--concept", default="circle", help="a shape, colour, pattern or 'stamp' (default: circle)")
    demo.add_argument("--methods", nargs="+", metavar="METHOD",
                      help=f"of {', '.join(METHODS)} (default: all but {NEGATIVE}, the plain-word baseline)")
    demo.add_argument("-n", type=int, default=18,
                      help="images per metric cell (default 18: one pass over a shape's prompts; eval uses 50)")
    demo.set_defaults(run=_demo)

    ev = sub.add_parser("eval", help="the shapes-world table: every method on several concepts (markdown + JSON)")
    ev.add_argument("--out", required=True, help="output folder for eval.md and eval.json")
    ev.add_argument("--methods", nargs="+", metavar="METHOD",
                    help=f"default: all of {', '.join(METHODS)} ({NEGATIVE}: the concept's name as negative prompt, "
                         "the papers' baseline)")
    ev.add_argument("--concepts", nargs="+", metavar="CONCEPT",
                    help=f"default: {' '.join(DEFAULT_EVAL_CONCEPTS)}")
    ev.add_argument("-n", type=int, default=50, help="images per metric cell (default 50)")
    ev.add_argument("--attack", nargs="?", const="quick", choices=PROTOCOLS, default=None,
                    help="also attack each erasure with UnlearnDiffAtk (adversarial prompt prefix) on its efficacy "
                         "prompts and report the attack success rate (ASR) next to efficacy. 'quick' (the default): "
                         "one attacked prompt per prompt; 'official': UnlearnDiffAtk's own protocol, a check after "
                         "each of 50 timesteps until the first success (up to 50x the time)")
    ev.add_argument("--attack-steps", type=int, default=None, metavar="N",
                    help=f"Adam steps of the attack per prompt, per timestep with 'official' (default "
                         f"{ATTACK_STEPS}, as UnlearnDiffAtk); implies --attack")
    ev.set_defaults(run=_eval)


# ---------------------------------------------------------------------------------------------------------------
# train-spm


def _training_progress(iterations: int):
    """progress(step, total, losses) for the trainers: about 20 lines a run, with the rate since this start."""
    import time

    every = max(1, iterations // 20)
    clock = {"start": time.perf_counter(), "first": None}

    def progress(step: int, total: int, losses) -> None:
        if clock["first"] is None:
            clock["first"] = step - 1  # a resumed run starts past 0
        if step % every and step != total:
            return
        rate = (step - clock["first"]) / max(time.perf_counter() - clock["start"], 1e-9)
        terms = "  ".join(f"{name} {value:.3e}" for name, value in losses.items())
        print(f"step {step}/{total}  {terms}  ({rate:.2f} it/s)", flush=True)

    return progress


def _train_spm(args: argparse.Namespace) -> int:
    """Train an SPM membrane (erase_with_la) on the shapes world or a diffusers SD1.x/SD2.x folder."""
    import time

    from ..erasers.spm.train import SPMTrainConfig, train_spm
    from ..erasers.training.objectives import prompt_settings

    started = time.perf_counter()
    try:
        out = Path(args.out)
        if out.suffix.lower() != ".safetensors":
            raise ValueError(f"--out {out.name}: membranes are written as .safetensors")
        device = parse_device(args.device)
        pipe, kind = load_pipeline(args.model, device)
        overrides = {name: value for name, value in (("iterations", args.iterations), ("lr", args.lr),
                     ("la_strength", args.la_strength), ("seed", args.seed), ("ddim_steps", args.ddim_steps))
                     if value is not None}
        config = SPMTrainConfig.shapes(**overrides) if kind == "shapes" else SPMTrainConfig(**overrides)
        config.validate()
        contexts = args.context
        if not contexts and kind == "shapes":
            from ..shapes.methods import spm_contexts

            contexts = spm_contexts(args.target)
        prompt_settings(args.target, args.positive or args.target, args.neutral, contexts)  # validates templates
    except (NotImplementedError, OSError, ValueError) as err:
        return _error(err)
    print(f"model: {args.model or 'shapes world (shipped)'} ({kind}, {device}); target {args.target!r}, positive "
          f"{args.positive if args.positive is not None else args.target!r}, neutral {args.neutral!r}", flush=True)
    if contexts:
        print(f"{len(contexts)} contexts: {', '.join(repr(c) for c in contexts[:3])}"
              f"{', ...' if len(contexts) > 3 else ''}", flush=True)
    print(f"{config.iterations} iterations, lr {config.lr:g}, la_strength {config.la_strength:g}, "
          f"{config.ddim_steps} DDIM steps, rank {config.rank}, seed {config.seed}", flush=True)
    progress = _training_progress(config.iterations)
    try:
        membrane = train_spm(pipe, args.target, args.positive, args.neutral, config, progress=progress, out=out,
                             resume=not args.fresh, contexts=contexts)
    except (NotImplementedError, ValueError) as err:
        return _error(err)
    print(f"SPM membrane erasing {args.target!r}: {len(membrane.layers)} layers, rank {membrane.rank}")
    print(f"wrote {out} ({_size(out.stat().st_size)}) in {time.perf_counter() - started:.1f} s")
    return 0


def _add_run_arguments(train) -> None:
    """What every trainer on a pipeline takes: the model, seed, device and --fresh."""
    train.add_argument("--model", default=None, metavar="DIR",
                       help="a shapes-world folder or a diffusers SD1.x/SD2.x folder (default: the shipped shapes "
                            "world)")
    train.add_argument("--seed", type=int, default=None, help="default 0")
    train.add_argument("--device", default="cpu", help="where to train (cpu, cuda, cuda:1, mps)")
    train.add_argument("--fresh", action="store_true", help="ignore a resume checkpoint from an earlier run")


def _add_train_spm_parser(sub) -> None:
    from ..erasers.spm.train import SHAPES_DEFAULTS as world

    train = sub.add_parser(
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
    train.add_argument("--iterations", type=int, default=None,
                       help=f"default: 3000 (SD), {world['iterations']} (shapes world)")
    train.add_argument("--lr", type=float, default=None, help=f"default: 1e-4 (SD), {world['lr']:g} (shapes world)")
    train.add_argument("--la-strength", type=float, default=None,
                       help="β of latent anchoring (default 1000; 0 turns anchoring off)")
    train.add_argument("--ddim-steps", type=int, default=None,
                       help=f"default: 30 (SD), {world['ddim_steps']} (shapes world)")
    _add_run_arguments(train)
    train.set_defaults(run=_train_spm)


# ---------------------------------------------------------------------------------------------------------------
# train-advunlearn


def _train_advunlearn(args: argparse.Namespace) -> int:
    """Train an AdvUnlearn text encoder on the shapes world or a diffusers SD1.x/SD2.x folder."""
    import time

    from ..erasers.advunlearn.train import AdvUnlearnConfig, train_advunlearn
    from ..erasers.io.prompt_lists import read_prompt_file
    from ..erasers.training.objectives import prompt_settings

    started = time.perf_counter()
    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: a file is in the way; the encoder is written as a folder")
        device = parse_device(args.device)
        pipe, kind = load_pipeline(args.model, device)
        overrides = {name: value for name, value in (
            ("iterations", args.iterations), ("warmup", args.warmup), ("lr", args.lr), ("seed", args.seed),
            ("attack_steps", args.attack_steps), ("retain_weight", args.retain_weight),
            ("ddim_steps", args.ddim_steps)) if value is not None}
        config = AdvUnlearnConfig.shapes(**overrides) if kind == "shapes" else AdvUnlearnConfig(**overrides)
        config.validate()
        contexts, retain = args.context, [item.prompt for item in read_prompt_file(args.retain)] if args.retain else []
        if kind == "shapes":
            from ..shapes.methods import spm_contexts, world_captions

            contexts = contexts or spm_contexts(args.concept)
            retain = retain or world_captions(without=args.concept)
        elif not retain:
            raise ValueError("--retain FILE is needed on SD models: the prompts whose images must not change (a text "
                             "file, one per line, or a CSV with a 'prompt' column; the official set is 243 'a photo "
                             "of {object}' COCO objects)")
        prompt_settings(args.concept, args.concept, "", contexts)  # validates templates
    except (NotImplementedError, OSError, ValueError) as err:
        return _error(err)
    print(f"model: {args.model or 'shapes world (shipped)'} ({kind}, {device}); concept {args.concept!r}, "
          f"{len(contexts)} contexts, {len(retain)} retain prompts", flush=True)
    print(f"{config.iterations} iterations ({config.warmup} warm-up), lr {config.lr:g}, attack {config.attack_steps} "
          f"steps at {config.attack_lr:g}, {config.ddim_steps} DDIM steps, seed {config.seed}", flush=True)
    try:
        train_advunlearn(pipe, args.concept, retain, config, contexts, _training_progress(config.iterations), out,
                         resume=not args.fresh)
    except (NotImplementedError, ValueError) as err:
        return _error(err)
    print(f"wrote {out}/ (config.json, pytorch_model.bin, model.safetensors) in {time.perf_counter() - started:.1f} s")
    return 0


def _add_train_advunlearn_parser(sub) -> None:
    from ..erasers.advunlearn.train import SHAPES_DEFAULTS as world

    train = sub.add_parser(
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
    train.add_argument("--iterations", type=int, default=None,
                       help=f"default: 1000 (SD), {world['iterations']} (shapes world)")
    train.add_argument("--warmup", type=int, default=None,
                       help=f"iterations without the attacker; default: 200 (SD), {world['warmup']} (shapes world)")
    train.add_argument("--lr", type=float, default=None, help=f"default: 1e-5 (SD), {world['lr']:g} (shapes world)")
    train.add_argument("--attack-steps", type=int, default=None,
                       help=f"default: 30 (SD), {world['attack_steps']} (shapes world)")
    train.add_argument("--retain-weight", type=float, default=None,
                       help=f"γ of the utility loss; default: 1 (SD), {world['retain_weight']:g} (shapes world)")
    train.add_argument("--ddim-steps", type=int, default=None,
                       help=f"default: 50 (SD), {world['ddim_steps']} (shapes world)")
    _add_run_arguments(train)
    train.set_defaults(run=_train_advunlearn)


# ---------------------------------------------------------------------------------------------------------------
# train-geom


def _train_geom(args: argparse.Namespace) -> int:
    try:
        return _run_train_geom(args)
    except (OSError, ValueError) as err:  # GeomError is a ValueError: bad boxes, cells, files
        return _error(err)


def _run_train_geom(args) -> int:
    """`erasekit train-geom`: location tokens (model setting) or tokens + a fine-tuned UNet (data setting) for the
    shapes world's model or another pixel-space one."""
    import time

    import torch

    from ..erasers.geom.train import (
        SHAPES_DATA_SETTING,
        SHAPES_IMAGES,
        GeomTrainConfig,
        read_folder,
        save_data_removal,
        tokens_file,
        train_data_removal,
        train_location_tokens,
    )
    from ..shapes.data import geom_training_set
    from ..shapes.model import ShapesPipeline

    started, cpu = time.perf_counter(), time.process_time()
    setting = args.setting
    defaults = SHAPES_DATA_SETTING if setting == "data" else {}
    given = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "unet_lr", "warmup", "caption_dropout",
                                           "min_snr_gamma", "alpha")}
    # Built (and so checked) before the model and the images are loaded: a bad option is refused at once.
    config = GeomTrainConfig(setting=setting, grid=args.grid, seed=args.seed,
                             **{**defaults, **{k: v for k, v in given.items() if v is not None}})
    pipe = ShapesPipeline.load(args.model) if args.model else ShapesPipeline.load()
    # In the data setting every caption is trained on and its words are dropped per step, so the shapes world's
    # captions come whole; the model setting keeps its earlier data.
    images, captions, boxes = (read_folder(args.data) if args.data else
                               geom_training_set(args.images or SHAPES_IMAGES[setting], args.seed,
                                                  dropout=0.0 if setting == "data" else None))
    every = max(1, config.steps // 20)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == config.steps - 1:
            # CPU seconds beside wall seconds: on a shared machine they tell what the run would take alone.
            print(f"step {step + 1}/{config.steps}  weighted loss {loss:.4f}  ({time.perf_counter() - started:.0f} s, "
                  f"{time.process_time() - cpu:.0f} s CPU)", flush=True)

    if setting == "model":
        tokens = train_location_tokens(pipe, images, captions, boxes, args.concept, config, family="shapes",
                                       progress=progress)
        tokens.save(args.out)
        written = args.out
    else:
        tokens, unet = train_data_removal(pipe, images, captions, boxes, args.concept, config, family="shapes",
                                          progress=progress)
        save_data_removal(args.out, tokens, unet)
        written = f"{Path(args.out) / 'unet'} and {tokens_file(args.out, args.concept)}"
    print(f"wrote {written}: {len(tokens.cells)} location tokens of {args.concept!r} ({tokens.grid}x{tokens.grid}, "
          f"{tokens.width} wide), {setting} setting, in {time.perf_counter() - started:.0f} s "
          f"({time.process_time() - cpu:.0f} s CPU on {torch.get_num_threads()} threads)")
    return 0


def _add_train_geom_parser(sub) -> None:
    from ..erasers.geom.negatives import CONCEPTS
    from ..erasers.geom.train import SETTINGS, SHAPES_DATA_SETTING, SHAPES_IMAGES, GeomTrainConfig

    d, w = GeomTrainConfig(), SHAPES_DATA_SETTING

    def default(name: str) -> str:
        return f"default {getattr(d, name):g} (model setting), {w.get(name, getattr(d, name)):g} (data setting)"

    train = sub.add_parser(
        "train-geom", help="learn Geom-Erasing location tokens of an implicit concept (for negative prompts)",
        description="Learn one token embedding per grid cell for an implicit concept, with the loss re-weighted by "
                    "the detector boxes, on the shapes world's stamp (default) or a captioned image folder with "
                    "boxes. Model setting (default): only the tokens, UNet and text encoder frozen; --out is the "
                    "token file, for ComfyUI's models/embeddings and the 'Geom-Erasing Negative' node. Data setting: "
                    "a copy of the UNet is fine-tuned with the tokens on every image (the concept came with the "
                    "training data); --out is a folder that gets unet/ (diffusers, safetensors) and "
                    "<concept>.safetensors (the tokens).")
    train.add_argument("--out", required=True, metavar="PATH",
                       help="model setting: the location-token file (.safetensors); data setting: a folder")
    train.add_argument("--setting", choices=SETTINGS, default=d.setting,
                       help="model: train only the tokens (default); data: the UNet and the tokens together")
    train.add_argument("--concept", default="stamp", help=f"its name, e.g. {', '.join(CONCEPTS)} (default stamp)")
    train.add_argument("--data", default=None, metavar="DIR",
                       help='images + metadata.jsonl ({"file_name", "text", "boxes"} per line); default: the '
                            "shapes world's training images and stamp boxes")
    train.add_argument("--images", type=int, default=None,
                       help=f"shapes-world images without --data (default {SHAPES_IMAGES['model']} model setting, "
                            f"{SHAPES_IMAGES['data']} data setting)")
    train.add_argument("--model", default=None, metavar="DIR", help="a shapes-world model folder (default: shipped)")
    train.add_argument("--grid", type=int, default=d.grid, help=f"k of the k x k grid (default {d.grid})")
    train.add_argument("--alpha", type=float, default=None,
                       help=f"re-weighting; > 1 down-weights the concept's pixels ({default('alpha')})")
    train.add_argument("--steps", type=int, default=None, help=default("steps"))
    train.add_argument("--batch-size", type=int, default=None, help=default("batch_size"))
    train.add_argument("--lr", type=float, default=None, help=f"of the tokens (default {d.lr:g})")
    train.add_argument("--unet-lr", type=float, default=None, help=f"data setting (default {w['unet_lr']:g})")
    train.add_argument("--warmup", type=int, default=None, help="data setting: steps of linear learning-rate "
                       f"warm-up (default {w.get('warmup', d.warmup)})")
    train.add_argument("--caption-dropout", type=float, default=None,
                       help="data setting: fraction of captions whose words are dropped, the concept's name and "
                            f"tokens kept (default {w['caption_dropout']:g})")
    train.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR-γ loss weighting, 0 off; "
                       + default("min_snr_gamma") + ", the shapes world's own objective")
    train.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    train.set_defaults(run=_train_geom)


def _add_fixtures_parser(sub) -> None:
    from .fixtures import CHECKPOINT

    def run(args: argparse.Namespace) -> int:
        from ..erasers.io.checkpoints import CheckpointError
        from ..erasers.io.text_encoders import TextEncoderError
        from .fixtures import write_fixtures

        try:
            write_fixtures(args.models_dir, args.checkpoint_name, args.force, args.tokenizer)
        except (CheckpointError, TextEncoderError, ValueError) as err:
            return _error(err)
        return 0

    fixtures = sub.add_parser(
        "fixtures", help="write the model files the shipped workflows name (tiny SD1.5-shaped stand-ins)",
        description="Write into a ComfyUI models folder every model file the workflows in workflows/ name, made for "
                    "a tiny SD1.5-shaped checkpoint with seeded random weights: the checkpoint (checkpoints/), SPM "
                    "membranes (spm/), an erasure (erasers/), an AdvUnlearn encoder folder in the released layout "
                    "(clip/) and Geom-Erasing location tokens (embeddings/). Files that exist are kept unless "
                    "--force.")
    fixtures.add_argument("--models-dir", required=True, metavar="DIR", help="ComfyUI's models folder")
    fixtures.add_argument("--checkpoint-name", default=CHECKPOINT, metavar="NAME",
                          help=f"file name of the checkpoint under checkpoints/ (default: {CHECKPOINT})")
    fixtures.add_argument("--force", action="store_true", help="replace files that exist")
    fixtures.add_argument("--tokenizer", default=None, metavar="DIR",
                          help="CLIP's vocab.json and merges.txt, for the erasure (default: from open_clip)")
    fixtures.set_defaults(run=run)


def _add_batch_parser(sub) -> None:
    from .batch import add_arguments, command

    batch = sub.add_parser(
        "batch", help="one image per prompt of a .csv/.txt list, with erasures, on ComfyUI servers or in-process",
        description="Generate a prompt list with an API-format ComfyUI workflow on one or several servers, or "
                    "in-process on a diffusers SD1.x/SD2.x/SDXL folder or the shapes world (--backend diffusers). Writes DIR/NNNNN.png and DIR/manifest.jsonl; "
                    "rerun the same command to resume an interrupted batch.")
    add_arguments(batch)
    batch.set_defaults(run=command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erasekit", description="Concept erasure for text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = sub.add_parser("selfcheck", help="start a real ComfyUI with the pack and list the nodes it registered")
    check.set_defaults(run=_selfcheck)

    inspect = sub.add_parser("inspect", help="report a checkpoint's model family, cross-attention layers and text encoders")
    inspect.add_argument("checkpoint", help="a single-file checkpoint (.safetensors, .ckpt) in the LDM/ComfyUI layout")
    inspect.set_defaults(run=_inspect)

    _add_erase_parser(sub)
    _add_apply_parser(sub)
    _add_convert_parser(sub)
    _add_world_parsers(sub)
    _add_train_spm_parser(sub)
    _add_train_advunlearn_parser(sub)
    _add_train_geom_parser(sub)
    _add_batch_parser(sub)
    _add_fixtures_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks that print ours beside a reference and the ratio")
    bench.add_argument("suite", choices=["closed-form", "spm"],
                       help="closed-form: UCE/RECE edits vs the per-layer dense form; spm: UNet step time with SPM "
                            "membranes (Facilitated Transport) vs the plain UNet and per-prompt merged weights")
    bench.add_argument("--repeats", type=int, default=3,
                       help="timed runs (median); closed-form references run once")
    bench.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU variant")
    closed = bench.add_argument_group("closed-form")
    closed.add_argument("--family", nargs="+", choices=["sd15", "sdxl"], default=["sd15", "sdxl"])
    closed.add_argument("--concepts", nargs="+", type=int, default=[1, 10, 50])
    spm = bench.add_argument_group("spm")
    spm.add_argument("--membranes", nargs="+", type=int, default=[0, 1, 4, 16], help="membrane counts, one row each")
    spm.add_argument("--batch", nargs="+", type=int, default=[2, 8],
                     help="UNet batch sizes, even: B/2 images of a prompt and a negative prompt")
    spm.add_argument("--latent", type=int, default=32, help="latent side (64 is a 512x512 image)")
    spm.add_argument("--unet", choices=["tiny-sd15", "sd15"], default="tiny-sd15",
                     help="tiny-sd15: SD1.5 widths on two levels, 107 M parameters; sd15: the full 860 M UNet")
    spm.add_argument("--steps", type=int, default=30,
                     help="sampler steps the reference's per-prompt rebuild is spread over (infer_spm.py: 30)")
    spm.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    bench.set_defaults(run=_bench)
    return parser


def _bench(args: argparse.Namespace) -> int:
    return _bench_spm(args) if args.suite == "spm" else _bench_closed_form(args)


def _bench_spm(args: argparse.Namespace) -> int:
    """Print UNet step times with SPM membranes beside the plain UNet and the per-prompt merged reference."""
    import torch

    from .bench.spm import run_spm

    try:
        device = parse_device(args.device)
        run_spm(args.unet, args.membranes, args.batch, args.latent, args.repeats, args.steps, device,
                getattr(torch, args.dtype))
    except ValueError as err:
        return _error(err)
    return 0


def _bench_closed_form(args: argparse.Namespace) -> int:
    """Print our closed-form edit times beside the per-layer dense reference, the read-once time and file sizes."""
    from .bench.closed_form import run_closed_form

    try:
        device = parse_device(args.device)
    except ValueError as err:
        return _error(err)
    print(f"UCE/RECE on random weights of the real K/V shapes, float32 on {device}; RECE = UCE + 1 epoch. Ours: "
          "medians; per-layer references: one run on every 8th layer (plus one on none, for the per-concept part), "
          "scaled to all.", flush=True)
    run_closed_form(tuple(args.family), tuple(args.concepts), args.repeats, device)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
