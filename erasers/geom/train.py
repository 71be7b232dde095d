"""Geom-Erasing training in the paper's two settings.

*Model removal* (the concept came with a pre-trained model): learn only the location-token embeddings; UNet and
text encoder stay frozen. Each training caption with a detector box becomes "caption concept ⟨cells the box
covers⟩"; the new tokens get ids past the tokenizer's vocabulary and their vectors are appended to the (frozen)
token-embedding table for the forward pass, which is how ComfyUI applies textual inversions too.

*Data removal* (the concept was injected by the training data): fine-tune a copy of the UNet and the location
tokens together on all the captioned data, with the same caption extension for images that show the concept and
the captions of the others unchanged. The text encoder stays frozen. The model learns that a caption without the
concept's name means an image without it, and the name plus the tokens become a negative prompt that names it.
Some of the time a caption's words are dropped so that the unconditional prediction stays trained for
classifier-free guidance; the concept's name and tokens stay, because the negative prompt is exactly those alone
and the model must have seen them so. (Dropping them too left "stamp" plus the corner tokens meaning "something in
the corners", and as a negative it cost the shapes world shape accuracy: docs/shapes-world.md, Geom-Erasing.)

In both, the denoising loss is re-weighted per grid cell: with T cells of which K hold the concept,
w = T/(K+α(T−K)) inside and αT/(K+α(T−K)) outside (Σw = T), so α > 1 down-weights the concept's pixels;
optionally times the min-SNR-γ weight per sample (the shapes world's own training objective).

Works on pipelines whose UNet denoises the images directly (the shapes world); images of latent-diffusion models
would first need their VAE latents, which this module does not compute.

Data-removal output folder (``save_data_removal`` / ``load_data_removal``): ``unet/`` (diffusers folder:
config.json + diffusion_pytorch_model.safetensors) and ``<concept>.safetensors`` (the location tokens, format in
geom_erasing.py; spaces in the concept's name become "-"). The text encoder, tokenizer and scheduler are the base
model's, unchanged.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..io.clip_names import to_model_names
from ..text import CONTEXT_TOKENS
from ..training.frozen import frozen
from .negatives import LocationTokens, cells_of_box, parse_cells

TOKEN_WEIGHT = "text_model.embeddings.token_embedding.weight"
SETTINGS = ("model", "data")


@dataclass
class GeomTrainConfig:
    setting: str = "model"  # "model": only the location tokens; "data": a copy of the UNet with them
    grid: int = 3
    alpha: float = 2.0  # > 1: the concept's pixels weigh less (the paper's re-weighting); 1: plain loss
    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-3  # of the location tokens
    unet_lr: float = 2e-4  # data setting only
    caption_dropout: float = 0.1  # data setting only: the fraction of captions whose words are dropped (CFG)
    min_snr_gamma: float = 0.0  # > 0: min-SNR-γ weighting per sample (ε-prediction); 0: the paper's plain loss
    warmup: int = 0  # data setting: steps of linear learning-rate warm-up
    seed: int = 0

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown Geom-Erasing setting {self.setting!r}; known: {', '.join(SETTINGS)}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (1 is the plain loss, > 1 down-weights the concept's pixels), got "
                             f"{self.alpha}: pass --alpha 2, say")


# The shapes world's data-removal run: its min-SNR-5 objective (shapes/train.py) at half its batch, and
# captions' words dropped 40% of the time, four times the world's CFG rate: each dropped caption of a stamped image
# is a lesson in what the negative prompt means, and rarer drops barely taught it. α = 16: the less the stamp's cells
# weigh, the less the fine-tuning rehearses drawing a stamp, and larger α kept cutting the stamp rate without costing
# shape accuracy. 640 steps keep the run inside a 20-minute budget on one CPU thread. The sweep behind each value:
# docs/shapes-world.md, Geom-Erasing.
SHAPES_DATA_SETTING = dict(steps=640, batch_size=32, unet_lr=6e-4, warmup=20, caption_dropout=0.4, min_snr_gamma=5.0,
                           alpha=16.0)
SHAPES_IMAGES = {"model": 2048, "data": 4096}  # rendered training images; the data setting sees all of them


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
    return torch.func.functional_call(text_encoder, to_model_names({TOKEN_WEIGHT: weight}, text_encoder), (ids,))[0]


@dataclass
class _Prepared:
    """Training tensors shared by both settings."""
    images: torch.Tensor
    ids: torch.Tensor  # [N, 77]: captions, extended where the image shows the concept
    weights: torch.Tensor  # [N, 1, H, W]
    bare: torch.Tensor  # [N, 77]: the caption with its words dropped (the concept's name and tokens stay)
    vectors: torch.Tensor  # [cells, width], the initial location tokens
    cells: list[int]


def _prepare(pipe, images, captions, boxes, concept: str, grid: int, alpha: float, stamped_only: bool) -> _Prepared:
    if not len(images) == len(captions) == len(boxes):
        raise ValueError(f"{len(images)} images, {len(captions)} captions and {len(boxes)} box lists: need one each")
    height, width = images.shape[-2:]
    cells = [sorted({c for box in image_boxes for c in cells_of_box(box, width, height, grid)})
             for image_boxes in boxes]
    if not any(cells):
        raise ValueError("no image has a detector box: nothing to learn the location tokens from")
    if stamped_only:  # only captions of images with the concept hold new tokens; the rest give them no gradient
        keep = [i for i, cs in enumerate(cells) if cs]
        images, captions, cells = images[keep], [captions[i] for i in keep], [cells[i] for i in keep]
    all_cells = parse_cells("everywhere", grid)
    tokenizer = pipe.tokenizer
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    new_ids = {c: table.shape[0] + i for i, c in enumerate(all_cells)}
    ids = torch.tensor([_caption_ids(tokenizer, cap, concept, cs, new_ids) for cap, cs in zip(captions, cells)])
    weights = torch.stack([weight_map(cs, grid, height, width, alpha) for cs in cells])[:, None]
    # Start every cell at the concept word's embedding (mean over its word pieces), as textual inversion does.
    concept_ids = tokenizer(concept, add_special_tokens=False)["input_ids"]
    vectors = table[concept_ids].mean(0).repeat(len(all_cells), 1).clone()
    bare = torch.tensor([_caption_ids(tokenizer, "", concept, cs, new_ids) for cs in cells])
    return _Prepared(images, ids, weights, bare, vectors, all_cells)


def _denoising_loss(unet, text_encoder, schedule, x0: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    vectors: torch.Tensor, generator: torch.Generator, min_snr_gamma: float) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(schedule.config.num_train_timesteps, (len(x0),), generator=generator)
    context = encode_with_tokens(text_encoder, ids, vectors)
    eps = unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
    per_sample = (weights * F.mse_loss(eps, noise, reduction="none")).mean((1, 2, 3))
    if min_snr_gamma > 0:
        snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    return per_sample.mean()


def _metadata(config: GeomTrainConfig) -> dict[str, str]:
    extra = {"alpha": str(config.alpha), "steps": str(config.steps), "setting": config.setting}
    if config.setting == "data":
        extra.update(unet_lr=str(config.unet_lr), warmup=str(config.warmup),
                     caption_dropout=str(config.caption_dropout), min_snr_gamma=str(config.min_snr_gamma),
                     seed=str(config.seed))
    return extra


def train_location_tokens(pipe, images: torch.Tensor, captions: Sequence[str], boxes: Sequence[Sequence],
                          concept: str, config: GeomTrainConfig | None = None, family: str = "",
                          progress: Callable[[int, float], None] | None = None) -> LocationTokens:
    """Model-removal setting: location tokens for `concept` from images ([N, C, H, W] in the UNet's input space),
    their captions and per image a list of detector boxes (x0, y0, x1, y1 in pixels, possibly empty), with the
    UNet and text encoder frozen. `progress(step, loss)` is called every step. The data setting, which also
    fine-tunes the UNet, is `train_data_removal`."""
    from diffusers import DDPMScheduler

    config = GeomTrainConfig() if config is None else config
    if config.setting != "model":
        raise ValueError(f"train_location_tokens trains the model-removal setting, not {config.setting!r}; the data "
                         "setting (UNet and tokens together) is train_data_removal")
    prep = _prepare(pipe, images, captions, boxes, concept, config.grid, config.alpha, stamped_only=True)
    text_encoder, unet = pipe.text_encoder, pipe.unet
    vectors = prep.vectors.requires_grad_(True)
    optimiser = torch.optim.AdamW([vectors], lr=config.lr, weight_decay=0.0)
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(config.seed)
    with frozen(text_encoder, unet):
        for step in range(config.steps):
            pick = torch.randint(len(prep.images), (config.batch_size,), generator=generator)
            loss = _denoising_loss(unet, text_encoder, schedule, prep.images[pick], prep.ids[pick],
                                   prep.weights[pick], vectors, generator, config.min_snr_gamma)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if progress is not None:
                progress(step, loss.item())
    return LocationTokens(concept, config.grid, prep.cells, vectors.detach().clone(), family, _metadata(config))


def _lr_scale(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up times a cosine decay to zero. Adam's first steps move every weight by about the full
    learning rate whatever the gradient's size, which knocks a trained UNet off its minimum; warming up avoids that.
    Without the decay the result is wherever the last noisy step left it, so seeds disagree; with it they agree
    (the shapes-world runs: docs/shapes-world.md, Geom-Erasing)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return warm * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_data_removal(pipe, images: torch.Tensor, captions: Sequence[str], boxes: Sequence[Sequence],
                       concept: str, config: GeomTrainConfig, family: str = "",
                       progress: Callable[[int, float], None] | None = None) -> tuple[LocationTokens, torch.nn.Module]:
    """Data-removal setting: fine-tune a copy of `pipe.unet` and the location tokens together on every image
    (arguments as train_location_tokens). Returns the tokens and the fine-tuned UNet (in eval mode); the caller's
    UNet and text encoder are left as they were. Deterministic given `config.seed` (and the thread count)."""
    from diffusers import DDPMScheduler

    if config.setting != "data":
        raise ValueError(f"train_data_removal trains the data setting; got a config for {config.setting!r}")
    prep = _prepare(pipe, images, captions, boxes, concept, config.grid, config.alpha, stamped_only=False)
    text_encoder = pipe.text_encoder
    unet = copy.deepcopy(pipe.unet).train()
    unet_params = list(unet.parameters())
    for p in unet_params:
        p.requires_grad_(True)
    vectors = prep.vectors.requires_grad_(True)
    # The UNet's group has the shapes world's own weight decay; token vectors none, as in the model setting.
    optimiser = torch.optim.AdamW([{"params": [vectors], "lr": config.lr, "weight_decay": 0.0},
                                   {"params": unet_params, "lr": config.unet_lr, "weight_decay": 0.01}])
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(config.seed)
    with frozen(text_encoder):
        for step in range(config.steps):
            pick = torch.randint(len(prep.images), (config.batch_size,), generator=generator)
            drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
            ids = torch.where(drop[:, None], prep.bare[pick], prep.ids[pick])
            loss = _denoising_loss(unet, text_encoder, schedule, prep.images[pick], ids, prep.weights[pick],
                                   vectors, generator, config.min_snr_gamma)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet_params, 1.0)  # as the shapes world was trained
            for group, base_lr in zip(optimiser.param_groups, (config.lr, config.unet_lr)):
                group["lr"] = base_lr * _lr_scale(step, config.steps, config.warmup)
            optimiser.step()
            if progress is not None:
                progress(step, loss.item())
    tokens = LocationTokens(concept, config.grid, prep.cells, vectors.detach().clone(), family, _metadata(config))
    return tokens, unet.eval()


def tokens_file(folder: str | Path, concept: str) -> Path:
    return Path(folder) / f"{concept.strip().replace(' ', '-')}.safetensors"


def save_data_removal(folder: str | Path, tokens: LocationTokens, unet) -> None:
    """`folder`/unet/ (diffusers, safetensors) and `folder`/<concept>.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    tokens.save(tokens_file(folder, tokens.concept))


def load_data_removal(folder: str | Path) -> tuple[torch.nn.Module, LocationTokens]:
    """The fine-tuned UNet (eval mode) and the location tokens of a data-removal folder; the text encoder,
    tokenizer and scheduler to use with them are the base model's."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "unet" / "config.json").is_file() or len(files) != 1:
        raise FileNotFoundError(f"{folder} is not a Geom-Erasing data-removal folder: it needs unet/ (diffusers) and "
                                f"one location-token .safetensors, found {[f.name for f in files]}")
    return UNet2DConditionModel.from_pretrained(folder / "unet").eval(), LocationTokens.load(files[0])


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
