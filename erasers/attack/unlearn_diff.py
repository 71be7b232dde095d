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

Two ways to run it:
- `unlearn_diff_attack`, the quick one: continuous δ, Adam on a fresh t each step, projected to tokens at the end,
  one attacked prompt per prompt. Its ASR is a floor.
- `unlearn_diff_search`, UnlearnDiffAtk's own protocol (attackers/text_grad_.py, `sequential`): δ is always typed,
  sampled each step from a learned distribution over the vocabulary; 40 steps at each of 50 fixed timesteps, small
  t first, and after each block the most likely prompt is drawn and checked, stopping at the first success (up to
  2,000 steps and 50 images per prompt). The leaderboard's ASRs (methods.md §5.4) are measured this way.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..text import CONTEXT_TOKENS
from ..training.frozen import frozen
from . import soft_prompt

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


def _typable_ids(tokenizer, rows: int) -> Tensor:
    """The embedding rows a typed prompt can reach, ascending: the ones an attack may choose its tokens from."""
    excluded = set(_untypable_ids(tokenizer, rows))
    return torch.tensor([i for i in range(rows) if i not in excluded])


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


def _checked_rows(pipe, prompts: list[str], targets: Tensor, seeds: Sequence[int] | None, k: int) -> list[int]:
    """Each prompt's seed (default: its row), after refusing inputs the attacks cannot run on."""
    _check_pipeline(pipe)
    if len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} target images: one target per prompt")
    if k < 1 or k > CONTEXT_TOKENS - 2:
        raise ValueError(f"k must be 1..{CONTEXT_TOKENS - 2} prefix tokens, got {k}")
    row_seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if len(row_seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(row_seeds)} seeds")
    if not prompts:
        raise ValueError("no prompts to attack")
    return row_seeds


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
    allowed = _typable_ids(tokenizer, table.shape[0])
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
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    prompts = list(prompts)
    row_seeds = _checked_rows(pipe, prompts, targets, seeds, k)
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


# --- UnlearnDiffAtk's own search ----------------------------------------------------------------------------------

SEARCH_TIMESTEPS = 50  # the classifier task's n_samples: t = 10, 30, …, 990 for 1000 training steps
SEARCH_WEIGHT_DECAY = 0.1  # text_grad's default, in every official config


@dataclass
class SearchResult:
    """One row per attacked prompt. `ids` is the prompt checked last: the one that succeeded where `success`."""
    ids: Tensor  # [B, 77] BOS, k typed prefix tokens, the prompt, EOS, padding
    hard_prompts: list[str]
    success: np.ndarray  # [B] bool
    checks: np.ndarray  # [B] images drawn and judged for the row (1 … timesteps)
    losses: Tensor  # [steps, B] each row's loss; NaN after the row stopped


class _SampledToken(torch.autograd.Function):
    """Forward: one token per distribution, drawn with that row's generator (a one-hot row). Backward: the
    one-hot's gradient clipped to [-1, 1] goes to the distribution (text_grad's STERandSelect). Drawn on the CPU,
    where the rows' generators live, so a row draws the same tokens on every device."""

    @staticmethod
    def forward(ctx, probabilities: Tensor, generators: list) -> Tensor:
        picks = torch.stack([torch.multinomial(p.detach().cpu().clamp_min(0), 1, generator=g).squeeze(-1)
                             for p, g in zip(probabilities, generators)])
        return torch.nn.functional.one_hot(picks, probabilities.shape[-1]).to(probabilities)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.nn.functional.hardtanh(grad), None


def project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of v (last dim) onto {u ≥ 0, Σu = 1} (Held et al.'s sort rule); text_grad
    finds the same point by bisection."""
    u = v.sort(-1, descending=True).values
    excess = u.cumsum(-1) - 1
    rank = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    last = (u - excess / rank > 0).to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)
    return (v - excess.gather(-1, last) / (last + 1).to(v.dtype)).clamp_min(0)


def search_timesteps(train_steps: int, n: int = SEARCH_TIMESTEPS) -> list[int]:
    """The fixed timesteps, small first: n evenly spaced, each in the middle of its interval."""
    return list(range(train_steps // n // 2, train_steps, train_steps // n))[:n]


def unlearn_diff_search(pipe, prompts: Sequence[str], targets: Tensor,
                        succeeded: Callable[[list[int], Tensor], np.ndarray], *, seeds: Sequence[int] | None = None,
                        k: int = K, iterations: int = STEPS, timesteps: int = SEARCH_TIMESTEPS, lr: float = LR,
                        weight_decay: float = SEARCH_WEIGHT_DECAY, seed: int = 0) -> SearchResult:
    """UnlearnDiffAtk's own protocol against the pipeline as it is now (erasure attached).

    Each prefix token is a distribution over the typable vocabulary, uniform at first; every step samples a token
    from each (so the UNet only ever sees typed prompts), takes the attack loss of `unlearn_diff_attack` at the
    block's timestep with fresh ε, and makes an Adam step (with weight decay) on the distributions, projected back
    onto the simplex. After each block of `iterations` steps, `succeeded(rows, ids)` is asked about the still
    unbroken rows, with ids [len(rows), 77] holding each distribution's most likely tokens; it should draw those
    prompts with their seeds and judge them. A row stops at its first success.

    `seeds` and `seed` fix each prompt's random stream (sampled tokens, ε), so a row's search does not depend on the
    other rows. The pipeline's weights are never changed and get no gradients."""
    if iterations < 0 or timesteps < 1:
        raise ValueError(f"iterations must be >= 0 and timesteps >= 1, got {iterations} and {timesteps}")
    prompts = list(prompts)
    row_seeds = _checked_rows(pipe, prompts, targets, seeds, k)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    device, _ = _device_dtype(pipe.unet)
    generators = [torch.Generator().manual_seed(_row_seed(seed, s)) for s in row_seeds]
    ids = soft_prompt.prefixed_ids(tokenizer, prompts, k).to(device)
    table = text_encoder.get_input_embeddings().weight.detach()
    allowed = _typable_ids(tokenizer, table.shape[0]).to(table.device)
    embeddings = table[allowed].float().to(device)
    distribution = torch.full((len(prompts), k, len(allowed)), 1.0 / len(allowed), device=device,
                              requires_grad=True)
    optimizer = torch.optim.Adam([distribution], lr=lr, weight_decay=weight_decay)
    targets = targets.detach()
    best = ids.clone()
    success = np.zeros(len(prompts), bool)
    checks = np.zeros(len(prompts), int)
    losses = []
    with frozen(pipe.unet, pipe.text_encoder):  # gradients reach the distributions only
        for t in search_timesteps(int(pipe.scheduler.config.num_train_timesteps), timesteps):
            rows = np.flatnonzero(~success).tolist()
            if not rows:
                break
            index = torch.tensor(rows, device=device)
            for _ in range(iterations):
                picked = _SampledToken.apply(distribution[index], [generators[r] for r in rows])
                noise = torch.stack([torch.randn(targets.shape[1:], generator=generators[r]) for r in rows])
                per_prompt = attack_loss(pipe, ids[index], picked @ embeddings, targets[rows],
                                         torch.full((len(rows),), t), noise)
                optimizer.zero_grad(set_to_none=True)
                per_prompt.sum().backward()  # summed: each row's distribution gets its own prompt's gradient
                optimizer.step()
                with torch.no_grad():  # a stopped row's distribution is never read again
                    distribution[index] = project_to_simplex(distribution[index])
                step = torch.full((len(prompts),), float("nan"))
                step[rows] = per_prompt.detach().cpu()
                losses.append(step)
            with torch.no_grad():
                best[index, 1:1 + k] = allowed[distribution[index].argmax(-1)].to(device)
            hits = np.asarray(succeeded(rows, best[index].cpu()), bool)
            if hits.shape != (len(rows),):
                raise ValueError(f"succeeded() returned {hits.shape} results for {len(rows)} prompts")
            checks[rows] += 1
            success[rows] = hits
    best = best.cpu()
    return SearchResult(ids=best,
                        hard_prompts=[tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in best],
                        success=success, checks=checks,
                        losses=torch.stack(losses) if losses else torch.zeros(0, len(prompts)))
