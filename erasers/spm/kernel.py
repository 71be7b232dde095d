"""A fused CUDA kernel (Triton) for SPM's per-sample gated membranes, and when it applies.

For sample b of a batch, a layer's output gains

    out[b] += U · diag(g[b]) · D · x[b],    g[b, r] = strengths[b, owner[r]] · scale[r]

(U out×R, D R×in or R×in×1×1; the rows of a Linear input, or the pixels of a 1×1 Conv2d).
`MembraneStack.add_to` computes this with torch operations everywhere; that is the reference, and this kernel does
the same in one launch.

Why a kernel: the torch form is six kernel launches and a few more dispatches per layer, and SPM puts a membrane
on every one of SD1.5's 192 transformer layers. An eager SD1.5 step on a GPU is bound by the host issuing kernels,
so those launches cost about as much as the step itself; one launch per layer issues in a fraction of that host
time (figures: docs/benchmarks.md, `erasekit bench spm`).

The kernel adds into `out` in place and has no backward: it runs only where nothing needs a gradient (SPM's
inference, not its training).
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton's interpreter runs kernels on CPU tensors: how the tests check this one on machines without a GPU.
_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton():
    """The triton module, or None where it is not installed (CPU-only torch builds, macOS, most Windows setups)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        return None
    return triton


@functools.cache
def _runs_on(index: int | None, dtype: torch.dtype) -> bool:
    """Whether Triton's dot runs in `dtype` on that GPU: float16/float32 from Turing (7.5), bfloat16 from Ampere
    (8.0); older cards keep the torch form."""
    major, minor = torch.cuda.get_device_capability(index)
    return (major, minor) >= ((8, 0) if dtype == torch.bfloat16 else (7, 5))


def _one_by_one(down: Tensor, stride, padding, dilation) -> bool:
    as_pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (tuple(down.shape[2:]) == (1, 1) and as_pair(stride) == (1, 1) and as_pair(padding) == (0, 0)
            and as_pair(dilation) == (1, 1))


def _rows(t: Tensor) -> tuple[int, int, int, int, int] | None:
    """(samples, rows per sample, sample stride, row stride, feature stride) of a Linear input/output [B, N, C] or
    [B, C], or of a Conv2d one [B, C, H, W] whose pixels form one strided run; None if they do not."""
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0, t.stride(1)
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.stride(0), t.stride(1), t.stride(2)
    if t.dim() == 4 and (t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)):
        return t.shape[0], t.shape[2] * t.shape[3], t.stride(0), t.stride(3), t.stride(1)
    return None


def add(output: Tensor, x: Tensor, down: Tensor, up: Tensor, strengths: Tensor, owner: Tensor, scale: Tensor,
        stride=1, padding=0, dilation=1) -> Tensor | None:
    """`output` += the gated membranes applied to `x`, in place, in one launch, and return `output`; or None where
    the kernel cannot take the layer, and the caller runs the torch form.

    It takes: CUDA with Triton on a Turing or newer GPU (or the CPU under Triton's interpreter); no gradient
    wanted; a Linear or a 1×1 Conv2d; one floating dtype for x, output and the contiguous factors; float32
    strengths on the GPU, [B, M] or [1, M] (every sample alike). owner [R] (int) and scale [R] map each rank to its
    membrane. The host's time per call is what this saves: every check is a plain attribute read, and nothing
    dispatches to torch.
    """
    if not (x.is_cuda or _ON_CPU) or _triton() is None:
        return None
    if not ((strengths.is_cuda or _ON_CPU) and strengths.dtype == torch.float32 and strengths.is_contiguous()):
        return None
    if torch.is_grad_enabled() and (output.requires_grad or x.requires_grad or down.requires_grad or up.requires_grad):
        return None
    if not (x.dtype in _DTYPES and output.dtype == down.dtype == up.dtype == x.dtype):
        return None
    if x.is_cuda and not _runs_on(x.device.index, x.dtype):
        return None
    if not (down.is_contiguous() and up.is_contiguous() and x.dim() == output.dim()):
        return None
    if down.dim() not in (2, 4) or (down.dim() == 4 and not _one_by_one(down, stride, padding, dilation)):
        return None
    into, out_of = _rows(x), _rows(output)
    if into is None or out_of is None:
        return None
    samples, per_sample, sxb, sxn, sxk = into
    _, _, sob, son, sok = out_of
    rank, features = down.shape[0], down.shape[1]
    outputs = up.shape[0]
    blocks = (per_sample + _BLOCK_M - 1) // _BLOCK_M
    grid = (samples * blocks, (outputs + _BLOCK_N - 1) // _BLOCK_N)
    _kernel()[grid](
        x, down, up, strengths, owner, scale, output,
        blocks, per_sample, features, outputs, rank,
        sxb, sxn, sxk, sob, son, sok, strengths.stride(0) if strengths.shape[0] > 1 else 0,
        RANK_PAD=max(16, 1 << (rank - 1).bit_length()), BLOCK_M=_BLOCK_M, BLOCK_K=64, BLOCK_N=_BLOCK_N,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32 as torch's (no TF32) matmul
    )
    return output


# A program per BLOCK_M rows of one sample × BLOCK_N outputs. One program per row block running through every
# output block in turn left most of the GPU idle on the few hundred row blocks of a batch-2 SD1.5 layer, waiting
# on each load; the h = x·Dᵀ each output block recomputes reads x from L2. Rows of one sample only: the sample is
# then one number per program and the rows a contiguous range, so loads along them (a Conv2d's pixels) coalesce.
_BLOCK_M, _BLOCK_N = 64, 128


@functools.cache
def _kernel():
    """Compiled on first use, so that importing erasekit never imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def gated_lowrank(x_ptr, down_ptr, up_ptr, strength_ptr, owner_ptr, scale_ptr, out_ptr,
                      blocks, per_sample, features, outputs, rank,
                      sxb, sxn, sxk, sob, son, sok, s_strength,
                      RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                      PRECISION: tl.constexpr):
        # h = x·Dᵀ over all input features for this program's rows, gated by their sample, then
        # out += h·Uᵀ for its block of outputs. h (BLOCK_M × RANK_PAD) never leaves the registers.
        sample = tl.program_id(0) // blocks
        pixel = (tl.program_id(0) % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = pixel < per_sample
        x_row = x_ptr + sample.to(tl.int64) * sxb + pixel * sxn
        out_row = out_ptr + sample.to(tl.int64) * sob + pixel * son
        r = tl.arange(0, RANK_PAD)
        r_ok = r < rank
        h = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
        for k0 in range(0, features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < features
            xs = tl.load(x_row[:, None] + k[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            ds = tl.load(down_ptr + r[None, :] * features + k[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            h += tl.dot(xs, ds, input_precision=PRECISION)
        owner = tl.load(owner_ptr + r, mask=r_ok, other=0)
        scale = tl.load(scale_ptr + r, mask=r_ok, other=0.0).to(tl.float32)
        gate = tl.load(strength_ptr + sample * s_strength + owner, mask=r_ok, other=0.0)
        h = (h * (gate * scale)[None, :]).to(x_ptr.dtype.element_ty)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < outputs
        us = tl.load(up_ptr + n[None, :] * rank + r[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        mask = row_ok[:, None] & n_ok[None, :]
        where = out_row[:, None] + n[None, :] * sok
        total = tl.load(where, mask=mask, other=0.0).to(tl.float32) + tl.dot(h, us, input_precision=PRECISION)
        tl.store(where, total.to(out_ptr.dtype.element_ty), mask=mask)

    return gated_lowrank
