"""`erasekit fixtures`: every model file the shipped workflows (workflows/) name, made for the tiny SD1.5-shaped
checkpoint and written into a ComfyUI models folder, so the workflows run where no weights can be downloaded (the
tests run them this way) or before the real ones are in place.

Each file has the layout of the real thing: the checkpoint is a single LDM-layout file (checkpoints/), the membranes
are official SPM files (spm/), the erasure is an EraseKit erasure file (erasers/) computed with UCE from the
checkpoint's own text encoder, as `erasekit erase` computes it. A file that exists is kept unless `force`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..nodes.closed_form import FOLDER as ERASERS_FOLDER
from ..nodes.spm import FOLDER as SPM_FOLDER

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
# Official SPM files name the concepts they erase in their metadata, which Facilitated Transport reads.
MEMBRANES = {"snoopy_last.safetensors": "Snoopy", "mickey_last.safetensors": "Mickey Mouse"}
# The first file the save_erasure workflow writes, which the load_erasure workflow reads.
ERASURE = "erasekit/van_gogh_00001.safetensors"
ERASURE_CONCEPT, ERASURE_GUIDE = "Van Gogh", "art"
TINY_MODEL = "tiny-sd15"  # the checkpoint's "erasekit.model" metadata


def write_fixtures(models_dir: str | os.PathLike, checkpoint_name: str = CHECKPOINT, force: bool = False,
                   tokenizer_dir: str | os.PathLike | None = None,
                   report: Callable[[str], None] = print) -> list[Path]:
    """Write the workflows' model files under `models_dir` (ComfyUI's models folder); return the paths written.

    The erasure is computed from the checkpoint found under `checkpoint_name`, the one written or one kept.
    """
    from . import concept_edit
    from .pipeline_files import open_model
    from .spm import save_membrane
    from .tiny_models import build_tiny_sd15_checkpoint

    models = Path(models_dir)
    written: list[Path] = []

    def wanted(path: Path) -> bool:
        if path.exists() and not force:
            report(f"kept {path}: it exists (--force replaces it)")
            return False
        return True

    def wrote(path: Path) -> None:
        written.append(path)
        report(f"wrote {path}")

    checkpoint = models / "checkpoints" / checkpoint_name
    if wanted(checkpoint):
        wrote(build_tiny_sd15_checkpoint(checkpoint))
    elif not _is_tiny(checkpoint):
        report(f"note: {checkpoint.name} is not the tiny checkpoint; the SPM membranes written here fit only that one")

    membranes = [models / SPM_FOLDER / name for name in MEMBRANES]
    to_write = [wanted(path) for path in membranes]
    if any(to_write):  # all drawn from one seed, so each file is the same whichever others are written
        for path, membrane, write in zip(membranes, _tiny_membranes(list(MEMBRANES.values())), to_write):
            if write:
                wrote(save_membrane(membrane, path))

    erasure_path = models / ERASERS_FOLDER / ERASURE
    if wanted(erasure_path):
        model = open_model(checkpoint)
        kv = {name: weight.float() for name, weight in model.kv_weights().items()}
        options = concept_edit.EraseOptions(method="uce", concepts=[ERASURE_CONCEPT], guide=[ERASURE_GUIDE])
        erasure = concept_edit.erase(kv, model.encoder(tokenizer_dir=tokenizer_dir), model.family.name, options)
        wrote(erasure.save(erasure_path))
    return written


def _is_tiny(checkpoint: Path) -> bool:
    from .checkpoints import CheckpointError
    from .pipeline_files import safetensors_metadata

    try:
        return (safetensors_metadata(checkpoint) or {}).get("erasekit.model") == TINY_MODEL
    except CheckpointError:  # a .ckpt, say: not one this module wrote
        return False


def _tiny_membranes(concepts: list[str]):
    """Seeded rank-1 membranes on every module SPM edits in the tiny checkpoint's UNet (built without memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    from .spm_diffusers import membrane_targets
    from .tiny_models import TINY_SD15_UNET_CONFIG, random_membranes

    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY_SD15_UNET_CONFIG)
    return random_membranes(membrane_targets(unet), concepts)
