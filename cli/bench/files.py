"""`erasekit bench files`: what EraseKit's file rules cost, beside plain safetensors.

Ours is `erasers/files.py`: `write_safetensors` (content hash, a temporary file renamed over the target, the umask's
mode) and `read_safetensors` (the hash checked, tensors copied off the file); the reference is safetensors'
`save_file` / `load_file` on the same tensors. The payload is `--size-mb` of float32 split into tensors of a
checkpoint's typical size, so the per-tensor overhead is counted as well as the bytes.
"""
from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ...erasers import files
from .timing import seconds

TENSOR_MB = 8


def payload(size_mb: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors of TENSOR_MB each (the last one smaller) that add up to `size_mb` MiB."""
    generator = torch.Generator().manual_seed(seed)
    per_tensor = TENSOR_MB * 2**20 // 4
    total = size_mb * 2**20 // 4
    tensors, index = {}, 0
    while total > 0:
        count = min(per_tensor, total)
        tensors[f"layer.{index}.weight"] = torch.randn(count // 1024 or 1, 1024 if count >= 1024 else count,
                                                       generator=generator)
        total -= count
        index += 1
    return tensors


def _median(fn: Callable[[], object], repeats: int) -> float:
    cpu = torch.device("cpu")
    seconds(fn, cpu)
    return statistics.median(seconds(fn, cpu) for _ in range(repeats))


def _load_copied(load_file, path: Path) -> dict[str, torch.Tensor]:
    """safetensors' load_file maps the file lazily; a copy makes the tensors the caller's, as ours are, so both sides
    read every byte."""
    return {key: tensor.clone() for key, tensor in load_file(str(path)).items()}


def run_files(size_mb: int, repeats: int) -> list[tuple[str, float, float]]:
    """(operation, ours in s, reference in s) for writing, reading and hashing `size_mb` MiB; printed as a table."""
    from safetensors.torch import load_file, save_file

    tensors = payload(size_mb)
    metadata = {"erasekit_bench": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = Path(folder) / "ours.safetensors", Path(folder) / "theirs.safetensors"
        rows.append(("write", _median(lambda: files.write_safetensors(ours, tensors, metadata), repeats),
                     _median(lambda: save_file(tensors, str(theirs), metadata=metadata), repeats)))
        rows.append(("read", _median(lambda: files.read_safetensors(ours), repeats),
                     _median(lambda: _load_copied(load_file, theirs), repeats)))
        rows.append(("hash alone", _median(lambda: files.content_hash(tensors, metadata), repeats), float("nan")))
    print(f"{size_mb} MiB of float32 in {len(tensors)} tensors; medians of {repeats} runs after one warm-up; "
          "reference: safetensors save_file / load_file "
          "(+ a copy of each tensor, so both read every byte)")
    print(f"{'operation':<12} {'ours s':>8} {'reference s':>12} {'ratio':>7}")
    for name, mine, reference in rows:
        ratio = "" if reference != reference else f"{mine / reference:6.2f}×"
        shown = "" if reference != reference else f"{reference:12.3f}"
        print(f"{name:<12} {mine:8.3f} {shown:>12} {ratio:>7}", flush=True)
    return rows
