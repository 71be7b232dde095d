"""SPM membranes on a ComfyUI MODEL and CLIP, with Facilitated Transport (FT) decided per sample.

The rules of FT, its token record and caches are erasers/spm/transport.py's, shared with the diffusers adapter;
this module is the ComfyUI glue.

How the gates reach the layers, the same way on the old (2024) and the newest ComfyUI. Everything is a patch on
clones (ModelPatcher object patches, which both versions set when a model is loaded and undo when another clone of
it is), so no weight is ever written and the input MODEL and CLIP stay as they were:
1. The returned CLIP is a clone whose ``encode_from_tokens`` (old CLIPTextEncode) and ``encode_from_tokens_scheduled``
   (new CLIPTextEncode) record, per context row they return, the prompt's token ids (ComfyUI's tokens, less those
   of the empty prompt) in the process-wide `TOKEN_RECORD`. Its ``clone`` passes the recording on, so a
   CLIPSetLastLayer or LoRA loader after this node keeps it.
2. An object patch on ``diffusion_model.forward`` sees the context exactly as the UNet layers do (one row per
   sample: cond and uncond of CFG, several prompts, already cast to the model dtype). It passes it to the set's
   `Transport`, which gives each row's gates (token overlap from the record, also for a context ComfyUI repeated
   to a longer prompt's length; an all-zero row, ConditioningZeroOut's, is the empty prompt; clipcos alone, with
   one warning, for a row no recording CLIP produced).
   Not a model_function_wrapper: that is one slot, which other packs set without chaining; it runs only under a
   sampler (not for a direct apply_model); and packs such as tiled diffusion wrap it to call the UNet on slices of
   the batch. The forward patch sits under every sampler-level wrapper, so its rows are the rows the layers get.
3. An object patch on ``forward`` of every target Linear/Conv2d (attn1/attn2 to_q/k/v/out.0, ff.net.0.proj,
   ff.net.2, proj_in, proj_out) returns ``stack.add_to(base(x), x, gates)``, i.e. for sample b
   Σ_i g_i[b]·scale_i·U_i D_i x.

A second loader on this node's outputs adds its membrane to the same set and replaces the patches, so FT and the
"official" combination (which has cross terms) see every membrane of the chain. FT off with the "additive"
combination is a plain LoRA: ComfyUI's own LoRA loading (its key map and weight patches), as LoraLoader does.

Long prompts (several 77-token chunks): clipcos compares the first chunk (concepts are one chunk), the token
overlap counts every chunk.

The unconditional rows: with uncond_gate "own" (the default) each sample is gated by its own context, as in the
diffusers adapter. With "positive" (infer_spm.py's gating of cond and uncond alike by the positive prompt, per
image) the forward patch reads ComfyUI's ``transformer_options["cond_or_uncond"]``: the batch is that many equal
chunks, and row j of an uncond chunk takes the FT strengths of row j of the cond chunks (their maximum when a
conditioning has several entries). When ComfyUI runs the uncond chunk in a call of its own (low memory), its
positive prompt is not in that call: it falls back to "own", with one warning.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..erasers.erasure import FamilyMismatchError
from ..erasers.errors import InputError
from ..erasers.families import FAMILIES, UNetLayout, kv_family
from ..erasers.spm.hooks import UncondGate, check_uncond_gate
from ..erasers.spm.membrane import Combine, Membrane, MembraneStack, is_target, kohya_tensors, ldm_key, stack_membranes
from ..erasers.spm.transport import Concepts, Source, TokenRecord, Transport
from .comfy_adapter import ComfyEncoder

UNET_FORWARD = "diffusion_model.forward"  # object-patch key, relative to ModelPatcher.model
_LOG = logging.getLogger("erasekit")
_RECORDS = "_erasekit_records_tokens"  # marks a CLIP whose encodings record their token ids
_KV = ("attn2.to_k", "attn2.to_v")  # the layers whose input width is the text context's: the family


# --- CLIP side: which token ids made a context ------------------------------------------------------------------


def _ids(chunks) -> frozenset[int]:
    """Token ids of ComfyUI tokens (chunks of (id, weight[, word id]) tuples); textual-inversion vectors, which
    stand in the id's place, have no id."""
    return frozenset(t[0] for chunk in chunks for t in chunk if isinstance(t[0], int))


def token_set(clip, tokens: dict) -> frozenset[int]:
    """T(p) of FT: the prompt's CLIP-L token ids (the only tower of SD1; SDXL's towers share the vocabulary)
    without start, end and padding, which are exactly the ids of the empty prompt."""
    key = "l" if "l" in tokens else next(iter(tokens))
    return _ids(tokens[key]) - _ids(clip.tokenize("")[key])


# Process-wide: a row hash names one context, whichever CLIP made it, and a MODEL does not know its CLIP.
TOKEN_RECORD = TokenRecord()


def _encoded_conds(output) -> list[Tensor]:
    """The context tensors in what encode_from_tokens (tensor, (cond, pooled) or dict) or
    encode_from_tokens_scheduled (a CONDITIONING list) returns."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [output["cond"]]
    if isinstance(output, tuple):
        return [output[0]]
    return [entry[0] for entry in output]


def _recording(clip, encode: Callable) -> Callable:
    @functools.wraps(encode)
    def record(tokens, *args, **kwargs):
        output = encode(tokens, *args, **kwargs)
        ids = token_set(clip, tokens)
        for cond in _encoded_conds(output):
            TOKEN_RECORD.add(cond, ids)
        return output

    return record


def _install_recording(clip) -> None:
    """Wrap this CLIP instance's encoders, and its clone so that clones record too (CLIP.clone builds a fresh
    object, without instance attributes)."""
    setattr(clip, _RECORDS, True)
    for name in ("encode_from_tokens", "encode_from_tokens_scheduled"):  # the latter: new ComfyUI only
        if hasattr(clip, name):
            setattr(clip, name, _recording(clip, getattr(clip, name)))
    clone = clip.clone

    def recording_clone():
        copy = clone()
        _install_recording(copy)
        return copy

    clip.clone = recording_clone


def recording_clip(clip):
    """A clone of `clip` (sharing its text encoder) whose prompt encodings record their token ids for FT."""
    copy = clip.clone()
    if not getattr(copy, _RECORDS, False):  # a recording CLIP's clones record already
        _install_recording(copy)
    return copy


# --- MODEL side -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    membrane: Membrane
    strength: float
    ft: bool


def _warn_unrecorded() -> None:
    _LOG.warning("SPM Facilitated Transport: a prompt context reached the UNet that the SPM loader's CLIP output did "
                 "not encode (or that was changed after encoding, e.g. concatenated), so its token ids are unknown and "
                 "it is gated by clipcos alone. Connect the loader's CLIP output to the text encode nodes.")


_COND, _UNCOND = 0, 1  # ComfyUI's labels of a batch's chunks in transformer_options["cond_or_uncond"]


def _warn_uncond_alone() -> None:
    _LOG.warning("SPM uncond_gate 'positive': ComfyUI ran the negative prompt in a UNet call of its own (low memory, "
                 "or a conditioning it cannot batch), which holds no positive prompt to gate it by; those samples are "
                 "gated by their own context ('own')")


class _MembraneSet:
    """The gated membranes of one MODEL (every loader of a chain), their Transport (FT, from the process-wide token
    record) and the gates of the UNet call that is running."""

    def __init__(self, entries: list[_Entry], combine: Combine, concepts: Concepts | None,
                 uncond_gate: UncondGate = "own"):
        self.entries, self.combine, self.uncond_gate = entries, combine, uncond_gate
        self.stacks = stack_membranes([e.membrane for e in entries], combine)
        self.transport = Transport(concepts, [e.strength for e in entries], TOKEN_RECORD, _warn_unrecorded,
                                   ft=[e.ft for e in entries])
        self.current: Tensor | None = None
        self.warned = False

    def gates(self, context: Tensor, device: torch.device | str | None = None,
              cond_or_uncond: list[int] | None = None) -> Tensor:
        """Strengths [B, M] (float32, on `device`, default the CPU) of each row of a UNet context: the loader's
        strength, times the row's FT strength for membranes loaded with FT (with uncond_gate "positive" and the
        call's `cond_or_uncond`, an uncond row's is its positive prompt's)."""
        source = self._source(len(context), cond_or_uncond) if self.uncond_gate == "positive" else None
        return self.transport.gates(context, device, source)

    def _source(self, rows: int, chunks: list[int] | None) -> Source | None:
        if not chunks or _UNCOND not in chunks or rows % len(chunks):
            return None
        if _COND not in chunks:
            if not self.warned:
                self.warned = True
                _warn_uncond_alone()
            return None
        size = rows // len(chunks)
        conds = [c for c, kind in enumerate(chunks) if kind == _COND]

        def rows_of(b: int) -> tuple[int, ...]:
            return (b,) if chunks[b // size] == _COND else tuple(c * size + b % size for c in conds)

        return tuple(rows_of(b) for b in range(rows))


class _GatedUNet:
    """Object patch for ``diffusion_model.forward``: the gates of each sample, from its own context row, while the
    UNet runs."""

    def __init__(self, membranes: _MembraneSet, unet: nn.Module, foreign: Callable | None):
        self.membranes = membranes
        self.foreign = foreign  # another node's patch of the same forward, which this one wraps
        self.inner = foreign or functools.partial(type(unet).forward, unet)

    def __call__(self, x: Tensor, timesteps=None, context: Tensor | None = None, *args, **kwargs):
        if context is None:
            raise ValueError("SPM Facilitated Transport needs the text context of the UNet call; this model got none")
        # forward(x, timesteps, context, y, control, transformer_options, ...): ComfyUI passes it by keyword.
        options = kwargs.get("transformer_options", args[2] if len(args) > 2 else None) or {}
        self.membranes.current = self.membranes.gates(context, x.device, options.get("cond_or_uncond"))
        try:
            return self.inner(x, timesteps, context, *args, **kwargs)
        finally:
            self.membranes.current = None


class _GatedLayer:
    """Object patch for a target module's ``forward``: its own output plus the membranes' delta, per sample."""

    def __init__(self, membranes: _MembraneSet, path: str, module: nn.Module, foreign: Callable | None):
        self.membranes, self.path = membranes, path
        self.stack = membranes.stacks[path]
        self.foreign = foreign
        # The class's forward, not the attribute: while another clone is loaded, the attribute is its patch.
        self.base = foreign or functools.partial(type(module).forward, module)
        self.conv = ({"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
                     if isinstance(module, nn.Conv2d) else {})
        self.cast: MembraneStack | None = None

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        gates = self.membranes.current
        if gates is None:
            raise RuntimeError(f"SPM membrane layer {self.path} ran outside a UNet call of its model: its gates come "
                               f"from the loader's {UNET_FORWARD} patch, which a later node may have replaced")
        if self.cast is None or (self.cast.down.device, self.cast.down.dtype) != (x.device, x.dtype):
            self.cast = self.stack.to(x.device, x.dtype)
        return self.cast.add_to(self.base(x, *args, **kwargs), x, gates, **self.conv)


def _targets(model) -> dict[str, tuple[str, nn.Module]]:
    """The modules SPM edits in a ComfyUI MODEL: diffusers path → (LDM module name, module)."""
    unet = model.model.diffusion_model
    layout = UNetLayout.from_ldm_keys(name for name, _ in unet.named_parameters())
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        try:
            path = layout.to_diffusers(name)
        except KeyError:  # outside the transformer blocks
            continue
        if is_target(path):
            out[path] = (name, module)
    return out


def check_membrane(membrane: Membrane, targets: dict[str, tuple[str, nn.Module]]) -> None:
    """FamilyMismatchError, naming a layer and the families, unless the membrane fits this model."""
    shapes = {path: tuple(m.weight.shape) for path, (_, m) in targets.items()}
    family = kv_family({path: shape for path, shape in shapes.items() if path.endswith(_KV)}).name
    if membrane.family != family:
        path = next(p for p in membrane.layers if p.endswith(_KV))
        raise FamilyMismatchError(
            f"this SPM membrane is for {FAMILIES[membrane.family].label} (its layer {path} reads a "
            f"{membrane.layers[path].weight_shape[1]}-wide text context) and cannot apply to a "
            f"{FAMILIES[family].label} model (context width {FAMILIES[family].context_dim})")
    membrane.check_targets(shapes)


def _as_lora(model, membrane: Membrane, strength: float):
    """FT off, additive: the file as a LoRA, loaded by ComfyUI itself (LoraLoaderModelOnly's function)."""
    import comfy.sd

    clone = comfy.sd.load_lora_for_models(model, None, kohya_tensors(membrane), strength, 0)[0]
    layout = UNetLayout.from_ldm_keys(name for name, _ in model.model.diffusion_model.named_parameters())
    expected = {ldm_key(path, layout) for path in membrane.layers}
    patched = {key for key, patches in clone.patches.items() if len(patches) > len(model.patches.get(key, ()))}
    if patched != expected:
        missing = sorted(expected - patched)
        raise FamilyMismatchError(f"ComfyUI's LoRA loader did not map {len(missing)} membrane layers onto this "
                                  f"model, e.g. {missing[:1]}")
    return clone


def _gated_set(model) -> _GatedUNet | None:
    patch = model.object_patches.get(UNET_FORWARD)
    return patch if isinstance(patch, _GatedUNet) else None


def apply_membrane(model, clip, membrane: Membrane, strength: float = 1.0, ft: bool = True,
                   combine: Combine = "additive", uncond_gate: UncondGate = "own"):
    """(MODEL, CLIP) clones with `membrane` added to the model's membrane set; the inputs are untouched."""
    if combine not in ("additive", "official"):
        raise ValueError(f"unknown combine {combine!r}: additive or official")
    check_uncond_gate(uncond_gate)
    targets = _targets(model)
    check_membrane(membrane, targets)
    out_clip = recording_clip(clip)
    if not ft and combine == "additive":  # independent of the other membranes: a static weight patch
        return _as_lora(model, membrane, strength), out_clip
    previous = _gated_set(model)
    if previous is not None and previous.membranes.combine != combine:
        raise ValueError(f"this loader combines membranes {combine!r} but the SPM loaders before it on this MODEL "
                         f"chose {previous.membranes.combine!r}; a chain's membranes form one set: choose one")
    if previous is not None and previous.membranes.uncond_gate != uncond_gate:
        raise InputError(f"this loader gates the unconditional rows {uncond_gate!r} but the SPM loaders before it on "
                         f"this MODEL chose {previous.membranes.uncond_gate!r}; a chain's membranes share one gate "
                         "per sample: choose one uncond_gate for every loader")
    entries = (previous.membranes.entries if previous else []) + [_Entry(membrane, float(strength), bool(ft))]
    concepts = None
    if any(e.ft for e in entries):
        # Encoded with this loader's CLIP, as the prompts will be; earlier membranes' concepts are encoded again.
        concepts = Concepts.encode([e.membrane for e in entries], ComfyEncoder(clip),
                                   lambda texts: [token_set(clip, clip.tokenize(t)) for t in texts])
    membranes = _MembraneSet(entries, combine, concepts, uncond_gate)
    out = model.clone()
    unet_patch = previous.foreign if previous else out.object_patches.get(UNET_FORWARD)
    out.add_object_patch(UNET_FORWARD, _GatedUNet(membranes, model.model.diffusion_model, unet_patch))
    for path in membranes.stacks:
        name, module = targets[path]
        key = f"diffusion_model.{name}.forward"
        existing = out.object_patches.get(key)
        foreign = existing.foreign if isinstance(existing, _GatedLayer) else existing
        out.add_object_patch(key, _GatedLayer(membranes, path, module, foreign))
    return out, out_clip


def membrane_gates(model, context: Tensor, cond_or_uncond: list[int] | None = None) -> Tensor:
    """The strengths [B, M] the model's gated membranes (in loading order) apply to each row of a UNet context
    (`cond_or_uncond`: the chunks' labels a sampler passes in transformer_options)."""
    patch = _gated_set(model)
    if patch is None:
        raise ValueError("this MODEL has no gated SPM membranes (none loaded, or only FT-off additive ones)")
    return patch.membranes.gates(context, cond_or_uncond=cond_or_uncond)
