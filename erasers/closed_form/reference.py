"""The closed-form edits computed the way the official code does: one dense n×n inverse per layer.

This is the yardstick, not the implementation: tests compare closed_form.py against it, and `erasekit bench
closed-form` times both. It shares no code with closed_form.py on purpose.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def uce_layer(w0: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, lam: float, erase_scale: float,
              preserve: torch.Tensor | None = None, preserve_scale: float = 0.0,
              prior: torch.Tensor | None = None) -> torch.Tensor:
    """W* = (λW₀ + η_e Σ v cᵀ + η_p Σ W₀ c_p c_pᵀ + W₀Π)(λI + η_e Σ c cᵀ + η_p Σ c_p c_pᵀ + Π)⁻¹.

    keys: m×n rows c; values: d×m columns v*. Returns W* in the dtype of w0.
    """
    n = w0.shape[1]
    mat1 = lam * w0 + erase_scale * values @ keys
    mat2 = lam * torch.eye(n, dtype=w0.dtype, device=w0.device) + erase_scale * keys.T @ keys
    if preserve is not None:
        mat1 = mat1 + preserve_scale * (w0 @ preserve.T) @ preserve
        mat2 = mat2 + preserve_scale * preserve.T @ preserve
    if prior is not None:
        mat1 = mat1 + w0 @ prior
        mat2 = mat2 + prior
    return mat1 @ torch.inverse(mat2)


def uce(weights: Mapping[str, torch.Tensor], keys: torch.Tensor, guides: torch.Tensor, *, lam: float = 0.5,
        erase_scale: float = 1.0, preserve: torch.Tensor | None = None, preserve_scale: float = 1.0,
        technique: str = "replace", blocks: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Edited weights W* per layer (replace: v* = W₀g; tensor: v* = W₀g − (u·W₀g)u over each pair's block)."""
    out = {}
    for name, w0 in weights.items():
        values = w0 @ guides.T
        if technique == "tensor":
            cols = []
            start = 0
            for length in blocks or [keys.shape[0]]:
                o = w0 @ keys[start:start + length].T
                u = o / o.norm()
                g = values[:, start:start + length]
                cols.append(g - (u * g).sum() * u)
                start += length
            values = torch.cat(cols, dim=1)
        out[name] = uce_layer(w0, keys, values, lam=lam, erase_scale=erase_scale, preserve=preserve,
                              preserve_scale=preserve_scale)
    return out


def rece_embedding(edited: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor], concept: torch.Tensor,
                   reg: float) -> torch.Tensor:
    """RECE's close_regzero: c′ = (Σ W′ᵀW′ + λ_r I)⁻¹ Σ W′ᵀW c, summed over all layers (rows of concept)."""
    n = concept.shape[1]
    mat1 = reg * torch.eye(n, dtype=concept.dtype, device=concept.device)
    mat2 = torch.zeros(n, n, dtype=concept.dtype, device=concept.device)
    for name, w_edit in edited.items():
        mat1 = mat1 + w_edit.T @ w_edit
        mat2 = mat2 + w_edit.T @ original[name]
    return concept @ (torch.inverse(mat1) @ mat2).T


def rece(edited: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor], concepts: Sequence[torch.Tensor],
         guides: Sequence[torch.Tensor], *, epochs: int, reg: float, lam: float = 0.1, erase_scale: float = 1.0,
         retain: torch.Tensor | None = None, preserve_scale: float = 0.1) -> dict[str, torch.Tensor]:
    """RECE epochs from `edited` weights: derive c′ per concept, then erase c′ → guide on the current weights."""
    current = dict(edited)
    for _ in range(epochs):
        adversarial = torch.cat([rece_embedding(current, original, c, reg) for c in concepts])
        guide = torch.cat(list(guides))
        current = {
            name: uce_layer(w, adversarial, w @ guide.T, lam=lam, erase_scale=erase_scale, preserve=retain,
                            preserve_scale=preserve_scale)
            for name, w in current.items()
        }
    return current


def trce_stage1(weights: Mapping[str, torch.Tensor], malicious: torch.Tensor, safe: torch.Tensor, *,
                prior: torch.Tensor, preserve_scale: float) -> dict[str, torch.Tensor]:
    """TRCE's closed_form_refinement with λ = 0 and only the first-[EoT] token weighted."""
    out = {}
    n_pairs = malicious.shape[0]
    for name, w0 in weights.items():
        mat1 = (w0 @ safe.T) @ malicious / n_pairs + preserve_scale * (preserve_scale * (w0 @ prior))
        mat2 = malicious.T @ malicious / n_pairs + preserve_scale * (preserve_scale * prior)
        out[name] = mat1 @ torch.inverse(mat2)
    return out
