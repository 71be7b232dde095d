"""What the commands load: a torch device from `--device`, and a pipeline from `--model` (the shapes world or a
diffusers Stable Diffusion folder). Every command parses devices and loads pipelines through here."""
from __future__ import annotations

import json
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


def load_pipeline(path: str | Path | None = None, device="cpu", *, sdxl: bool = False):
    """(pipeline, kind) for a model folder, local files only, no safety checker:

    - a shapes-world folder (default: the shipped one) → a ShapesPipeline, "shapes";
    - a diffusers folder (model_index.json) of a StableDiffusionPipeline → "sd";
    - of a StableDiffusionXLPipeline → "sdxl" when `sdxl`, else NotImplementedError (the trainers take SD1.x/SD2.x).
    """
    from ..shapes import model as shapes_model

    path = Path(shapes_model.WEIGHTS_DIR if path is None else path)
    device = parse_device(device) if isinstance(device, str) else device
    index = path / "model_index.json"
    if index.is_file():
        return _diffusers(path, json.loads(index.read_text(encoding="utf-8")), device, sdxl)
    if (path / "unet" / "config.json").is_file() or path == Path(shapes_model.WEIGHTS_DIR):
        pipe = shapes_model.ShapesPipeline.load(path)  # FileNotFoundError naming what is missing
        pipe.unet.to(device)
        pipe.text_encoder.to(device)
        return pipe, "shapes"
    raise ValueError(f"{path}: not a diffusers pipeline folder (model_index.json) nor a shapes-world model "
                     "(unet/, text_encoder/, tokenizer/, scheduler/)")


def _diffusers(path: Path, config: dict, device, sdxl: bool):
    kind = str(config.get("_class_name", ""))
    if not kind.startswith("StableDiffusion") or kind.startswith("StableDiffusion3"):
        raise ValueError(f"{path} holds a {kind or 'pipeline of no named class'} (model_index.json): Stable "
                         "Diffusion 1.x/2.x/XL folders are supported (StableDiffusionPipeline, "
                         "StableDiffusionXLPipeline)")
    if "XL" in kind:
        if not sdxl:
            raise NotImplementedError(f"{path} is an SDXL pipeline ({kind}); SPM training supports SD1.x/SD2.x "
                                      "pipelines and the shapes world")
        if not (config.get("text_encoder") or [None])[0]:
            raise ValueError(f"{path} is an SDXL pipeline without a first text encoder (a refiner?): give an SDXL "
                             "base model folder")
        from diffusers import StableDiffusionXLPipeline

        pipe, kind = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True), "sdxl"
    else:
        from diffusers import StableDiffusionPipeline

        pipe, kind = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                             local_files_only=True), "sd"
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kind
