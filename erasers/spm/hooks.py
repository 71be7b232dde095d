"""SPM membranes on diffusers pipelines, with Facilitated Transport (FT) decided per sample of each UNet batch.

Hooks only: no parameter is touched, so outputs after `detach_membranes` are bit-identical to before.

How the gates reach the layers:
1. A forward hook on the pipeline's (first) text encoder records each prompt's token set under a hash of each row
   of every context it produces (last and all hidden states, each as float32/float16/bfloat16, so the pipeline's
   choice of hidden state and its dtype cast still match).
2. A pre-hook on the UNet hashes each row of the `encoder_hidden_states` it receives and gets that row's strengths
   from a cache, computing them once per distinct context with `spm.transport_strengths` (clipcos from the row as
   received, the token overlap from the record; SDXL's rows are looked up by their CLIP-L part). The [B, M]
   strengths live on a shared state until the UNet call returns.
3. A forward hook on every target module adds ``ΔW·x`` at the strengths (``stack.add_to``), so one UNet call can
   mix samples with different gates: the uncond half of a CFG batch is gated by its own (negative) prompt.

Unlike infer_spm.py, which gates the whole generation (cond and uncond) by the positive prompt's strength, each
sample here gets the strength of its own context.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..diffusers_adapter import unet_family
from ..erasure import FamilyMismatchError
from ..families import FAMILIES
from ..text import CONTEXT_TOKENS, Encoder, TransformersEncoder
from .membrane import (
    Combine,
    Concepts,
    Membrane,
    MembraneStack,
    Metric,
    is_target,
    row_keys,
    stack_membranes,
    token_sets,
    transport_strengths,
)

_STATE = "_erasekit_membranes"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CACHE_LIMIT = 100_000  # entries per cache; beyond it the cache starts afresh (a few MB)


class TransportFallbackWarning(UserWarning):
    """A context reached the UNet without passing the hooked text encoder: FT scores it by clipcos alone."""


def _unet(pipe_or_unet) -> nn.Module:
    return getattr(pipe_or_unet, "unet", pipe_or_unet)


def _base(module: nn.Module) -> nn.Module:
    """The Linear/Conv2d itself, also when a PEFT LoRA wraps it."""
    return getattr(module, "base_layer", module)


def membrane_targets(pipe_or_unet) -> dict[str, nn.Module]:
    """The modules SPM edits, by diffusers module path: every Linear/Conv2d of the UNet's Transformer2D blocks."""
    return {path: module for path, module in _unet(pipe_or_unet).named_modules()
            if is_target(path) and isinstance(_base(module), (nn.Linear, nn.Conv2d))}


class _Transport:
    """FT for one attachment: the token record filled by the text encoder and the per-context strength cache."""

    def __init__(self, concepts: Concepts, metric: Metric, special_ids: Sequence[int], width: int):
        self.concepts, self.metric, self.special_ids, self.width = concepts, metric, special_ids, width
        self.tokens: dict[bytes, frozenset[int]] = {}
        self.strengths: dict[bytes, Tensor] = {}
        self.warned = False

    def record(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        sets = token_sets(ids, self.special_ids)
        if len(self.tokens) > _CACHE_LIMIT:
            self.tokens.clear()
        for candidate in (output[0], *(getattr(output, "hidden_states", None) or ())):
            for dtype in _DTYPES:
                self.tokens.update(zip(row_keys(candidate.to(dtype)), sets))

    def gates(self, context: Tensor) -> Tensor:
        """Strengths [B, M] (float32, CPU) of each context row, computed once per distinct row."""
        if len(self.strengths) > _CACHE_LIMIT:
            self.strengths.clear()
        keys = row_keys(context)
        new = {key: b for b, key in enumerate(keys) if key not in self.strengths}
        if new:
            rows = context[list(new.values())]
            # SDXL pipelines encode an empty negative prompt as zeros (force_zeros_for_empty_prompt): no tokens.
            tokens = [self.tokens.get(key, frozenset() if not row.any() else None)
                      for key, row in zip(row_keys(rows[..., : self.width]), rows)]
            if None in tokens and not self.warned:
                self.warned = True
                warnings.warn("a prompt context reached the UNet without passing through the pipeline's text encoder "
                              "(prompt_embeds given directly?): Facilitated Transport scores it by clipcos alone",
                              TransportFallbackWarning, stacklevel=2)
            self.strengths.update(zip(new, transport_strengths(rows, tokens, self.concepts, self.metric)))
        return torch.stack([self.strengths[key] for key in keys])


class _Attached:
    """What attach_membranes installed on a UNet; `current` holds the strengths while a UNet call runs."""

    def __init__(self, strengths: Tensor, transport: _Transport | None):
        self.strengths = strengths  # [M] user strengths, multiplying the FT gates
        self.transport = transport
        self.current: Tensor | None = None if transport else strengths[None]
        self.handles: list = []
        self._context: tuple[Tensor, int, Tensor] | None = None  # (context, its version, its gates on its device)

    def gates(self, context: Tensor) -> Tensor:
        if self.transport is None:
            return self.strengths[None].expand(context.shape[0], -1)
        return self.transport.gates(context) * self.strengths

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if context is None:
            raise ValueError("SPM Facilitated Transport needs the UNet's encoder_hidden_states")
        # A sampler passes the same context tensor at every step: its gates are reused rather than its rows hashed
        # again, which would copy them to the host and wait for the GPU each step. Holding the tensor keeps its
        # identity from being reused; an in-place change bumps its version.
        if self._context is None or self._context[0] is not context or self._context[1] != context._version:
            self._context = (context, context._version, self.gates(context).to(context.device))
        self.current = self._context[2]

    def leave(self, module: nn.Module, args: tuple, output) -> None:
        self.current = None


class _LayerHook:
    def __init__(self, path: str, state: _Attached, stack: MembraneStack, base: nn.Module):
        self.path, self.state, self.stack = path, state, stack
        self.conv = ({"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
                     if isinstance(base, nn.Conv2d) else {})

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        strengths = self.state.current
        if strengths is None:
            raise RuntimeError(f"{self.path} ran outside a UNet call: Facilitated Transport has no context to gate "
                               "its SPM membrane")
        x = args[0]
        if strengths.device != x.device:  # FT off: the fixed strengths move to the model's device once
            strengths = self.state.current = strengths.to(x.device)
        self.stack = self.stack.to(x.device, x.dtype)
        return self.stack.add_to(output, x, strengths, **self.conv)


def _pipeline_encoder(pipe) -> Encoder:
    """Encode concepts as the pipeline encodes prompts: SDXL's two towers' penultimate states, else the last."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return TransformersEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                   penultimate=True)
    return TransformersEncoder([pipe.tokenizer], [pipe.text_encoder])


def attach_membranes(pipe, membranes: Sequence[Membrane], strengths: Sequence[float] | None = None, ft: bool = True,
                     combine: Combine = "additive", metric: Metric = "clipcos_tokenuni",
                     encoder: Encoder | None = None) -> None:
    """Install SPM membranes on a diffusers pipeline (or, with ft=False, a bare UNet); replaces earlier ones.

    With `ft`, membrane i acts on sample b at strengths[i] × its FT gate for that sample's context; without, at
    strengths[i] for every sample (plain LoRA behaviour). `encoder` overrides how concepts are encoded for clipcos
    (e.g. with clip skip); it must produce what the UNet receives for a prompt.
    """
    unet = _unet(pipe)
    membranes = list(membranes)
    fixed = torch.tensor([1.0] * len(membranes) if strengths is None else list(strengths), dtype=torch.float32)
    if fixed.shape != (len(membranes),):
        raise ValueError(f"{len(membranes)} membranes but {fixed.numel()} strengths")
    family = unet_family(unet)
    targets = membrane_targets(unet)
    shapes = {path: tuple(_base(module).weight.shape) for path, module in targets.items()}
    for membrane in membranes:
        if membrane.family != family:
            raise FamilyMismatchError(f"this SPM membrane was made for {FAMILIES[membrane.family].label} and cannot "
                                      f"apply to a {FAMILIES[family].label} model")
        membrane.check_targets(shapes)
    stacks = stack_membranes(membranes, combine)
    transport = None
    if ft:
        tokenizer, text_encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            raise ValueError("Facilitated Transport needs the pipeline's tokenizer and text encoder: pass the "
                             "pipeline, not the UNet, or use ft=False")

        def tokenize(texts: Sequence[str]) -> list[frozenset[int]]:
            ids = tokenizer(list(texts), padding="max_length", max_length=CONTEXT_TOKENS, truncation=True).input_ids
            return token_sets(ids, tokenizer.all_special_ids)

        concepts = Concepts.encode(membranes, encoder or _pipeline_encoder(pipe), tokenize)
        transport = _Transport(concepts, metric, tokenizer.all_special_ids, text_encoder.config.hidden_size)
    detach_membranes(pipe)
    state = _Attached(fixed, transport)
    if transport is not None:
        state.handles += [
            pipe.text_encoder.register_forward_hook(transport.record, with_kwargs=True),
            unet.register_forward_pre_hook(state.enter, with_kwargs=True),
            unet.register_forward_hook(state.leave, always_call=True),
        ]
    for path, stack in stacks.items():
        module = targets[path]
        weight = _base(module).weight
        hook = _LayerHook(path, state, stack.to(weight.device, weight.dtype), _base(module))
        state.handles.append(module.register_forward_hook(hook))
    setattr(unet, _STATE, state)


def membrane_gates(pipe, encoder_hidden_states: Tensor) -> Tensor:
    """The strengths [B, M] the attached membranes apply to each sample of a UNet call with this context."""
    state = getattr(_unet(pipe), _STATE, None)
    if state is None:
        raise ValueError("no SPM membranes are attached")
    return state.gates(encoder_hidden_states)


def detach_membranes(pipe) -> None:
    """Remove every hook attach_membranes installed (nothing happens if none are attached)."""
    unet = _unet(pipe)
    state = getattr(unet, _STATE, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    delattr(unet, _STATE)
