"""`erasekit bench`: the benchmarks (cli/bench/), ours beside a reference and the ratio."""
from __future__ import annotations

import argparse

from ..common import error, number
from ..pipelines import parse_device


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print ours beside a reference and the ratio")
    bench.add_argument("suite", choices=["closed-form", "spm", "files"],
                       help="closed-form: UCE/RECE edits vs the per-layer dense form; spm: UNet step time with SPM "
                            "membranes (Facilitated Transport) vs the plain UNet and per-prompt merged weights; "
                            "files: writing and reading with EraseKit's file rules (content hash, atomic write) vs "
                            "plain safetensors")
    bench.add_argument("--repeats", type=number(1, 1000, integer=True), default=3,
                       help="timed runs (median); closed-form references run once")
    bench.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU variant")
    closed = bench.add_argument_group("closed-form")
    closed.add_argument("--family", nargs="+", choices=["sd15", "sdxl"], default=["sd15", "sdxl"])
    closed.add_argument("--concepts", nargs="+", type=number(1, 10_000, integer=True), default=[1, 10, 50],
                        help="concept counts, 1 to 10000 each")
    spm = bench.add_argument_group("spm")
    spm.add_argument("--membranes", nargs="+", type=number(0, 1000, integer=True), default=[0, 1, 4, 16],
                     help="membrane counts, 0 to 1000, one row each")
    spm.add_argument("--batch", nargs="+", type=number(2, 1024, integer=True), default=[2, 8],
                     help="UNet batch sizes, even: B/2 images of a prompt and a negative prompt")
    spm.add_argument("--latent", type=number(1, 512, integer=True), default=32,
                     help="latent side, 1 to 512 (64 is a 512x512 image)")
    spm.add_argument("--unet", choices=["tiny-sd15", "sd15"], default="tiny-sd15",
                     help="tiny-sd15: SD1.5 widths on two levels, 107 M parameters; sd15: the full 860 M UNet")
    spm.add_argument("--steps", type=number(1, 1000, integer=True), default=30,
                     help="sampler steps the reference's per-prompt rebuild is spread over (infer_spm.py: 30)")
    spm.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    filesize = bench.add_argument_group("files")
    filesize.add_argument("--size-mb", type=number(1, 1_000_000, integer=True), default=1024,
                          help="payload in MiB (float32), at least 1")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.suite == "files":
        return _files(args)
    return _spm(args) if args.suite == "spm" else _closed_form(args)


def _files(args: argparse.Namespace) -> int:
    """Print write/read times with EraseKit's file rules beside plain safetensors."""
    from ..bench.files import run_files

    run_files(args.size_mb, args.repeats)
    return 0


def _spm(args: argparse.Namespace) -> int:
    """Print UNet step times with SPM membranes beside the plain UNet and the per-prompt merged reference."""
    import torch

    from ..bench.spm import run_spm

    try:
        device = parse_device(args.device)
        run_spm(args.unet, args.membranes, args.batch, args.latent, args.repeats, args.steps, device,
                getattr(torch, args.dtype))
    except ValueError as err:
        return error(err)
    return 0


def _closed_form(args: argparse.Namespace) -> int:
    """Print our closed-form edit times beside the per-layer dense reference, the read-once time and file sizes."""
    from ..bench.closed_form import run_closed_form

    try:
        device = parse_device(args.device)
    except ValueError as err:
        return error(err)
    print(f"UCE/RECE on random weights of the real K/V shapes, float32 on {device}; RECE = UCE + 1 epoch. Ours: "
          "medians; per-layer references: one run on every 8th layer (plus one on none, for the per-concept part), "
          "scaled to all.", flush=True)
    run_closed_form(tuple(args.family), tuple(args.concepts), args.repeats, device)
    return 0
