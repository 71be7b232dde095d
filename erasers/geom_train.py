"""Geom-Erasing training, model-removal setting: learn only the location-token embeddings of an implicit concept.

The UNet and text encoder stay frozen. Each training caption with a detector box becomes
"caption concept ⟨cells the box covers⟩"; the new tokens get ids past the tokenizer's vocabulary and their vectors
are appended to the (frozen) token-embedding table for the forward pass, which is how ComfyUI applies textual
inversions too. The denoising loss is re-weighted per grid cell: with T cells of which K hold the concept,
w = T/(K+α(T−K)) inside and αT/(K+α(T−K)) outside (Σw = T), so α > 1 down-weights the concept's pixels.

Works on pipelines whose UNet denoises the images directly (the shapes world); images of latent-diffusion models
would first need their VAE latents, which this module does not compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .geom_erasing import LocationTokens, cells_of_box, parse_cells
from .text import CONTEXT_TOKENS

TOKEN_WEIGHT = "text_model.embeddings.token_embedding.weight"


@dataclass
class GeomTrainConfig:
    grid: int = 3
    alpha: float = 2.0  # > 1: the concept's pixels weigh less (the paper's re-weighting); 1: plain loss
    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-3
    seed: int = 0


def weight_map(cells: Sequence[int], grid: int, height: int, width: int, alpha: float) -> torch.Tensor:
    """[height, width] loss weights: the paper's per-cell weights for an image whose concept covers `cells`
    (all ones when it has none)."""
    if not cells:
        return torch.ones(height, width)
    total, k = grid * grid, len(cells)
    inside = torch.zeros(total, dtype=torch.bool)
    inside[list(cells)] = True
    per_cell = torch.where(inside, 1.0, alpha) * total / (k + alpha * (total - k))
    rows = (torch.arange(height) * grid // height)[:, None]
    cols = (torch.arange(width) * grid // width)[None, :]
    return per_cell[rows * grid + cols]


def _caption_ids(tokenizer, caption: str, concept: str, cells: Sequence[int], new_ids: dict[int, int]) -> list[int]:
    """BOS, the caption's words, then (when the image shows the concept) its name and the covered cells' new
    tokens, EOS, padded with EOS to CLIP's 77 positions; a long caption is cut, never the concept's tokens."""
    suffix = tokenizer(concept, add_special_tokens=False)["input_ids"] + [new_ids[c] for c in cells] if cells else []
    words = tokenizer(caption, add_special_tokens=False)["input_ids"][:CONTEXT_TOKENS - 2 - len(suffix)]
    ids = [tokenizer.bos_token_id, *words, *suffix, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (CONTEXT_TOKENS - len(ids))


def encode_with_tokens(text_encoder, ids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state for ids that may name the new tokens (ids ≥ vocabulary size)."""
    table = text_encoder.get_input_embeddings().weight
    weight = torch.cat([table, vectors.to(table.dtype)])
    return torch.func.functional_call(text_encoder, {TOKEN_WEIGHT: weight}, (ids,))[0]


def train_location_tokens(pipe, images: torch.Tensor, captions: Sequence[str], boxes: Sequence[Sequence],
                          concept: str, config: GeomTrainConfig = GeomTrainConfig(), family: str = "",
                          progress: Callable[[int, float], None] | None = None) -> LocationTokens:
    """Location tokens for `concept` from images ([N, C, H, W] in the UNet's input space), their captions and per
    image a list of detector boxes (x0, y0, x1, y1 in pixels, possibly empty). `progress(step, loss)` is called
    every step."""
    from diffusers import DDPMScheduler

    if not len(images) == len(captions) == len(boxes):
        raise ValueError(f"{len(images)} images, {len(captions)} captions and {len(boxes)} box lists: need one each")
    height, width = images.shape[-2:]
    grid = config.grid
    cells = [sorted({c for box in image_boxes for c in cells_of_box(box, width, height, grid)})
             for image_boxes in boxes]
    # Only captions with the concept name the new tokens; the others give them no gradient, so skip them.
    keep = [i for i, cs in enumerate(cells) if cs]
    if not keep:
        raise ValueError("no image has a detector box: nothing to learn the location tokens from")
    images, captions, cells = images[keep], [captions[i] for i in keep], [cells[i] for i in keep]
    all_cells = parse_cells("everywhere", grid)
    tokenizer, text_encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    table = text_encoder.get_input_embeddings().weight.detach()
    new_ids = {c: table.shape[0] + i for i, c in enumerate(all_cells)}
    ids = torch.tensor([_caption_ids(tokenizer, cap, concept, cs, new_ids) for cap, cs in zip(captions, cells)])
    weights = torch.stack([weight_map(cs, grid, height, width, config.alpha) for cs in cells])[:, None]

    # Start every cell at the concept word's embedding (mean over its word pieces), as textual inversion does.
    concept_ids = tokenizer(concept, add_special_tokens=False)["input_ids"]
    vectors = table[concept_ids].mean(0).repeat(len(all_cells), 1).clone().requires_grad_(True)
    optimiser = torch.optim.AdamW([vectors], lr=config.lr, weight_decay=0.0)
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(config.seed)
    frozen = [p for module in (text_encoder, unet) for p in module.parameters()]
    flags = [p.requires_grad for p in frozen]
    try:  # no gradients for the caller's models, and their flags as they were afterwards
        for p in frozen:
            p.requires_grad_(False)
        for step in range(config.steps):
            pick = torch.randint(len(images), (config.batch_size,), generator=generator)
            x0 = images[pick]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(noise_schedule.config.num_train_timesteps, (len(pick),), generator=generator)
            context = encode_with_tokens(text_encoder, ids[pick], vectors)
            eps = unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
            loss = (weights[pick] * F.mse_loss(eps, noise, reduction="none")).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if progress is not None:
                progress(step, loss.item())
    finally:
        for p, flag in zip(frozen, flags):
            p.requires_grad_(flag)
    return LocationTokens(concept, grid, all_cells, vectors.detach().clone(), family,
                          {"alpha": str(config.alpha), "steps": str(config.steps)})


def encode_negative(pipe, text: str, tokens: LocationTokens, cells: Sequence[int]) -> torch.Tensor:
    """The context of a negative prompt `text` followed by the learned tokens of `cells` (the diffusers-side twin
    of the ComfyUI node), [1, 77, width]."""
    tokens.check_width(pipe.text_encoder.get_input_embeddings().weight.shape[1])
    cells = parse_cells(cells, tokens.grid)
    vocab = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    words = pipe.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [pipe.tokenizer.bos_token_id, *words, *range(vocab, vocab + len(cells)), pipe.tokenizer.eos_token_id]
    if len(ids) > CONTEXT_TOKENS:
        raise ValueError(f"the negative needs {len(ids)} of CLIP's {CONTEXT_TOKENS} positions; shorten it")
    ids += [pipe.tokenizer.pad_token_id] * (CONTEXT_TOKENS - len(ids))
    with torch.no_grad():
        return encode_with_tokens(pipe.text_encoder, torch.tensor([ids]), tokens.select(cells))


def read_folder(folder: str | Path) -> tuple[torch.Tensor, list[str], list[list]]:
    """A captioned image folder: ``metadata.jsonl`` (the Hugging Face imagefolder layout) with one line per image,
    {"file_name": ..., "text": caption, "boxes": [[x0, y0, x1, y1], ...]} (boxes in pixels; [] when the detector
    found nothing). Images ([N, 3, H, W] in [-1, 1]) must all have one size."""
    import json

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: a Geom-Erasing data folder has images and a metadata.jsonl with "
                                '{"file_name", "text", "boxes"} per line')
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    images = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB"), dtype=np.float32) for r in rows]
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"{folder}: the images differ in size; resize them to the model's resolution first")
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    return pixels, [r.get("text", "") for r in rows], [r.get("boxes", []) for r in rows]


def shapes_data(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str], list[list]]:
    """The shapes world's training images with their stamps' boxes, as a detector would report them."""
    from .shapes import data

    images, captions, specs = data.batch(seed, n)
    boxes = [[data.stamp_box(s.stamp)] if s.stamp is not None else [] for s in specs]
    return torch.from_numpy(images), captions, boxes


def run_cli(args) -> int:
    """`erasekit train-geom`: location tokens for the shapes world's model (or another pixel-space one)."""
    import time

    from .shapes.model import ShapesPipeline

    pipe = ShapesPipeline.load(args.model) if args.model else ShapesPipeline.load()
    images, captions, boxes = read_folder(args.data) if args.data else shapes_data(args.images, args.seed)
    config = GeomTrainConfig(grid=args.grid, alpha=args.alpha, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed)
    every = max(1, config.steps // 20)
    started = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == config.steps - 1:
            print(f"step {step + 1}/{config.steps}  weighted loss {loss:.4f}  ({time.perf_counter() - started:.0f} s)",
                  flush=True)

    tokens = train_location_tokens(pipe, images, captions, boxes, args.concept, config, family="shapes",
                                   progress=progress)
    tokens.save(args.out)
    print(f"wrote {args.out}: {len(tokens.cells)} location tokens of {args.concept!r} ({tokens.grid}x{tokens.grid}, "
          f"{tokens.width} wide) in {time.perf_counter() - started:.0f} s")
    return 0
