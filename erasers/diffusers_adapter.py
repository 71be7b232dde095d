"""Erasures on diffusers pipelines: attach merges the deltas into the UNet's weights, detach restores the exact
original tensors (kept aside at the first attach), so outputs after detach are bit-identical to before."""
from __future__ import annotations

import torch

from .erasure import Erasure
from .families import FamilyError, kv_family

_ORIGINALS = "_erasekit_originals"


def _unet(pipe_or_unet) -> torch.nn.Module:
    return getattr(pipe_or_unet, "unet", pipe_or_unet)


def unet_kv_weights(pipe_or_unet) -> dict[str, torch.Tensor]:
    """attn2 to_k/to_v weights by parameter name (as they are now, attached erasures included)."""
    unet = _unet(pipe_or_unet)
    out = {name: p for name, p in unet.named_parameters() if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    if not out:
        raise FamilyError("this UNet has no cross-attention (attn2.to_k/to_v) layers")
    return out


def unet_family(pipe_or_unet) -> str:
    return kv_family(unet_kv_weights(pipe_or_unet)).name


@torch.no_grad()
def attach(pipe_or_unet, erasure: Erasure, strength: float = 1.0) -> None:
    """Add `strength` × the erasure's deltas to the UNet weights; several attaches stack."""
    unet = _unet(pipe_or_unet)
    originals: dict[str, torch.Tensor] = getattr(unet, _ORIGINALS, {})
    params = dict(unet.named_parameters())
    base = {f"unet.{n}": originals.get(n, params[n]) for n in (k.removeprefix("unet.") for k in erasure.layers)
            if n in params}
    # Refused whole before any weight changes: a misfit found halfway would leave the UNet half-erased.
    erasure.check_base(unet_family(unet), base)
    for name, delta in erasure.layers.items():
        path = name.removeprefix("unet.")
        weight = unet.get_parameter(path)
        originals.setdefault(path, weight.detach().clone())
        update = delta.materialize(torch.float32, weight.device)
        weight.copy_((weight.float() + strength * update).to(weight.dtype))
    setattr(unet, _ORIGINALS, originals)


@torch.no_grad()
def detach(pipe_or_unet) -> None:
    """Restore every weight an attach changed to its exact original."""
    unet = _unet(pipe_or_unet)
    for path, original in getattr(unet, _ORIGINALS, {}).items():
        unet.get_parameter(path).copy_(original)
    if hasattr(unet, _ORIGINALS):
        delattr(unet, _ORIGINALS)
