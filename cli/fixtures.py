"""`erasekit fixtures`: every model file the shipped workflows (workflows/) name, made for the tiny SD1.5-shaped
checkpoint and written into a ComfyUI models folder, so the workflows run where no weights can be downloaded (the
tests run them this way) or before the real ones are in place.

Each file has the layout of the real thing: the checkpoint is a single LDM-layout file (checkpoints/), the membranes
are official SPM files (spm/), the erasure is an EraseKit erasure file (erasers/) computed with UCE from the
checkpoint's own text encoder, as `erasekit erase` computes it. The AdvUnlearn encoder is a released folder
(`config.json` + `pytorch_model.bin`, transformers names) holding the checkpoint's own CLIP-L with seeded changes
where AdvUnlearn trains (clip/), and the Geom-Erasing file holds seeded location tokens as wide as that encoder
(embeddings/). A file that exists is kept unless `force`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..erasers.io import comfy_folders

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
# Official SPM files name the concepts they erase in their metadata, which Facilitated Transport reads.
MEMBRANES = {"snoopy_last.safetensors": "Snoopy", "mickey_last.safetensors": "Mickey Mouse"}
# The first file the save_erasure workflow writes, which the load_erasure workflow reads.
ERASURE = "erasekit/van_gogh_00001.safetensors"
ERASURE_CONCEPT, ERASURE_GUIDE = "Van Gogh", "art"
TINY_MODEL = "tiny-sd15"  # the checkpoint's "erasekit.model" metadata
# The released OPTML-Group/AdvUnlearn folder's file, so a user who downloads that folder into models/text_encoders
# finds the workflow pointing at it. Written under models/clip: the 2024 ComfyUI lists only that folder for the
# node's "clip" files, the newest lists it under text_encoders too.
ADVUNLEARN_ENCODER = "vangogh_unlearned/pytorch_model.bin"
# How far the seeded changes move each trained tensor, relative to its RMS: enough that the images differ.
ADVUNLEARN_CHANGE = 0.1
LOCATION_TOKENS = "geom_watermark.safetensors"
LOCATION_CONCEPT, LOCATION_GRID = "watermark", 3


def write_fixtures(models_dir: str | os.PathLike, checkpoint_name: str = CHECKPOINT, force: bool = False,
                   tokenizer_dir: str | os.PathLike | None = None,
                   report: Callable[[str], None] = print) -> list[Path]:
    """Write the workflows' model files under `models_dir` (ComfyUI's models folder); return the paths written.

    The erasure, the AdvUnlearn encoder and the location tokens are made from the checkpoint found under
    `checkpoint_name`, the one written or one kept.
    """
    from ..erasers.closed_form import recipes
    from ..erasers.io.model_files import open_model
    from ..erasers.spm.membrane import save_membrane
    from ..testing.tiny_models import build_tiny_sd15_checkpoint

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

    membranes = [models / comfy_folders.SPM / name for name in MEMBRANES]
    to_write = [wanted(path) for path in membranes]
    if any(to_write):  # all drawn from one seed, so each file is the same whichever others are written
        for path, membrane, write in zip(membranes, _tiny_membranes(list(MEMBRANES.values())), to_write):
            if write:
                wrote(save_membrane(membrane, path))

    erasure_path = models / comfy_folders.ERASURES / ERASURE
    if wanted(erasure_path):
        model = open_model(checkpoint)
        kv = {name: weight.float() for name, weight in model.kv_weights().items()}
        options = recipes.EraseOptions(method="uce", concepts=[ERASURE_CONCEPT], guide=[ERASURE_GUIDE])
        erasure = recipes.erase(kv, model.encoder(tokenizer_dir=tokenizer_dir), model.family.name, options)
        wrote(erasure.save(erasure_path))

    encoder_path = models / comfy_folders.TEXT_ENCODERS / ADVUNLEARN_ENCODER
    tokens_path = models / "embeddings" / LOCATION_TOKENS
    to_write = [wanted(encoder_path), wanted(tokens_path)]
    if any(to_write):
        tower = _clip_l(checkpoint)
        if to_write[0]:
            wrote(_write_advunlearn_folder(tower, encoder_path))
        if to_write[1]:
            tokens_path.parent.mkdir(parents=True, exist_ok=True)
            _location_tokens(tower).save(tokens_path)
            wrote(tokens_path)
    return written


def _is_tiny(checkpoint: Path) -> bool:
    from ..erasers.io.checkpoints import CheckpointError
    from ..erasers.io.components import safetensors_metadata

    try:
        return (safetensors_metadata(checkpoint) or {}).get("erasekit.model") == TINY_MODEL
    except CheckpointError:  # a .ckpt, say: not one this module wrote
        return False


def _tiny_membranes(concepts: list[str]):
    """Seeded rank-1 membranes on every module SPM edits in the tiny checkpoint's UNet (built without memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..erasers.spm.hooks import membrane_targets
    from ..testing.tiny_models import TINY_SD15_UNET_CONFIG, random_membranes

    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY_SD15_UNET_CONFIG)
    return random_membranes(membrane_targets(unet), concepts)


def _clip_l(checkpoint: Path) -> dict:
    """The SD1.x checkpoint's CLIP-L text encoder in transformers names, read without the rest of the file where the
    format allows (a real SD1.5 checkpoint is 4 GB)."""
    from ..erasers.io.checkpoints import SAFETENSORS_SUFFIXES, read_checkpoint
    from ..erasers.io.text_encoders import CLIP_L_SD1, checkpoint_text_towers

    if checkpoint.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(checkpoint), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(CLIP_L_SD1)}
    else:
        state = read_checkpoint(checkpoint)
    return checkpoint_text_towers(state, "sd1")["clip_l"]


def _write_advunlearn_folder(tower: dict, path: Path) -> Path:
    """`path` (the folder's pytorch_model.bin) and config.json beside it: `tower` with seeded changes to what
    AdvUnlearn's `text_encoder_full` trains (the encoder layers and final norm; the embeddings stay frozen, as in
    the released encoders), in the tower's dtype."""
    import torch

    from ..erasers.files import write_atomic, write_stream
    from ..erasers.io.text_encoders import clip_text_config

    generator = torch.Generator().manual_seed(0)
    changed = {}
    for key in sorted(tower):
        tensor = tower[key]
        if key.startswith(("text_model.encoder.", "text_model.final_layer_norm.")):
            weight = tensor.float()
            noise = torch.randn(weight.shape, generator=generator)
            tensor = (weight + ADVUNLEARN_CHANGE * weight.square().mean().sqrt() * noise).to(tensor.dtype)
        changed[key] = tensor.contiguous()
    config = clip_text_config(changed, "quick_gelu")  # OpenAI CLIP-L's activation, as the released config.json
    config.architectures = ["CLIPTextModel"]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path.parent / "config.json", config.to_json_string())
    write_stream(path, lambda out: torch.save(changed, out))
    return path


def _location_tokens(tower: dict):
    """Seeded vectors for every cell of the grid, as wide as the text encoder's token embeddings and of their scale."""
    import torch

    from ..erasers.advunlearn.encoder import TOKEN_EMBEDDING
    from ..erasers.geom.negatives import LocationTokens

    embedding = tower[TOKEN_EMBEDDING].float()
    generator = torch.Generator().manual_seed(1)
    cells = list(range(LOCATION_GRID * LOCATION_GRID))
    vectors = torch.randn(len(cells), embedding.shape[1], generator=generator) * embedding.std()
    return LocationTokens(LOCATION_CONCEPT, LOCATION_GRID, cells, vectors, family="sd1",
                          extra={"erasekit.fixture": "seeded random vectors, not trained"})
