"""`erasekit batch`: one image per prompt of a .csv/.txt prompt list, with erasures, on ComfyUI servers or
in-process; resumable. The engine and its rules are cli/batch.py's."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...erasers.io.prompt_lists import MAX_SEED, read_prompt_file, select
from .. import batch
from ..common import error, number, refuse_outputs


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch", help="one image per prompt of a .csv/.txt list, with erasures, on ComfyUI servers or in-process",
        description="Generate a prompt list with an API-format ComfyUI workflow on one or several servers, or "
                    "in-process on a diffusers SD1.x/SD2.x/SDXL folder or the shapes world (--backend diffusers). "
                    "Writes DIR/NNNNN.png and DIR/manifest.jsonl; rerun the same command to resume an interrupted "
                    "batch.")
    _add_arguments(parser)
    parser.set_defaults(run=run)


def _add_arguments(parser) -> None:
    parser.add_argument("--prompts", required=True, metavar="FILE",
                        help="a .csv with a 'prompt' column (optional: evaluation_seed, evaluation_guidance, "
                             "categories; I2P's sd_seed / sd_guidance_scale) or a .txt, one prompt per line")
    parser.add_argument("--out", required=True, metavar="DIR", help="images and manifest.jsonl; rerun to resume")
    parser.add_argument("--backend", choices=("comfyui", "diffusers"), default="comfyui")
    parser.add_argument("--seed", type=number(0, MAX_SEED, integer=True), default=0,
                        help=f"rows without a seed get SEED + their index; 0 to {MAX_SEED} (default 0)")
    parser.add_argument("--start", type=number(0, 10**9, integer=True), default=0,
                        help="first prompt (index from 0)")
    parser.add_argument("--count", type=number(0, 10**9, integer=True), default=0,
                        help="number of prompts (default: all from --start)")
    comfy = parser.add_argument_group("comfyui backend")
    comfy.add_argument("--workflow", metavar="WF.json", help="an API-format workflow (rules: erasekit.cli.batch)")
    comfy.add_argument("--server", action="append", metavar="URL",
                       help="a ComfyUI server; repeat to share the prompts among several "
                            f"(default {batch.DEFAULT_SERVER})")
    comfy.add_argument("--timeout", type=number(0, 7 * 86400, low_inclusive=False), default=1800,
                       help="seconds one prompt may take, up to a week (default 1800)")
    world = parser.add_argument_group("diffusers backend (the shapes world or a diffusers model folder)")
    world.add_argument("--model", metavar="DIR",
                       help="a diffusers SD1.x/SD2.x/SDXL folder (model_index.json; local files only) or a "
                            "shapes-world model folder (default: the shipped shapes world)")
    world.add_argument("--erasure", action="append", default=[], metavar="FILE",
                       help="an EraseKit erasure (.safetensors) to apply; repeatable")
    world.add_argument("--membrane", action="append", default=[], metavar="FILE",
                       help="an SPM membrane (.safetensors) to apply with Facilitated Transport; repeatable")
    world.add_argument("--steps", type=number(1, 1000, integer=True),
                       help=f"sampler steps, 1 to 1000 (default: {batch.DEFAULT_STEPS} on a diffusers folder, 10 on "
                            "the shapes world)")
    world.add_argument("--guidance", type=number(0, 100), help="guidance scale for rows without one, 0 to 100 "
                       "(default: the "
                       "pipeline's: 7.5 for SD, 5 for SDXL, 4 on the shapes world)")
    world.add_argument("--negative", metavar="TEXT", help="negative prompt for every image (default: none)")
    world.add_argument("--width", type=number(8, 16384, integer=True),
                       help="image width, a multiple of 8 (diffusers folder; default: the "
                       "model's)")
    world.add_argument("--height", type=number(8, 16384, integer=True),
                       help="image height, a multiple of 8 (diffusers folder; default: the "
                       "model's)")
    world.add_argument("--device", help="torch device for a diffusers folder: cpu (default), cuda, cuda:1, ...")


def run(args: argparse.Namespace) -> int:
    """0 when every prompt is done, 1 when some are missing (rerun to resume), 2 on bad input, 130 interrupted."""
    comfy_only = [f"--{n}" for n in ("workflow", "server") if getattr(args, n)]
    world_only = [f"--{n}" for n in ("model", "erasure", "membrane", "steps", "guidance", "negative", "width",
                                     "height", "device") if getattr(args, n) is not None and getattr(args, n) != []]
    try:
        if args.backend == "comfyui" and (world_only or not args.workflow):
            raise batch.BatchError(f"{', '.join(world_only)}: only for --backend diffusers" if world_only else
                                   "--backend comfyui needs --workflow WF.json (an API-format workflow)")
        if args.backend == "diffusers" and comfy_only:
            raise batch.BatchError(f"{', '.join(comfy_only)}: only for --backend comfyui")
        refuse_outputs([args.out, Path(args.out) / batch.MANIFEST],
                       [args.prompts, args.workflow, args.model, *args.erasure, *args.membrane])
        items = select(read_prompt_file(args.prompts, args.seed), args.start, args.count)
        if args.backend == "comfyui":
            workflow = batch.Workflow.load(args.workflow)
            # batch.ComfyClient, looked up at each run: the tests put a dying client there.
            clients = [batch.ComfyClient(url if "://" in url else f"http://{url}")
                       for url in args.server or [batch.DEFAULT_SERVER]]
            summary = batch.run_comfy(workflow, items, Path(args.out), clients, args.timeout)
        else:
            summary = batch.run_diffusers(items, Path(args.out), args.model, args.erasure, args.membrane,
                                          args.steps, args.guidance, negative=args.negative, width=args.width,
                                          height=args.height, device=args.device or "cpu")
    except (ValueError, OSError) as err:  # BatchError, prompt list, erasure and membrane files, missing model
        return error(err)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished prompts are kept in {args.out}: rerun the same command to resume",
              file=sys.stderr)
        return 130
    done = summary.total - summary.missing
    print(f"{done}/{summary.total} prompts done ({summary.generated} now, {summary.earlier} earlier) in {args.out}",
          flush=True)
    if summary.missing:
        print(f"error: {summary.missing} prompts not generated; fix the error above and rerun the same command: "
              "it resumes where this run stopped", file=sys.stderr)
        return 1
    return 0
