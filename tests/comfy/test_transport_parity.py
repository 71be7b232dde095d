"""Facilitated Transport is one implementation (erasers/spm/transport.py): the diffusers hooks and the ComfyUI
loader give the same gates for the same prompts, and every rule of either former copy (repeated contexts, in-place
changes, all-zero rows, the caches) holds on both sides.

Both adapters see the very same contexts: the diffusers side is a pipeline whose text encoder is the tiny ComfyUI
checkpoint's CLIP (input ids in, the context CLIPTextEncode makes for those tokens out) and whose tokenizer reads
ComfyUI's own CLIP vocabulary, and both encode the concepts with ComfyEncoder on that CLIP. The UNet of the
diffusers side is the tiny checkpoint's, on the meta device: gates need only its module shapes. SDXL's empty prompt
(all-zero 2048-wide rows) is checked at the transport level, through each adapter's token-recording path, since an
SDXL-shaped ComfyUI model and CLIP would be too costly to build here.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from erasekit.erasers.spm import hooks as spm_diffusers
from erasekit.erasers.spm import transport as spm_transport
from erasekit.erasers.spm.hooks import TransportFallbackWarning
from erasekit.erasers.spm.membrane import Membrane, MembraneLayer
from erasekit.erasers.spm.transport import Concepts, Transport

PROMPTS = ["a red circle", "a blue square", "a dog on a beach", "a circle beside a square", ""]
FALLBACK = "clipcos alone"  # in the ComfyUI adapter's warning


class _ComfyTower(nn.Module):
    """A diffusers-style text encoder that is a ComfyUI CLIP: input ids [B, 77] → (contexts [B, 77, 768],)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = SimpleNamespace(hidden_size=768)

    def forward(self, input_ids: torch.Tensor):
        conds = [self.clip.encode_from_tokens({"l": [[(i, 1.0) for i in row]]}) for row in input_ids.tolist()]
        return (torch.cat(conds),)


@pytest.fixture(scope="module")
def sides(comfy, loaded):
    """(diffusers pipeline, its encode, ComfyUI MODEL, its encode): two membranes, "circle" and "square", gated by
    FT on each side."""
    import comfy.sd1_clip
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    from erasekit.nodes.comfy_adapter import ComfyEncoder
    from erasekit.nodes.membrane_adapter import apply_membrane
    from erasekit.testing.tiny_models import TINY_SD15_UNET_CONFIG, random_membranes

    model, clip = loaded
    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY_SD15_UNET_CONFIG)
    tokenizer = CLIPTokenizer.from_pretrained(str(Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"))
    pipe = SimpleNamespace(unet=unet, tokenizer=tokenizer, text_encoder=_ComfyTower(clip))
    membranes = random_membranes(spm_diffusers.membrane_targets(unet), ["circle", "square"], seed=3)
    spm_diffusers.attach_membranes(pipe, membranes, encoder=ComfyEncoder(clip))
    with torch.no_grad():
        gated, gated_clip = apply_membrane(model, clip, membranes[0])
        gated, gated_clip = apply_membrane(gated, gated_clip, membranes[1])

    def diffusers_encode(texts):
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert ids.tolist() == [[t[0] for t in clip.tokenize(text)["l"][0]] for text in texts]  # the same tokens
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]

    def comfy_encode(texts):
        import nodes

        with torch.no_grad():  # not inference mode: these contexts track their version, as the diffusers ones
            return torch.cat([nodes.CLIPTextEncode().encode(gated_clip, text)[0][0][0] for text in texts])

    yield pipe, diffusers_encode, gated, comfy_encode
    spm_diffusers.detach_membranes(pipe)


def _comfy_gates(model, context):
    from erasekit.nodes.membrane_adapter import membrane_gates

    return membrane_gates(model, context)


@contextmanager
def _no_fallback(caplog):
    """Neither adapter warns that a row was scored by clipcos alone."""
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="erasekit"):
        warnings.simplefilter("error", TransportFallbackWarning)
        yield
    assert FALLBACK not in caplog.text


def _both(sides, diffusers_context, comfy_context) -> torch.Tensor:
    """The gates of both adapters, asserted equal (≤ 1e-6); the diffusers ones are returned."""
    pipe, _, model, _ = sides
    ours, theirs = spm_diffusers.membrane_gates(pipe, diffusers_context), _comfy_gates(model, comfy_context)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    return ours


def test_both_adapters_gate_through_the_one_shared_transport(sides):
    from erasekit.nodes.membrane_adapter import TOKEN_RECORD, _gated_set

    pipe, _, model, _ = sides
    diffusers_transport = pipe.unet._erasekit_membranes.transport
    comfy_transport = _gated_set(model).membranes.transport
    assert type(diffusers_transport) is Transport and type(comfy_transport) is Transport
    assert type(diffusers_transport.record) is type(TOKEN_RECORD) is spm_transport.TokenRecord
    assert comfy_transport.record is TOKEN_RECORD
    assert torch.equal(diffusers_transport.concepts.contexts, comfy_transport.concepts.contexts)
    assert diffusers_transport.concepts.tokens == comfy_transport.concepts.tokens


def test_mixed_erased_and_unrelated_prompts_in_one_batch_get_the_same_gates_through_both_adapters(sides, caplog):
    _, diffusers_encode, _, comfy_encode = sides
    ours, theirs = diffusers_encode(PROMPTS), comfy_encode(PROMPTS)
    assert torch.equal(ours, theirs)  # the same contexts reach both
    with _no_fallback(caplog):
        gates = _both(sides, ours, theirs)
    assert gates[0, 0] == 1.0 and gates[1, 1] == 1.0 and (gates[3] == 1.0).all()  # named: token overlap 1
    assert (gates[2] < 1).all() and (gates[4] < 1).all() and gates[0, 1] < 1 and gates[1, 0] < 1
    # Each row's gate is its own, whatever it is batched with.
    for b in range(len(PROMPTS)):
        torch.testing.assert_close(_both(sides, ours[b:b + 1].clone(), theirs[b:b + 1].clone()), gates[b:b + 1],
                                   rtol=0, atol=1e-6)


def test_a_context_repeated_to_a_longer_prompts_length_keeps_its_tokens_on_both_sides(sides, caplog):
    """ComfyUI batches a 77-token context with a 154-token one by repeating it; a diffusers UNet given such a
    context (the ComfyUI copy's rule only, before) gates it the same way."""
    _, diffusers_encode, _, comfy_encode = sides
    ours, theirs = diffusers_encode(PROMPTS[:3]), comfy_encode(PROMPTS[:3])
    with _no_fallback(caplog):
        single = _both(sides, ours, theirs)
        repeated = _both(sides, ours.repeat(1, 2, 1), theirs.repeat(1, 2, 1))
    torch.testing.assert_close(repeated, single, rtol=0, atol=1e-6)
    assert repeated[0, 0] == 1.0


def test_a_concatenation_of_two_prompts_is_unknown_and_gated_by_clipcos_on_both_sides(sides, caplog):
    pipe, diffusers_encode, model, comfy_encode = sides
    ours, theirs = diffusers_encode(PROMPTS[:2]), comfy_encode(PROMPTS[:2])
    concatenated = torch.cat([ours[0], ours[1]])[None]
    with pytest.warns(TransportFallbackWarning), caplog.at_level(logging.WARNING, logger="erasekit"):
        gates = _both(sides, concatenated, torch.cat([theirs[0], theirs[1]])[None])
    assert gates[0, 0] < 1  # "circle" is named, but without token ids only clipcos counts
    concepts = pipe.unet._erasekit_membranes.transport.concepts
    torch.testing.assert_close(gates, spm_transport.transport_strengths(ours[:1], [None], concepts))


def test_a_context_changed_in_place_is_gated_anew_and_an_unchanged_one_is_not_hashed_again_on_both_sides(
        sides, monkeypatch):
    """The identity + version reuse was the diffusers copy's only; the ComfyUI one hashed every call."""
    pipe, diffusers_encode, model, comfy_encode = sides
    hashed = []
    original = spm_transport.row_keys
    monkeypatch.setattr(spm_transport, "row_keys", lambda rows: hashed.append(len(rows)) or original(rows))
    results = []
    for gates, context in ((lambda c: spm_diffusers.membrane_gates(pipe, c), diffusers_encode(PROMPTS[:2])),
                           (lambda c: _comfy_gates(model, c), comfy_encode(PROMPTS[:2]))):
        swapped = context.flip(0).clone()
        first = gates(context)
        calls = len(hashed)
        assert torch.equal(gates(context), first) and len(hashed) == calls  # no row hashed again
        context.copy_(swapped)  # the same tensor, new rows: its gates must follow them
        changed = gates(context)
        assert len(hashed) > calls
        assert torch.equal(changed, gates(swapped)) and torch.equal(changed, first.flip(0))
        results.append((first, changed))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)


def test_an_all_zero_context_is_the_empty_prompt_on_both_sides_without_a_warning(sides, caplog):
    """ComfyUI's ConditioningZeroOut, like an SDXL pipeline's empty prompt: known, no tokens (the ComfyUI copy
    warned and scored it by clipcos alone, which gives the same gate, 0)."""
    from erasekit.nodes.membrane_adapter import _gated_set

    pipe, _, model, _ = sides
    zeros = torch.zeros(2, 77, 768)
    with _no_fallback(caplog):
        gates = _both(sides, zeros, zeros.clone())
    assert torch.equal(gates, torch.zeros(2, 2))
    # Known (no tokens), so cached; an unknown row is not (and each side warns only once, maybe earlier).
    key = spm_transport.row_keys(zeros[:1])[0]
    for transport in (pipe.unet._erasekit_membranes.transport, _gated_set(model).membranes.transport):
        assert key in transport.cache


def _sdxl_membrane(concept: str) -> Membrane:
    g = torch.Generator().manual_seed(0)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    return Membrane({path: MembraneLayer(torch.randn(1, 2048, generator=g), torch.randn(640, 1, generator=g), 1.0)},
                    [concept], 1.0)


def test_sdxl_all_zero_rows_are_the_empty_prompt_through_both_adapters_token_recording(comfy, caplog):
    """At the transport level, each side set up as its adapter sets it up: the diffusers one records the CLIP-L
    output through its text-encoder hook and looks 2048-wide rows up by their first 768 columns; the ComfyUI one
    records the whole conditioning through its CLIP wrapper in the process-wide record."""
    from erasekit.nodes import membrane_adapter as spm_node

    g = torch.Generator().manual_seed(1)
    concepts = Concepts(torch.randn(2, 77, 2048, generator=g), [frozenset({7}), frozenset({8})], torch.arange(2), 2)
    ids = torch.tensor([[0, 7, 5] + [1] * 74, [0, 9, 5] + [1] * 74])  # 0 start, 1 end and padding
    clip_l, clip_g = torch.randn(2, 77, 768, generator=g), torch.randn(2, 77, 1280, generator=g)
    full = torch.cat([clip_l, clip_g], -1)

    record = spm_transport.TokenRecord()
    spm_diffusers._recorder(record, [0, 1])(nn.Identity(), (ids,), {}, (clip_l,))
    diffusers_side = Transport(concepts, [1.0, 1.0], record, spm_diffusers._warn_unrecorded, width=768)

    clip = SimpleNamespace(tokenize=lambda text: {"l": [[(0, 1.0)] + [(1, 1.0)] * 76]})  # the empty prompt's ids
    for b in range(2):
        encode = spm_node._recording(clip, lambda tokens, b=b: full[b:b + 1])
        encode({"l": [[(i, 1.0) for i in ids[b].tolist()]]})
    entries = [spm_node._Entry(_sdxl_membrane(c), 1.0, True) for c in ("star", "moon")]
    comfy_side = spm_node._MembraneSet(entries, "additive", concepts)

    context = torch.cat([torch.zeros(1, 77, 2048), full, torch.zeros(1, 77, 2048)])  # uncond "", two prompts, ""
    with _no_fallback(caplog):
        ours, theirs = diffusers_side.gates(context), comfy_side.gates(context)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(ours[0], torch.zeros(2)) and torch.equal(ours[3], torch.zeros(2))
    assert ours[1, 0] == 1.0 and ours[2, 0] < 1  # token 7 found through the CLIP-L part / the whole row
