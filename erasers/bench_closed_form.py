"""`erasekit bench closed-form`: our shared-solve low-rank edits beside the official per-layer dense form.

Everything runs on random weights of the real SD1.5 and SDXL K/V shapes (the cost of a closed-form edit depends
only on the shapes), in float32 on whatever device torch uses by default here.

The per-layer reference costs the same for every layer of a shape, plus a per-concept constant (RECE's n×n solve
per concept), so it is timed on no layers and on every 8th layer of each shape and scaled to all layers: the full
SDXL runs would take over an hour at 50 concepts.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from . import closed_form, closed_form_reference as ref
from .erasure import Erasure
from .tiny_models import CLIP_L_TEXT_CONFIG, sd15_cross_attention_weights, sdxl_cross_attention_weights


def _time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reference_time(run: Callable[[dict[str, torch.Tensor]], object], weights: dict[str, torch.Tensor]) -> float:
    """Seconds `run` would take on all of `weights`: its per-concept part timed on no layers, its per-layer part on
    every 8th layer of each weight shape and scaled to that shape's count."""
    fixed = _time(lambda: run({}), 1, warmup=0)
    by_shape: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    total = fixed
    for names in by_shape.values():
        subset = {name: weights[name] for name in names[::8]}
        total += max(_time(lambda: run(subset), 1, warmup=0) - fixed, 0.0) * len(names) / len(subset)
    return total


def _embeddings(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g) * (27 / width ** 0.5)


def _text_encoding_time(family: str, concepts: int) -> float:
    """Time to encode `concepts` prompts with randomly initialised encoders of the family's shapes."""
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = [CLIP_L_TEXT_CONFIG]
    if family == "sdxl":
        configs.append({**CLIP_L_TEXT_CONFIG, "hidden_size": 1280, "intermediate_size": 5120,
                        "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu"})
    models = [CLIPTextModel(CLIPTextConfig(**c)).eval() for c in configs]
    ids = torch.randint(0, 49407, (concepts, 77))

    def encode():
        with torch.no_grad():
            for model in models:
                model(ids, output_hidden_states=True)

    return _time(encode, 1)


def _warm_up(width: int) -> None:
    """First calls pay for thread pools and allocator growth; pay them before anything is timed."""
    a = torch.randn(width, width)
    torch.inverse(a @ a.T + torch.eye(width))
    torch.linalg.solve(a @ a.T + torch.eye(width), a)


def closed_form_rows(family: str, counts=(1, 10, 50), repeats: int = 3, rece_epochs: int = 1):
    """Yield one measured row per concept count (SDXL's per-layer references take minutes each)."""
    weights = sd15_cross_attention_weights() if family == "sd15" else sdxl_cross_attention_weights()
    width = next(iter(weights.values())).shape[1]
    dense_bytes = sum(w.numel() for w in weights.values()) * 4
    _warm_up(width)
    read_once = _time(lambda: [w.sum() for w in weights.values()], repeats)
    for count in counts:
        pairs = closed_form.Pairs()
        for i in range(count):
            pairs.add(_embeddings(1, width, i), _embeddings(1, width, 10_000))
        keys, guides = pairs.stacked()

        def ours_uce():
            return closed_form.uce(weights, pairs, lam=0.5).layers()

        concepts = [_embeddings(77, width, 20_000 + i) for i in range(count)]
        guide_seq = _embeddings(77, width, 30_000)
        retain = _embeddings(77 * count, width, 40_000)

        def ours_rece():
            edit = closed_form.uce(weights, pairs, lam=0.5)
            closed_form.rece(edit, concepts, [guide_seq] * count, epochs=rece_epochs, reg=0.1, retain=retain)
            return edit.layers()

        def reference_uce(subset):
            return ref.uce(subset, keys, guides, lam=0.5)

        def reference_rece(subset):
            start = ref.uce(subset, keys, guides, lam=0.5)
            return ref.rece(start, subset, concepts, [guide_seq] * count, epochs=rece_epochs, reg=0.1, retain=retain)

        layers = ours_uce()
        with tempfile.TemporaryDirectory() as tmp:
            size = Erasure(layers=layers, method="uce", family=family, concepts=[]).save(Path(tmp) / "e.safetensors").stat().st_size
        yield {
            "family": family, "concepts": count,
            "text_encoding_s": _text_encoding_time(family, count),
            "uce_s": _time(ours_uce, repeats), "uce_reference_s": _reference_time(reference_uce, weights),
            "rece_s": _time(ours_rece, 1), "rece_reference_s": _reference_time(reference_rece, weights),
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


def run_closed_form(families=("sd15", "sdxl"), counts=(1, 10, 50), repeats: int = 3) -> None:
    """Measure and print each row as soon as it is done."""
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for family in families:
        for row in closed_form_rows(family, counts, repeats):
            print(format_row(row), flush=True)
