"""`erasekit train-geom`: Geom-Erasing location tokens of an implicit concept (model setting), or the tokens and a
fine-tuned UNet (data setting), on the shapes world's model or another pixel-space one."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ...erasers.geom.negatives import CONCEPTS
from ...erasers.geom.train import (
    SETTINGS,
    SHAPES_DATA_SETTING,
    SHAPES_IMAGES,
    GeomTrainConfig,
    read_folder,
    save_data_removal,
    tokens_file,
    train_data_removal,
    train_location_tokens,
)
from ...shapes.data import geom_training_set
from ..common import MAX_SEED, error, number, refuse_outputs
from ..pipelines import load_pipeline, model_folder


def register(subparsers) -> None:
    d, w = GeomTrainConfig(), SHAPES_DATA_SETTING

    def default(name: str) -> str:
        return f"default {getattr(d, name):g} (model setting), {w.get(name, getattr(d, name)):g} (data setting)"

    train = subparsers.add_parser(
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
    train.add_argument("--images", type=number(1, 10**6, integer=True), default=None,
                       help=f"1 to 10^6 shapes-world images without --data (default {SHAPES_IMAGES['model']} model "
                            "setting, "
                            f"{SHAPES_IMAGES['data']} data setting)")
    train.add_argument("--model", default=None, metavar="DIR", help="a shapes-world model folder (default: shipped)")
    train.add_argument("--grid", type=number(1, 64, integer=True), default=d.grid,
                       help=f"k of the k x k grid, 1 to 64 (default {d.grid})")
    train.add_argument("--alpha", type=number(high=1000), default=None,
                       help=f"re-weighting, in (0, 1000]; > 1 down-weights the concept's pixels ({default('alpha')})")
    train.add_argument("--steps", type=number(1, 10**7, integer=True), default=None,
                       help="1 to 10^7; " + default("steps"))
    train.add_argument("--batch-size", type=number(1, 4096, integer=True), default=None,
                       help="1 to 4096; " + default("batch_size"))
    train.add_argument("--lr", type=number(0, 1, low_inclusive=False), default=None,
                       help=f"of the tokens, in (0, 1] (default {d.lr:g})")
    train.add_argument("--unet-lr", type=number(0, 1, low_inclusive=False), default=None,
                       help=f"data setting, in (0, 1] (default {w['unet_lr']:g})")
    train.add_argument("--warmup", type=number(0, 10**7, integer=True), default=None,
                       help="data setting: 0 to 10^7 steps of linear learning-rate "
                       f"warm-up (default {w.get('warmup', d.warmup)})")
    train.add_argument("--caption-dropout", type=number(0, 1), default=None,
                       help="data setting: fraction (0 to 1) of captions whose words are dropped, the concept's name "
                            f"and tokens kept (default {w['caption_dropout']:g})")
    train.add_argument("--min-snr-gamma", type=number(0, 1000), default=None,
                       help="min-SNR-γ loss weighting, 0 to 1000, 0 off; "
                       + default("min_snr_gamma") + ", the shapes world's own objective")
    train.add_argument("--seed", type=number(0, MAX_SEED, integer=True), default=d.seed,
                       help=f"0 to {MAX_SEED} (default {d.seed})")
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _train(args)
    except (NotImplementedError, OSError, ValueError) as err:  # GeomError is a ValueError: bad boxes, cells, files
        return error(err)


def _data_files(folder: str | None) -> list[Path]:
    """What --data holds that training reads: its metadata and images. A .safetensors file there is no training data
    (tokens an earlier run wrote beside them), so writing over it loses nothing of the input."""
    if folder is None or not Path(folder).is_dir():
        return [] if folder is None else [Path(folder)]
    return [path for path in Path(folder).rglob("*") if path.is_file() and path.suffix.lower() != ".safetensors"]


def _train(args: argparse.Namespace) -> int:
    """Train, save and report; a bad option, model folder, data folder or box raises OSError or ValueError."""
    import torch

    started, cpu = time.perf_counter(), time.process_time()
    setting = args.setting
    defaults = SHAPES_DATA_SETTING if setting == "data" else {}
    given = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "unet_lr", "warmup", "caption_dropout",
                                           "min_snr_gamma", "alpha")}
    # Built (and so checked) before the model and the images are loaded: a bad option is refused at once.
    config = GeomTrainConfig(setting=setting, grid=args.grid, seed=args.seed,
                             **{**defaults, **{k: v for k, v in given.items() if v is not None}})
    written = [args.out] if setting == "model" else [args.out, Path(args.out) / "unet",
                                                      tokens_file(args.out, args.concept)]
    refuse_outputs(written, [model_folder(args.model), *_data_files(args.data)])
    pipe, _ = load_pipeline(args.model, kinds=("shapes",), user="train-geom (pixel-space models)")
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
