"""A float64 rebuild of what the official SPM inference computes (Con6924/SPM ``infer_spm.py``, commit 3dd762e), for
tests. It shares nothing with EraseKit's membrane, transport or hook code: it reads the files with safetensors,
finds the layers as ``SPMNetwork`` does and applies them as ``SPMLayer.forward`` does, so that a test comparing
EraseKit's ``uncond_gate="positive"``, ``combine="official"`` output with it checks EraseKit's path against an
independent one (methods.md §1.4).

What infer_spm.py does for each prompt, one prompt at a time:
1. Encodes the prompt and every erased concept (the files' ``prompts`` metadata, comma-split), padded to 77 tokens.
2. Scores each concept: the maximum of clipcos (cosine of the flattened padded contexts) and tokenuni (the share
   of the concept's token ids, special tokens removed, that the prompt holds) (`matching_scores`).
3. Gives SPM i the maximum score over its concepts, multiplies every tensor of its state dict by it and sums the
   state dicts over SPMs (`weighted_state`); loads the sums into a network whose scale α/r comes from the first
   file's metadata.
4. Runs the pipeline with that network active on the whole batch: the CFG batch [negative; prompt] is gated alike,
   by the positive prompt's score. `sample_euler_cfg` is that sampling loop, written out (Euler with an ε model,
   as diffusers' EulerDiscreteScheduler and ComfyUI's "euler" both are), recording each branch's prediction.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def read_spm(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """An SPM file's tensors (float64) and metadata, as ``load_state_dict`` of src/models/merge_spm.py reads it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).double() for k in f.keys()}, dict(f.metadata() or {})


def write_official_spm(path: str | Path, unet: nn.Module, prompts: str, seed: int, scale: float = 0.05) -> Path:
    """A random rank-1 SPM file as train_spm.py writes it for a diffusers UNet (SPMNetwork's discovery and names)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in diffusers_layers(unet).items():
        if isinstance(module, nn.Conv2d):
            down = torch.randn(1, module.in_channels, *module.kernel_size, generator=g)
            up = torch.randn(module.out_channels, 1, 1, 1, generator=g)
        else:
            down = torch.randn(1, module.in_features, generator=g)
            up = torch.randn(module.out_features, 1, generator=g)
        state[f"{name}.lora_down.weight"] = scale * down
        state[f"{name}.lora_up.weight"] = scale * up
        state[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(state, str(path), {"prompts": prompts, "rank": "1", "alpha": "1.0"})
    return Path(path)


def diffusers_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """SPMNetwork's layers of a diffusers UNet: every Linear/Conv2d inside a Transformer2DModel, by its SPM name
    (``lora_unet_`` + the module path with dots as underscores)."""
    return {name: unet.get_submodule(path) for name, path in diffusers_layer_paths(unet).items()}


def diffusers_layer_paths(unet: nn.Module) -> dict[str, str]:
    """SPM name → diffusers module path of each layer SPMNetwork wraps."""
    paths = {}
    for name, module in unet.named_modules():
        if module.__class__.__name__ != "Transformer2DModel":
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                paths[f"lora_unet.{name}.{child_name}".replace(".", "_")] = f"{name}.{child_name}"
    return paths


def matching_scores(prompt_context: Tensor, prompt_ids: Iterable[int], concept_contexts: Tensor,
                    concept_ids: Sequence[Iterable[int]], special_ids: Iterable[int]) -> Tensor:
    """calculate_matching_score with "clipcos_tokenuni": one score per concept (float64)."""
    clipcos = torch.cosine_similarity(prompt_context.double().flatten(), concept_contexts.double().flatten(1), dim=-1)
    special = set(special_ids)
    prompt_set = set(prompt_ids) - special
    tokenuni = []
    for ids in concept_ids:
        concept_set = set(ids) - special
        tokenuni.append(len(prompt_set & concept_set) / len(concept_set))
    return torch.maximum(clipcos, torch.tensor(tokenuni, dtype=torch.float64))


def multipliers(scores: Tensor, counts: Sequence[int]) -> list[float]:
    """Each SPM's multiplier: the maximum score over its concepts (the files' concepts in order)."""
    return [float(part.max()) for part in torch.split(scores, list(counts))]


def weighted_state(states: Sequence[dict[str, Tensor]], factors: Sequence[float]) -> dict[str, Tensor]:
    """Every tensor of SPM i times its multiplier, summed over the SPMs (infer_spm.py's ``weighted_spm``)."""
    weighted: dict[str, Tensor] = {}
    for state, factor in zip(states, factors):
        for key, value in state.items():
            weighted[key] = weighted[key] + value * factor if key in weighted else value * factor
    return weighted


@contextmanager
def spm_network(layers: dict[str, nn.Module], state: dict[str, Tensor], metadata: dict[str, str]):
    """The loaded SPMNetwork, active (``with network:``): each layer's output plus up(down(x)) · α/r, with α and r
    from the first file's metadata (SPMLayer fixes its scale when built; the loaded .alpha is never read)."""
    rank, alpha = int(float(metadata["rank"])), float(metadata["alpha"])
    scale = (alpha or rank) / rank
    handles = []

    def hook_for(module: nn.Module, down: Tensor, up: Tensor):
        def add(mod, args, output):
            x = args[0]
            if isinstance(module, nn.Conv2d):
                h = F.conv2d(x, down.to(x.dtype), None, module.stride, module.padding)
                return output + F.conv2d(h, up.to(x.dtype)) * scale
            return output + F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype)) * scale
        return add

    try:
        for name, module in layers.items():
            down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
            handles.append(module.register_forward_hook(hook_for(module, down, up)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def sample_euler_cfg(eps: Callable[[Tensor, Tensor, Tensor], Tensor], start: Tensor, sigmas: Sequence[float],
                     timesteps: Sequence[float], cond: Tensor, uncond: Tensor, guidance: float) -> dict[str, list]:
    """Euler sampling of an ε model with CFG over the batch [uncond; cond], in float64.

    `eps(model_input, t, context)` is the UNet; the input is x / √(σ² + 1); `sigmas` has one more entry than
    `timesteps` (the last, 0, where sampling ends). Returns per step the latents x, and each branch's ε and
    denoised x − σ·ε; and the final latents under "final".
    """
    x = start.double()
    out: dict[str, list] = {"x": [], "eps_uncond": [], "eps_cond": [], "denoised_uncond": [], "denoised_cond": []}
    context = torch.cat([uncond, cond]).double()
    for i, t in enumerate(timesteps):
        sigma, following = float(sigmas[i]), float(sigmas[i + 1])
        model_input = torch.cat([x, x]) / (sigma ** 2 + 1) ** 0.5
        e_uncond, e_cond = eps(model_input, torch.full((2 * len(x),), float(t), dtype=torch.float64),
                               context).double().chunk(2)
        guided = e_uncond + guidance * (e_cond - e_uncond)
        out["x"].append(x)
        out["eps_uncond"].append(e_uncond)
        out["eps_cond"].append(e_cond)
        out["denoised_uncond"].append(x - sigma * e_uncond)
        out["denoised_cond"].append(x - sigma * e_cond)
        x = x + guided * (following - sigma)  # d = (x − denoised)/σ = ε
    out["final"] = [x]
    return out
