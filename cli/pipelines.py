"""What the commands load: a torch device from `--device`, and a pipeline from `--model` (the shapes world or a
diffusers Stable Diffusion folder). Every command parses devices and loads pipelines through here."""
from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path


def parse_device(name: str):
    """The torch device `--device NAME` asks for, or a ValueError saying why it cannot be had here."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


# What each kind of model folder is, one and several.
_KIND = {"shapes": "a shapes-world model", "sd": "an SD1.x/SD2.x pipeline", "sdxl": "an SDXL pipeline"}
_KINDS = {"shapes": "the shapes world", "sd": "SD1.x/SD2.x pipelines", "sdxl": "SDXL pipelines"}


def model_folder(path: str | Path | None = None) -> Path:
    """The folder `--model` names, the shipped shapes world without one: an input no output may replace."""
    from ..shapes import model as shapes_model

    return Path(shapes_model.WEIGHTS_DIR if path is None else path)


def load_pipeline(path: str | Path | None = None, device="cpu", *, kinds: Collection[str] = ("shapes", "sd"),
                  user: str = "this command"):
    """(pipeline, kind) for a model folder, local files only, no safety checker:

    - a shapes-world folder (default: the shipped one) → a ShapesPipeline, "shapes";
    - a diffusers folder (model_index.json) of a StableDiffusionPipeline → "sd", of a StableDiffusionXLPipeline
      → "sdxl".

    `kinds` are those the caller (`user`, in the message) takes; another kind is refused before anything is loaded,
    SDXL with NotImplementedError (the trainers do not handle its second tower yet), the rest with ValueError.
    """
    from ..shapes import model as shapes_model

    path = Path(shapes_model.WEIGHTS_DIR if path is None else path)
    device = parse_device(device) if isinstance(device, str) else device
    index = path / "model_index.json"
    config = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else None
    kind = _kind(path, config, Path(shapes_model.WEIGHTS_DIR))
    if kind not in kinds:
        refused = NotImplementedError if kind == "sdxl" else ValueError
        named = f" ({config['_class_name']})" if config else ""
        raise refused(f"{path} is {_KIND[kind]}{named}; {user} supports "
                      f"{' and '.join(_KINDS[k] for k in ('sd', 'sdxl', 'shapes') if k in kinds)}")
    if kind == "shapes":
        pipe = shapes_model.ShapesPipeline.load(path)  # FileNotFoundError naming what is missing
        pipe.unet.to(device)
        pipe.text_encoder.to(device)
        return pipe, kind
    if kind == "sdxl":
        if not (config.get("text_encoder") or [None])[0]:
            raise ValueError(f"{path} is an SDXL pipeline without a first text encoder (a refiner?): give an SDXL "
                             "base model folder")
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                       local_files_only=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kind


def _kind(path: Path, config: dict | None, shipped: Path) -> str:
    """"shapes", "sd" or "sdxl" for a model folder (its model_index.json `config`, if any), or a ValueError naming
    what the folder must be."""
    if config is None:
        if (path / "unet" / "config.json").is_file() or path == shipped:
            return "shapes"
        raise ValueError(f"{path}: not a diffusers pipeline folder (model_index.json) nor a shapes-world model "
                         "(unet/, text_encoder/, tokenizer/, scheduler/)")
    name = str(config.get("_class_name", ""))
    if not name.startswith("StableDiffusion") or name.startswith("StableDiffusion3"):
        raise ValueError(f"{path} holds a {name or 'pipeline of no named class'} (model_index.json): Stable "
                         "Diffusion 1.x/2.x/XL folders are supported (StableDiffusionPipeline, "
                         "StableDiffusionXLPipeline)")
    return "sdxl" if "XL" in name else "sd"
