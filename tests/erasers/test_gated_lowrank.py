"""The fused per-sample membrane kernel against an independent dense reference: on the CPU through Triton's
interpreter (in a subprocess: the interpreter is chosen when triton is first imported), and on a GPU when there
is one."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from erasekit.erasers.spm import kernel as gated_lowrank
from erasekit.erasers.spm.membrane import MembraneStack

# Each case: (layer, samples, rows per sample or (H, W), in, out, membranes, rank each, dtype, gated alike).
CASES = [
    ("linear", 3, 70, 40, 75, 3, 1, torch.float32, False),
    ("linear", 2, 1, 33, 17, 2, 2, torch.float32, True),
    ("linear", 2, 19, 64, 130, 16, 1, torch.float16, False),
    ("conv", 2, (5, 7), 24, 40, 2, 1, torch.float32, False),
    ("conv-channels-last", 2, (6, 6), 24, 40, 3, 1, torch.float32, False),
]


def make(case, device, seed=0):
    """A stack, an input, an output and strengths for one case, on `device`."""
    layer, samples, rows, features, outputs, count, rank, dtype, alike = case
    g = torch.Generator().manual_seed(seed)
    kernel = (1, 1) if layer != "linear" else ()
    down = torch.randn(count * rank, features, *kernel, generator=g) / features ** 0.5
    up = torch.randn(outputs, count * rank, generator=g)
    owner = torch.arange(count).repeat_interleave(rank)
    scale = torch.rand(count * rank, generator=g) + 0.5
    stack = MembraneStack(down, up, owner, scale, "additive", count).to(device, dtype)
    shape = (samples, rows, features) if layer == "linear" else (samples, features, *rows)
    x = torch.randn(*shape, generator=g).to(device, dtype)
    if layer == "conv-channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    out_shape = (samples, rows, outputs) if layer == "linear" else (samples, outputs, *rows)
    out = torch.randn(*out_shape, generator=g).to(device, dtype)
    strengths = torch.rand(1 if alike else samples, count, generator=g).to(device)
    return stack, x, out, strengths


def dense_reference(stack: MembraneStack, x: torch.Tensor, out: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
    """out[b] + x[b]·(U diag(g_b) D)ᵀ with each sample's merged ΔW, in float64."""
    rows = []
    for b in range(x.shape[0]):
        delta = stack.to(x.device, torch.float64).dense(strengths[min(b, len(strengths) - 1)].double()).flatten(1)
        xb, ob = x[b].double(), out[b].double()
        if x.dim() == 4:  # [C, H, W]: channels first
            rows.append(ob + torch.einsum("oc,chw->ohw", delta, xb))
        else:
            rows.append(ob + xb @ delta.T)
    return torch.stack(rows)


INTERPRETED = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_gated_lowrank import CASES, make, dense_reference
from erasekit.erasers.spm import kernel as gated_lowrank
for case in CASES:
    stack, x, out, strengths = make(case, "cpu")
    expected = dense_reference(stack, x, out, strengths)
    got = gated_lowrank.add(out.clone(), x, stack.down, stack.up, strengths, stack.owner, stack.scale)
    error = ((got.double() - expected).norm() / expected.norm()).item()
    print(case[0], case[-2], f"{{error:.2e}}")
    assert error < (1e-6 if case[-2] == torch.float32 else 2e-3), (case, error)
"""


def _interpreter_runs_loops() -> bool:
    """Triton 3.6's interpreter stops at a loop over a runtime bound under NumPy 2.5 (it calls int() on a 1-element
    array; seen on the device); 3.8's runs it."""
    triton = gated_lowrank._triton()
    return triton is not None and tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 8)


@pytest.mark.skipif(not _interpreter_runs_loops(), reason="needs Triton 3.8 or newer for its interpreter")
def test_kernel_matches_a_dense_reference_in_the_triton_interpreter():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED.format(tests=tests)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(done.stdout.splitlines()) == len(CASES)


def taken(stack, x, out, g, **conv) -> bool:
    """Whether the kernel took the layer (it then changed `out`); a copy of `out` is passed."""
    return gated_lowrank.add(out.clone(), x, stack.down, stack.up, g, stack.owner, stack.scale, **conv) is not None


def test_the_kernel_is_taken_only_on_cuda_without_gradients():
    stack, x, out, g = make(CASES[0], "cpu")
    assert not taken(stack, x, out, g)  # CPU: the torch path
    if not torch.cuda.is_available() or gated_lowrank._triton() is None:
        return
    stack, x, out, g = make(CASES[0], "cuda")
    assert taken(stack, x, out, g)
    assert not taken(stack, x, out, g.cpu())  # strengths must be on the GPU
    assert not taken(stack, x, out, g.half())  # and float32
    x.requires_grad_(True)
    assert not taken(stack, x, out, g)  # training keeps autograd
    with torch.no_grad():
        assert taken(stack, x, out, g)
    conv_stack, conv_x, conv_out, conv_g = make(CASES[3], "cuda")
    assert taken(conv_stack, conv_x, conv_out, conv_g)
    assert not taken(conv_stack, conv_x, conv_out, conv_g, stride=2)


@pytest.mark.skipif(not torch.cuda.is_available() or gated_lowrank._triton() is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[-2])[6:]}")
def test_add_to_on_cuda_matches_a_dense_reference(case):
    stack, x, out, strengths = make(case, "cuda")
    expected = dense_reference(stack, x, out, strengths)
    with torch.no_grad():
        got = stack.add_to(out.clone(), x, strengths)
    error = ((got.double() - expected).norm() / expected.norm()).item()
    assert error < (1e-6 if case[-2] == torch.float32 else 2e-3)


@pytest.mark.skipif(not torch.cuda.is_available() or gated_lowrank._triton() is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("ft", [True, False], ids=["ft", "no-ft"])
def test_a_cuda_batch_matches_each_sample_on_merged_weights(monkeypatch, ft):
    """Through the diffusers adapter (the kernel on every layer): each sample of a mixed batch is what that sample
    alone gives on W₀ + ΔW merged at its own gates."""
    from erasekit.cli.bench import spm as bench_spm
    from erasekit.erasers.spm.hooks import attach_membranes, detach_membranes, membrane_gates
    from erasekit.erasers.spm.membrane import stack_membranes
    from erasekit.testing.tiny_models import SMALL_SD15_UNET_CONFIG

    monkeypatch.setitem(bench_spm.UNETS, "tiny-sd15", SMALL_SD15_UNET_CONFIG)
    # cuDNN's TF32 convolutions round differently at batch 6 and batch 1 (2.7e-4 apart, seen on an H200).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    bench = bench_spm._Bench("tiny-sd15", 2, torch.device("cuda"), torch.float32)
    texts = bench_spm._texts(bench.concepts, 3)
    x = torch.randn(len(texts), bench.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        attach_membranes(bench.pipe, bench.membranes, ft=ft)
        context = bench.encode(texts).embeddings.cuda()
        gates = membrane_gates(bench.pipe, context).cuda()
        ours = bench.step(x, context)
        again = bench.step(x, context)  # the second step reuses the context's gates
        detach_membranes(bench.pipe)
        assert torch.equal(ours, again)
        assert len(set(gates[:, 0].tolist())) > 1 or not ft  # the batch mixes gates
        stacks = {path: stack.to("cuda", torch.float32) for path, stack in stack_membranes(bench.membranes).items()}
        for b in range(len(texts)):
            for path, stack in stacks.items():
                bench.targets[path].weight.copy_(bench.originals[path] + stack.dense(gates[b]))
            alone = bench.step(x[b:b + 1], context[b:b + 1])[0]
            assert ((ours[b] - alone).norm() / alone.norm()).item() < 1e-4
        for path, weight in bench.originals.items():
            bench.targets[path].weight.copy_(weight)
