"""SPM membranes under torch.compile (issue #23, performance): with Facilitated Transport on and a batch of mixed
prompts, the UNet's forward compiles with fullgraph=True (no graph break) and matches the eager UNet.

The gates are computed in the UNet module's pre-hook (a Python lookup of the recorded prompts), which stays eager;
what is compiled is `unet.forward`, where each membrane layer reads the gates as a tensor. A new batch of prompts
gives new gate values through the same graph."""
from __future__ import annotations

import pytest
import torch
from test_spm import sd1_pipe  # noqa: F401 (the fixture: a tiny SD1.x pipeline; tests/erasers is on sys.path)


def _context(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]  # through the hooked encoder: FT records these prompts


@pytest.mark.slow
def test_membranes_with_ft_compile_without_a_graph_break_and_match_eager(sd1_pipe):  # noqa: F811 (the fixture)
    pipe = sd1_pipe
    from erasekit.erasers.spm import attach_membranes, detach_membranes, membrane_gates
    from erasekit.erasers.spm.hooks import membrane_targets
    from erasekit.testing.tiny_models import random_membranes

    unet = pipe.unet
    attach_membranes(pipe, random_membranes(membrane_targets(unet), ["circle", "square"]))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = torch.tensor([10, 10, 10])
    eager_forward = unet.forward
    try:
        with torch.no_grad():
            batches = [_context(pipe, ["a circle", "a square", "a tree"]),
                       _context(pipe, ["a tree", "a circle", "a circle and a square"])]
            gates = [membrane_gates(pipe, context) for context in batches]
            assert not torch.equal(gates[0], gates[1]) and gates[0].std() > 0  # mixed: the gates differ per sample
            eager = [unet(latents, steps, encoder_hidden_states=context).sample for context in batches]
            unet.forward = torch.compile(eager_forward, fullgraph=True)  # fullgraph: any graph break is an error
            compiled = [unet(latents, steps, encoder_hidden_states=context).sample for context in batches]
    finally:
        unet.forward = eager_forward
        detach_membranes(pipe)
    for fast, slow in zip(compiled, eager):
        assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-4), float((fast - slow).abs().max())
