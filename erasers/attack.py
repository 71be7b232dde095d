"""UnlearnDiffAtk (Zhang et al. 2023, "To generate or not? Safety-driven unlearned diffusion models are still easy
to generate unsafe images"): an adversarial prompt prefix found with the erased model's own denoiser.

The erased model is used as a diffusion classifier. For a prompt c and an image x0 of the erased concept, drawn by
the *original* model, k prefix token embeddings δ are optimised so that the erased model denoises x0 well when
conditioned on [δ; c]:

    min_δ  E_{t,ε} ‖ ε_erased(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, E([δ; c])) − ε ‖²

If that prompt lets the erased model reconstruct the concept, it also lets it generate the concept. The prompt that
is then evaluated is the discrete one (δ projected to the nearest vocabulary tokens), as in UnlearnDiffAtk; the
continuous prefix can be evaluated instead (`discrete=False`), as AdvUnlearn's inner attacker does.

Works on any diffusers-like pipeline with `unet`, `text_encoder`, `tokenizer` and `scheduler` (SD1.x/SD2.x and the
shapes world's ShapesPipeline); for latent models the targets are latents (VAE-encoded images times the VAE's
scaling factor), for the shapes world pixels in [-1, 1]. Every erasure of the pack works on it unchanged: the
closed-form ones and AdvUnlearn change weights, SPM hooks the UNet and records token ids at the text encoder, and
the prefix enters through `soft_prompt.encode`, which keeps the text encoder's hooks running.

Defaults (k = 5, 40 steps, Adam lr 0.01) are those of the official nudity config, OPTML-Group/Diffusion-MU-Attack
configs/nudity/text_grad_esd_nudity_classifier.json (`prefix_k`, k 5, iteration 40, lr 0.01; its object configs
use k = 3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import soft_prompt
from .frozen import frozen
from .text import CONTEXT_TOKENS

K = 5
STEPS = 40
LR = 0.01


@dataclass
class AttackResult:
    """One attacked prompt per row. Generate with `contexts` (the UNet's encoder_hidden_states; `prompt_embeds=` in
    diffusers, `context=` for ShapesPipeline), or re-encode `ids` with the pipeline's text encoder when discrete."""
    ids: Tensor  # [B, 77] the attacked prompt: BOS, prefix, prompt, EOS, padding (projected ids when discrete)
    contexts: Tensor  # [B, 77, d] what the UNet is conditioned on for that prompt (no grad)
    prefix: Tensor  # [B, k, d] float32: the optimised soft tokens δ
    prefix_ids: Tensor  # [B, k] the vocabulary tokens nearest δ (the discrete prefix)
    initial_prefix: Tensor  # [B, k, d] δ before optimisation (random vocabulary tokens)
    hard_prompts: list[str]  # the discrete attacked prompts, decoded (for reading; `ids` is what counts)
    losses: Tensor  # [steps, B] each prompt's attack loss at each step (its own t and ε)
    discrete: bool


def _row_seed(seed: int, row: int) -> int:
    """A prompt's stream depends only on (attack seed, its own seed): batching or chunking does not change it."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(row) & 0xFFFFFFFF]).generate_state(1, np.uint64)[0])


def _untypable_ids(tokenizer, rows: int) -> list[int]:
    """Embedding rows no typed prompt reaches: special tokens (the tokenizer only frames prompts with them) and rows
    past the tokenizer's vocabulary (a table padded, or a tokenizer smaller than its encoder's table)."""
    return sorted(set(tokenizer.all_special_ids) | set(range(len(tokenizer), rows)))


def _check_pipeline(pipe) -> None:
    missing = [name for name in ("unet", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(f"the attack needs a pipeline with unet, text_encoder, tokenizer and scheduler; "
                         f"missing: {', '.join(missing)}")
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("SDXL pipelines are not supported: their UNet also takes pooled text embeddings and time "
                         "ids, and their context joins two text encoders")
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction type {prediction!r} (epsilon or v_prediction)")


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def attack_loss(pipe, ids: Tensor, prefix: Tensor | None, targets: Tensor, timesteps: Tensor,
                noise: Tensor) -> Tensor:
    """Per prompt: the erased model's denoising error on its target, mean over elements, conditioned on `ids` with
    positions 1..k set to `prefix` (None: `ids` as they are). Differentiable in `prefix`.

    targets [B, C, H, W] are x0 in the UNet's input space; timesteps [B] ints; noise like targets."""
    device, dtype = _device_dtype(pipe.unet)
    alphas = pipe.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)[timesteps.to(device)]
    a = alphas.view(-1, *([1] * (targets.dim() - 1)))
    x0, eps = targets.to(device, torch.float32), noise.to(device, torch.float32)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    context = soft_prompt.encode(pipe.text_encoder, ids, prefix)
    pred = pipe.unet(noisy.to(dtype), timesteps.to(device), encoder_hidden_states=context.to(dtype)).sample
    # An SD2-768 UNet predicts v, not ε; the loss compares it with the v of the same (x0, ε, t).
    if pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        target = a.sqrt() * eps - (1 - a).sqrt() * x0
    else:
        target = eps
    return (pred.float() - target).pow(2).flatten(1).mean(1)


def _attack_rows(pipe, prompts: list[str], targets: Tensor, row_seeds: list[int], k: int, steps: int, lr: float,
                 weight_decay: float, discrete: bool, seed: int) -> AttackResult:
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    device, _ = _device_dtype(pipe.unet)
    generators = [torch.Generator().manual_seed(_row_seed(seed, s)) for s in row_seeds]
    ids = soft_prompt.prefixed_ids(tokenizer, prompts, k).to(device)
    table = text_encoder.get_input_embeddings().weight.detach()
    untypable = _untypable_ids(tokenizer, table.shape[0])
    excluded = set(untypable)
    allowed = torch.tensor([i for i in range(table.shape[0]) if i not in excluded])
    init_ids = torch.stack([allowed[torch.randint(len(allowed), (k,), generator=g)] for g in generators])
    initial = table[init_ids.to(table.device)].float().to(device)
    prefix = initial.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([prefix], lr=lr, weight_decay=weight_decay)
    train_steps = int(pipe.scheduler.config.num_train_timesteps)
    losses = []
    for _ in range(steps):
        t = torch.stack([torch.randint(train_steps, (), generator=g) for g in generators])
        noise = torch.stack([torch.randn(targets.shape[1:], generator=g) for g in generators])
        per_prompt = attack_loss(pipe, ids, prefix, targets, t, noise)
        optimizer.zero_grad(set_to_none=True)
        # Summed, not averaged: each δ_i gets its own prompt's gradient whatever the batch size.
        per_prompt.sum().backward()
        optimizer.step()
        losses.append(per_prompt.detach().cpu())
    with torch.no_grad():
        # Only typable tokens: otherwise the hard prompt could not be written down as a prompt.
        prefix_ids = soft_prompt.nearest_tokens(text_encoder, prefix, exclude=untypable).to(device)
        hard_ids = ids.clone()
        hard_ids[:, 1:1 + k] = prefix_ids
        final_ids = hard_ids if discrete else ids
        contexts = soft_prompt.encode(text_encoder, final_ids, None if discrete else prefix.detach())
    return AttackResult(
        ids=final_ids.cpu(), contexts=contexts.detach(), prefix=prefix.detach().cpu(), prefix_ids=prefix_ids.cpu(),
        initial_prefix=initial.cpu(),
        hard_prompts=[tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in hard_ids.cpu()],
        losses=torch.stack(losses) if losses else torch.zeros(0, len(prompts)), discrete=discrete)


def unlearn_diff_attack(pipe, prompts: Sequence[str], targets: Tensor, *, seeds: Sequence[int] | None = None,
                        k: int = K, steps: int = STEPS, lr: float = LR, weight_decay: float = 0.0,
                        discrete: bool = True, seed: int = 0, batch_size: int | None = None) -> AttackResult:
    """Attack each prompt against the pipeline as it is now (erasure attached): one δ per prompt, all prompts in one
    batched UNet forward per step (or `batch_size` at a time), Adam on δ, a fresh t and ε per prompt and step.

    targets [B, C, H, W]: one image of the concept per prompt, drawn by the original model, in the UNet's input
    space. `seeds` (default 0..B-1) with `seed` fix each prompt's random stream (initial tokens, t, ε), so a
    prompt's result does not depend on the others in the batch. The pipeline's weights are never changed and get
    no gradients."""
    prompts = list(prompts)
    _check_pipeline(pipe)
    if len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} target images: one target per prompt")
    if k < 1 or k > CONTEXT_TOKENS - 2:
        raise ValueError(f"k must be 1..{CONTEXT_TOKENS - 2} prefix tokens, got {k}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    row_seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if len(row_seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(row_seeds)} seeds")
    if not prompts:
        raise ValueError("no prompts to attack")
    size = batch_size or len(prompts)
    targets = targets.detach()
    with frozen(pipe.unet, pipe.text_encoder):  # gradients reach δ only
        parts = [_attack_rows(pipe, prompts[i:i + size], targets[i:i + size], row_seeds[i:i + size], k, steps, lr,
                              weight_decay, discrete, seed)
                 for i in range(0, len(prompts), size)]
    if len(parts) == 1:
        return parts[0]
    return AttackResult(
        ids=torch.cat([p.ids for p in parts]), contexts=torch.cat([p.contexts for p in parts]),
        prefix=torch.cat([p.prefix for p in parts]), prefix_ids=torch.cat([p.prefix_ids for p in parts]),
        initial_prefix=torch.cat([p.initial_prefix for p in parts]),
        hard_prompts=[h for p in parts for h in p.hard_prompts],
        losses=torch.cat([p.losses for p in parts], dim=1), discrete=discrete)
