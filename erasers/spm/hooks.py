"""SPM membranes on diffusers pipelines, with Facilitated Transport (FT) decided per sample of each UNet batch.

Hooks only: no parameter is touched, so outputs after `detach_membranes` are bit-identical to before.

How the gates reach the layers (the rules of FT, its token record and caches are transport.py's, shared with the
ComfyUI adapter; this module is the diffusers glue):
1. A forward hook on the pipeline's (first) text encoder records each prompt's token set (`token_sets` of its
   input ids) in a `TokenRecord` under each row of every context it produces (last and all hidden states, so the
   pipeline's choice of hidden state still matches).
2. A pre-hook on the UNet passes the `encoder_hidden_states` it receives to the `Transport`, which gives each row's
   gates (SDXL's rows are looked up by their CLIP-L part; an all-zero row is the empty prompt). The [B, M] gates
   live on a shared state until the UNet call returns.
3. A forward hook on every target module adds ``ΔW·x`` at the strengths (``stack.add_to``), so one UNet call can
   mix samples with different gates.

The unconditional half of a CFG batch: by default ("own") each sample gets the strength of its own context, the
negative prompt's for the unconditional rows. infer_spm.py gates the whole generation, cond and uncond, by the
positive prompt's strength; ``uncond_gate="positive"`` reproduces that per image inside the one batch: a diffusers
pipeline's CFG batch is [uncond; cond] with the latents repeated (``torch.cat([latents] * 2)``), so when the two
halves of the sample are equal (and the pipeline, where it says, is guiding), unconditional row i takes the FT
strengths of conditional row B + i.

Contexts computed before attaching (``prompt_embeds``) never passed the hooked text encoder: `record_prompts`
records their prompts' token ids, so FT scores them as it scores the prompts.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..diffusers_adapter import unet_family
from ..erasure import FamilyMismatchError
from ..errors import InputError
from ..families import FAMILIES
from ..text import CONTEXT_TOKENS, Encoder, TransformersEncoder
from .membrane import Combine, Membrane, MembraneStack, is_target, stack_membranes
from .transport import Concepts, Metric, Source, TokenRecord, Transport, token_sets

_STATE = "_erasekit_membranes"
UncondGate = Literal["own", "positive"]
UNCOND_GATES = ("own", "positive")


class TransportFallbackWarning(UserWarning):
    """A context reached the UNet without passing the hooked text encoder: FT scores it by clipcos alone."""


class UncondGateWarning(UserWarning):
    """uncond_gate="positive" asked for, but a guided UNet batch was not laid out [uncond; cond]: each sample of it
    is gated by its own context."""


def check_uncond_gate(value: str, where: str = "uncond_gate") -> str:
    """`value` if it is one of UNCOND_GATES, else an InputError naming the input."""
    if value not in UNCOND_GATES:
        raise InputError(key=where, expected="'own' (each sample by its own context) or 'positive' (a CFG batch's "
                         "unconditional rows by their positive prompt, as infer_spm.py)", found=repr(value)[:80])
    return value


def _unet(pipe_or_unet) -> nn.Module:
    return getattr(pipe_or_unet, "unet", pipe_or_unet)


def _base(module: nn.Module) -> nn.Module:
    """The Linear/Conv2d itself, also when a PEFT LoRA wraps it."""
    return getattr(module, "base_layer", module)


def membrane_targets(pipe_or_unet) -> dict[str, nn.Module]:
    """The modules SPM edits, by diffusers module path: every Linear/Conv2d of the UNet's Transformer2D blocks."""
    return {path: module for path, module in _unet(pipe_or_unet).named_modules()
            if is_target(path) and isinstance(_base(module), (nn.Linear, nn.Conv2d))}


def _recorder(record: TokenRecord, special_ids: Sequence[int]):
    """Forward hook for the text encoder: each prompt's token ids under every context it produces (last and all
    hidden states, so the pipeline's choice of hidden state, clip skip included, still matches)."""

    def record_tokens(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        sets = token_sets(ids, special_ids)
        for candidate in (output[0], *(getattr(output, "hidden_states", None) or ())):
            record.add(candidate, sets)

    return record_tokens


def _warn_unrecorded() -> None:
    warnings.warn("a prompt context reached the UNet without passing through the pipeline's text encoder "
                  "(prompt_embeds given directly?): Facilitated Transport scores it by clipcos alone",
                  TransportFallbackWarning, stacklevel=4)


class _Attached:
    """What attach_membranes installed on a UNet; `current` holds the gates while a UNet call runs."""

    def __init__(self, transport: Transport, ft: bool, uncond_gate: UncondGate = "own", pipe=None):
        self.transport = transport
        self.current: Tensor | None = None if ft else transport.strengths[None]
        self.handles: list = []
        self.uncond_gate = uncond_gate
        # Weak: the pipeline holds the UNet, which holds this state.
        self.pipe = weakref.ref(pipe) if pipe is not None and uncond_gate == "positive" else None
        self.warned = False

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if context is None:
            raise ValueError("SPM Facilitated Transport needs the UNet's encoder_hidden_states")
        source = self._cfg_source(kwargs.get("sample", args[0] if args else None)) if self.pipe else None
        # A sampler passes the same context tensor at every step: the transport reuses its gates, on its device.
        self.current = self.transport.gates(context, context.device, source)

    def _cfg_source(self, sample: Tensor | None) -> Source | None:
        """For uncond_gate="positive": uncond row i takes cond row B + i's strengths when this call is a CFG batch
        [uncond; cond]; None (each row its own) otherwise."""
        pipe = self.pipe()
        guiding = getattr(pipe, "do_classifier_free_guidance", None) if pipe is not None else None
        if guiding is False or sample is None:
            return None
        half = sample.shape[0] // 2
        if sample.shape[0] % 2 == 0 and half and torch.equal(sample[:half], sample[half:]):
            cond = tuple((half + i,) for i in range(half))
            return cond + cond  # uncond row i and cond row B + i both take row B + i
        if guiding and not self.warned:
            self.warned = True
            warnings.warn("uncond_gate='positive': a guided UNet batch is not laid out as [unconditional; "
                          "conditional] with the latents repeated, so the unconditional rows cannot be told from the "
                          "conditional ones; each sample of it is gated by its own context ('own')",
                          UncondGateWarning, stacklevel=4)
        return None

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
                     encoder: Encoder | None = None, uncond_gate: UncondGate = "own") -> None:
    """Install SPM membranes on a diffusers pipeline (or, with ft=False, a bare UNet); replaces earlier ones.

    With `ft`, membrane i acts on sample b at strengths[i] × its FT gate for that sample's context; without, at
    strengths[i] for every sample (plain LoRA behaviour). `encoder` overrides how concepts are encoded for clipcos
    (e.g. with clip skip); it must produce what the UNet receives for a prompt. `uncond_gate`: "own" gates the
    unconditional rows of a CFG batch by their own (negative) prompt; "positive" by their image's positive prompt,
    as infer_spm.py does (with combine="official", its computation; methods.md §1.9).
    """
    check_uncond_gate(uncond_gate)
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
    concepts = record = None
    if ft:
        tokenizer, text_encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            raise ValueError("Facilitated Transport needs the pipeline's tokenizer and text encoder: pass the "
                             "pipeline, not the UNet, or use ft=False")

        def tokenize(texts: Sequence[str]) -> list[frozenset[int]]:
            ids = tokenizer(list(texts), padding="max_length", max_length=CONTEXT_TOKENS, truncation=True).input_ids
            return token_sets(ids, tokenizer.all_special_ids)

        concepts, record = Concepts.encode(membranes, encoder or _pipeline_encoder(pipe), tokenize), TokenRecord()
    # SDXL's rows are looked up by their CLIP-L part, what the hooked (first) text encoder makes.
    width = pipe.text_encoder.config.hidden_size if ft else None
    transport = Transport(concepts, fixed, record, _warn_unrecorded, metric=metric, width=width)
    detach_membranes(pipe)
    state = _Attached(transport, ft, uncond_gate, pipe if ft else None)
    if ft:
        state.handles += [
            pipe.text_encoder.register_forward_hook(_recorder(record, tokenizer.all_special_ids), with_kwargs=True),
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
    return state.transport.gates(encoder_hidden_states)


def record_prompts(pipe, prompts: Sequence[str] | Tensor | Sequence[Sequence[int]], prompt_embeds: Tensor) -> None:
    """Record which prompts made `prompt_embeds` [N, L, d] (computed before attaching, or by other code), so that
    FT scores those contexts, when a pipeline is called with them, by token overlap too, exactly as it scores the
    prompts themselves. `prompts`: N prompts, or N rows of token ids as the pipeline's tokenizer gives them; one
    prompt or row stands for every row. Record negative_prompt_embeds the same way."""
    state = getattr(_unet(pipe), _STATE, None)
    if state is None or state.transport.record is None:
        raise InputError(key="pipe", expected="a pipeline with SPM membranes attached with Facilitated Transport",
                         found="none attached" if state is None else "membranes attached with ft=False",
                         fix="call attach_membranes(pipe, ...) first; without FT no prompt is scored")
    if not isinstance(prompt_embeds, Tensor) or prompt_embeds.dim() != 3:
        raise InputError(key="prompt_embeds", expected="a tensor [prompts, tokens, width]",
                         found=f"{type(prompt_embeds).__name__} of shape {tuple(getattr(prompt_embeds, 'shape', ()))}")
    tokenizer = pipe.tokenizer
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor) or (len(prompts) and not isinstance(prompts[0], str)):
        ids = prompts
    else:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True).input_ids
    sets = token_sets(ids, tokenizer.all_special_ids)
    if len(sets) not in (1, prompt_embeds.shape[0]):
        raise InputError(key="prompts", expected=f"1 or {prompt_embeds.shape[0]} (one per row of prompt_embeds)",
                         found=f"{len(sets)} prompts", fix="pass the prompts in the order their rows were encoded")
    width = state.transport.width
    if width and prompt_embeds.shape[-1] < width:
        raise InputError(key="prompt_embeds", expected=f"rows at least {width} wide (the text encoder's width)",
                         found=f"{prompt_embeds.shape[-1]}")
    # Rows are looked up by their first `width` columns (SDXL: the CLIP-L part), so they are recorded so.
    state.transport.record.add(prompt_embeds[..., :width] if width else prompt_embeds,
                               sets[0] if len(sets) == 1 else sets)


def detach_membranes(pipe) -> None:
    """Remove every hook attach_membranes installed (nothing happens if none are attached)."""
    unet = _unet(pipe)
    state = getattr(unet, _STATE, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    delattr(unet, _STATE)
