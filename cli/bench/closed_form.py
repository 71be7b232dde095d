"""`erasekit bench closed-form`: our shared-solve low-rank edits beside the official per-layer dense form.

Everything runs on random weights of the real SD1.5 and SDXL K/V shapes (the cost of a closed-form edit depends
only on the shapes), in float32 on the CPU or, with `--device cuda`, a GPU.

The per-layer reference costs the same for every layer of a shape, plus a per-concept constant (RECE's n×n solve
per concept), so it is timed on no layers and on every 8th layer of each shape and scaled to all layers: the full
SDXL runs would take over an hour at 50 concepts.
"""
from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ...erasers.closed_form import reference as ref
from ...erasers.closed_form import solve
from ...erasers.erasure import Erasure
from ...testing.tiny_models import CLIP_L_TEXT_CONFIG, sd15_cross_attention_weights, sdxl_cross_attention_weights
from .timing import seconds


def _time(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median of `repeats` timed calls of `fn`, after `warmup` untimed ones."""
    for _ in range(warmup):
        seconds(fn, device)
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def _reference_time(run: Callable[[dict[str, torch.Tensor]], object], weights: dict[str, torch.Tensor],
                    device: torch.device) -> float:
    """Seconds `run` would take on all of `weights`: its per-concept part timed on no layers, its per-layer part on
    every 8th layer of each weight shape and scaled to that shape's count."""
    fixed = _time(lambda: run({}), 1, device, warmup=0)
    by_shape: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    total = fixed
    for names in by_shape.values():
        subset = {name: weights[name] for name in names[::8]}
        timed = _time(lambda subset=subset: run(subset), 1, device, warmup=0)
        total += max(timed - fixed, 0.0) * len(names) / len(subset)
    return total


def _embeddings(rows: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, width, generator=g) * (27 / width ** 0.5)).to(device)


def _text_encoders(family: str, device: torch.device) -> list[torch.nn.Module]:
    """Randomly initialised text encoders of the family's shapes (CLIP-L; SDXL adds OpenCLIP-G's tower)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = [CLIP_L_TEXT_CONFIG]
    if family == "sdxl":
        configs.append({**CLIP_L_TEXT_CONFIG, "hidden_size": 1280, "intermediate_size": 5120,
                        "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu"})
    return [CLIPTextModel(CLIPTextConfig(**c)).eval().to(device) for c in configs]


def _text_encoding_time(models: list[torch.nn.Module], concepts: int, device: torch.device) -> float:
    """Time to encode `concepts` prompts with every model."""
    ids = torch.randint(0, 49407, (concepts, 77), device=device)

    def encode():
        with torch.no_grad():
            for model in models:
                model(ids, output_hidden_states=True)

    return _time(encode, 1, device)


def _warm_up(width: int, device: torch.device) -> None:
    """First calls pay for thread pools, kernel loading and allocator growth; pay them before anything is timed."""
    a = torch.randn(width, width, device=device)
    m = a @ a.T + torch.eye(width, device=device)
    torch.inverse(m)
    torch.linalg.solve(m, a)
    torch.linalg.solve(m[:16, :16].double(), a[:16].double())
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def closed_form_rows(family: str, counts=(1, 10, 50), repeats: int = 3, rece_epochs: int = 1,
                     device: torch.device | str = "cpu"):
    """Yield one measured row per concept count (SDXL's per-layer references take minutes each)."""
    device = torch.device(device)
    weights = sd15_cross_attention_weights() if family == "sd15" else sdxl_cross_attention_weights()
    weights = {name: w.to(device) for name, w in weights.items()}
    width = next(iter(weights.values())).shape[1]
    dense_bytes = sum(w.numel() for w in weights.values()) * 4
    encoders = _text_encoders(family, device)
    _warm_up(width, device)
    read_once = _time(lambda: [w.sum() for w in weights.values()], repeats, device)
    for count in counts:
        pairs = solve.Pairs()
        for i in range(count):
            pairs.add(_embeddings(1, width, i, device), _embeddings(1, width, 10_000, device))
        keys, guides = pairs.stacked()

        # The closures below are timed within this iteration; the default arguments bind its values all the same.
        def ours_uce(pairs=pairs):
            return solve.uce(weights, pairs, lam=0.5).layers()

        concepts = [_embeddings(77, width, 20_000 + i, device) for i in range(count)]
        guide_seq = _embeddings(77, width, 30_000, device)
        retain = _embeddings(77 * count, width, 40_000, device)

        def ours_rece(pairs=pairs, concepts=concepts, guide_seq=guide_seq, count=count, retain=retain):
            edit = solve.uce(weights, pairs, lam=0.5)
            solve.rece(edit, concepts, [guide_seq] * count, epochs=rece_epochs, reg=0.1, retain=retain)
            return edit.layers()

        def reference_uce(subset, keys=keys, guides=guides):
            return ref.uce(subset, keys, guides, lam=0.5)

        def reference_rece(subset, keys=keys, guides=guides, concepts=concepts, guide_seq=guide_seq, count=count,
                           retain=retain):
            start = ref.uce(subset, keys, guides, lam=0.5)
            return ref.rece(start, subset, concepts, [guide_seq] * count, epochs=rece_epochs, reg=0.1, retain=retain)

        layers = ours_uce()
        with tempfile.TemporaryDirectory() as tmp:
            erasure = Erasure(layers=layers, method="uce", family=family, concepts=[])
            size = erasure.save(Path(tmp) / "e.safetensors").stat().st_size
        yield {
            "family": family, "concepts": count,
            "text_encoding_s": _text_encoding_time(encoders, count, device),
            "uce_s": _time(ours_uce, repeats, device),
            "uce_reference_s": _reference_time(reference_uce, weights, device),
            "rece_s": _time(ours_rece, 1, device), "rece_reference_s": _reference_time(reference_rece, weights, device),
            "read_once_s": read_once, "file_bytes": size, "dense_kv_bytes": dense_bytes,
        }


HEADER = (f"{'model':6} {'n':>3} | {'text enc':>8} | {'UCE ours':>9} {'per-layer':>9} {'speed-up':>8} "
          f"{'read-once':>9} {'ours/read':>9} | {'RECE ours':>9} {'per-layer':>9} {'speed-up':>8} | "
          f"{'file':>10} {'dense K/V':>10} {'ratio':>7}")


def format_row(r: dict) -> str:
    return (
        f"{r['family']:6} {r['concepts']:>3} | {r['text_encoding_s']:>7.3f}s | {r['uce_s']:>8.4f}s "
        f"{r['uce_reference_s']:>8.3f}s {r['uce_reference_s'] / r['uce_s']:>7.1f}x {r['read_once_s']:>8.4f}s "
        f"{r['uce_s'] / r['read_once_s']:>8.2f}x | {r['rece_s']:>8.3f}s {r['rece_reference_s']:>8.2f}s "
        f"{r['rece_reference_s'] / r['rece_s']:>7.1f}x | {r['file_bytes'] / 1e6:>8.2f}MB "
        f"{r['dense_kv_bytes'] / 1e6:>8.1f}MB {r['dense_kv_bytes'] / r['file_bytes']:>6.0f}x"
    )


def run_closed_form(families=("sd15", "sdxl"), counts=(1, 10, 50), repeats: int = 3,
                    device: torch.device | str = "cpu") -> None:
    """Measure and print each row as soon as it is done."""
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for family in families:
        for row in closed_form_rows(family, counts, repeats, device=device):
            print(format_row(row), flush=True)
