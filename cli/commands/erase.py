"""`erasekit erase`: a closed-form erasure (UCE, RECE, TRCE stage 1) of a checkpoint, with its own text encoder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ...erasers.closed_form import recipes
from ...erasers.closed_form.captions import coco_captions
from ...erasers.families import FamilyError
from ..common import PrintedWarnings, error, number, refuse_outputs, size
from ..pipelines import parse_device


def register(subparsers) -> None:
    erase = subparsers.add_parser(
        "erase", help="compute a closed-form erasure (UCE, RECE, TRCE) on a checkpoint and save it",
        description="Erase concepts in closed form with the checkpoint's own text encoder(s) and write the erasure "
                    "(.safetensors) that `erasekit apply`, ComfyUI's Load Erasure node and the diffusers adapter read.",
    )
    erase.add_argument("--method", required=True, choices=recipes.METHODS)
    erase.add_argument("--concept", action="append", required=True, metavar="TEXT",
                       help="a concept to erase (repeat for several)")
    erase.add_argument("--guide", action="append", metavar="TEXT",
                       help="what erased concepts become: one for all or one per concept (default: the empty prompt, "
                            "or the RECE preset's)")
    erase.add_argument("--preserve", action="append", metavar="TEXT", help="a concept to keep unchanged (repeat)")
    erase.add_argument("--checkpoint", required=True, metavar="PATH",
                       help="an SD1.x/SD2.x/SDXL single-file checkpoint (.safetensors, .ckpt) or diffusers folder")
    erase.add_argument("--out", required=True, metavar="FILE", help="the erasure to write (.safetensors)")
    erase.add_argument("--lam", type=number(0, 100, low_inclusive=False), default=0.5,
                       help="λ, the pull towards the original weights, in (0, 100] (default 0.5)")
    erase.add_argument("--erase-scale", type=number(0, 100, low_inclusive=False), default=1.0,
                       help="in (0, 100] (default 1)")
    erase.add_argument("--preserve-scale", type=number(0, 100), default=None,
                       help="in [0, 100] (default: the method's)")
    erase.add_argument("--technique", choices=("replace", "tensor"), default="replace")
    erase.add_argument("--tokens", choices=("last", "suffix"), default="last",
                       help="UCE's token selection: the last word token (2025) or the suffix from it (2023)")
    erase.add_argument("--expand", choices=tuple(recipes.TEMPLATES), default=None,
                       help="add UCE's five prompt templates per concept")
    erase.add_argument("--preset", choices=tuple(recipes.RECE_PRESETS), default=None, help="RECE's per-kind defaults")
    erase.add_argument("--epochs", type=number(0, 100, integer=True), default=None,
                       help="RECE epochs, 0 to 100 (default: the preset's, else 1)")
    erase.add_argument("--reg", type=number(0, 100, low_inclusive=False), default=None,
                       help="RECE's λ_r, in (0, 100] (default: the preset's, else 0.1)")
    erase.add_argument("--trce-prior-captions", type=number(1, 2000, integer=True), default=500, metavar="N",
                       help="COCO captions for TRCE's prior-preservation term (1-2000)")
    erase.add_argument("--device", default="cpu", help="where the text encoder runs (cpu, cuda, cuda:1, mps)")
    erase.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="a folder with CLIP's vocab.json and merges.txt (default: the diffusers folder's own, "
                            "else converted from open_clip's packaged vocabulary)")
    erase.set_defaults(run=run)


def erase_options(args: argparse.Namespace) -> recipes.EraseOptions:
    """The recipe's options from the command line, checked (ValueError saying which option is wrong)."""
    opts = recipes.EraseOptions(
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


def run(args: argparse.Namespace) -> int:
    from ...erasers.erasure import FamilyMismatchError
    from ...erasers.io.checkpoints import CheckpointError
    from ...erasers.io.model_files import open_model
    from ...erasers.io.text_encoders import TextEncoderError

    started = time.perf_counter()
    try:
        opts = erase_options(args)
        out = Path(args.out)
        if out.suffix.lower() != ".safetensors":
            raise ValueError(f"--out {out.name}: erasures are written as .safetensors")
        refuse_outputs([out], [args.checkpoint, args.tokenizer])
        device = parse_device(args.device)
        if opts.method == "trce":
            captions = coco_captions(args.trce_prior_captions)
    except ValueError as err:
        return error(err)

    with PrintedWarnings():
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
            return error(err)
    rank = max((delta.rank for delta in erasure.layers.values()), default=0)
    print(f"{opts.method} erasure of {', '.join(map(repr, erasure.concepts))} for {family.label} ({family.name}): "
          f"{len(erasure.layers)} layers edited, rank {rank}")
    print(f"wrote {path} ({size(path.stat().st_size)}) in {time.perf_counter() - started:.1f} s")
    return 0
