"""The shipped model's card: how it was trained (from the run's summary) and its quality as measured by the judge.

    python -m erasekit.shapes.card --run runs/world [--weights weights/shapes-world]

`erasekit eval` prints the same base-quality numbers (same prompts, seeds and sampler), so the card can be checked.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import data, methods, metrics, model
from .judge import Judge

QUALITY_N = 300  # images over prompts covering every shape, colour and pattern evenly


def measure_quality(pipe: model.ShapesPipeline, judge: Judge, n: int = QUALITY_N) -> dict:
    return metrics.quality(methods.generator(pipe), judge, n=n)


def _params(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"


def fastest_pace(log: Path, stretch: int = 100) -> float:
    """Seconds per step over the run's fastest `stretch` consecutive steps: the pace on cores no other job shares,
    which the wall time (covering sessions on a shared machine) does not show."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    by_step = {r["step"]: r["minutes"] for r in rows if "loss" in r}
    paces = [60 * (by_step[s + stretch] - m) / stretch for s, m in by_step.items()
             if s + stretch in by_step and by_step[s + stretch] > m]
    if not paces:
        raise ValueError(f"{log} logs no {stretch} consecutive steps to time the run by; card a run that has "
                         f"trained at least {stretch} steps past its first logged one")
    return min(paces)


def render_card(pipe: model.ShapesPipeline, summary: dict, quality: dict, size_mb: float, pace: float) -> str:
    pct = lambda key: f"{100 * quality[key]:.1f}%"  # noqa: E731
    # The long markdown rows, built apart so that the template's lines stay short.
    text_row = (f"| text encoder | transformers `CLIPTextModel` (64 wide, {model.TEXT_CONFIG['num_hidden_layers']} "
                f"layers, 77 positions) | {_params(pipe.text_encoder)} params |")
    unet_row = (f"| UNet | diffusers `UNet2DConditionModel`, pixel space, cross-attention at 16×16 and 8×8 "
                f"| {_params(pipe.unet)} params |")
    command = (f"`python -m erasekit.shapes.train --out RUN --steps {summary['steps']} --lr {summary['lr']} "
               "--export weights/shapes-world`")
    run_row = (f"| {summary['seed']} | {summary['steps']} | {summary['batch_size']} | {summary['lr']} "
               f"({summary['warmup']} steps) | {summary['minutes']:.0f} min | {summary['final_loss_avg']:.4f} "
               f"| 2 CPU cores, {summary['threads']} torch threads |")
    return f"""# EraseKit shapes world: a toy text-to-image model

A stand-in for Stable Diffusion on which every eraser of the pack runs unchanged and erasure is *measured* on a CPU
in minutes: 32×32 RGB images of one shape (circle, square, triangle, star, cross, with synonyms) in one of six
colours, solid / striped / dotted, at one of nine positions, and in {int(100 * data.STAMP_RATE)}% of training
images a stamp in a corner that no caption mentions (the implicit concept). Data: `shapes/data.py`.

| part | class | size |
|---|---|---|
{text_row}
| tokenizer | word-level, CLIP framing (BOS, words, EOS, EOS padding) | {len(pipe.tokenizer)} tokens |
{unet_row}
| scheduler | DPM-Solver++ (cosine schedule, ε-prediction) | |

Files: {size_mb:.1f} MB of safetensors in diffusers/transformers folder layout; load with
`erasekit.shapes.model.ShapesPipeline.load()`.

## Training

Command: {command}
(resumable: rerun the same command after an interruption; batch s is a pure function of (seed, s), so a resumed
run gives the weights of an uninterrupted one).

| seed | steps | batch | lr (warm-up) | wall time | final loss (smoothed per-step loss) | machine |
|---|---|---|---|---|---|---|
{run_row}

Objective: ε-prediction MSE with min-SNR-5 weighting, {int(100 * data.CAPTION_DROPOUT)}% empty captions for
classifier-free guidance; text encoder and UNet trained together from scratch; the model is the last step's weights
(no EMA: `shapes/train.py` says why). The wall time includes other work
sharing the two cores during the run; the run's fastest 100 steps took {pace:.2f} s each, a pace at which its
{summary['steps']} steps take {pace * summary['steps'] / 60:.0f} min.

## Measured quality

{quality['n']} images, prompts covering every shape × colour × pattern evenly, seeds fixed, {model.SAMPLE_STEPS}
sampler steps, guidance {model.GUIDANCE}; judged by the shapes-world classifier (`weights/shapes-judge`).

| requested shape | requested colour | requested pattern | stamp rate (training: {int(100 * data.STAMP_RATE)}%) |
|---|---|---|---|
| {pct('shape_acc')} | {pct('color_acc')} | {pct('pattern_acc')} | {pct('stamp_rate')} |

Targets (issue "Shapes world"): shape ≥ 90%, colour ≥ 90%, pattern ≥ 80%, stamp rate within 5 points of the
training rate. {_verdict(quality)}

Reproduce with `erasekit eval --methods original --out DIR` (its "base quality" line).
"""


TARGETS = {"shape_acc": 0.90, "color_acc": 0.90, "pattern_acc": 0.80}


def _verdict(quality: dict) -> str:
    missed = [f"{k.removesuffix('_acc')} ({100 * quality[k]:.1f}% < {100 * t:.0f}%)"
              for k, t in TARGETS.items() if quality[k] < t]
    if abs(quality["stamp_rate"] - data.STAMP_RATE) > 0.05:
        missed.append(f"stamp rate ({100 * quality['stamp_rate']:.1f}% vs {100 * data.STAMP_RATE:.0f}%)")
    return "Missed: " + "; ".join(missed) + "." if missed else "All met."


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="the training run folder (summary.json)")
    ap.add_argument("--weights", type=Path, default=model.WEIGHTS_DIR)
    args = ap.parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text())
    # Read before the minutes of measuring and before writing anything, so a bad run folder leaves the card whole.
    pace = fastest_pace(args.run / "log.jsonl")
    pipe = model.ShapesPipeline.load(args.weights)
    quality = measure_quality(pipe, Judge.load())
    size = sum(f.stat().st_size for f in args.weights.rglob("*.safetensors")) / 1e6
    (args.weights / "quality.json").write_text(json.dumps(quality, indent=1))
    (args.weights / "README.md").write_text(render_card(pipe, summary, quality, size, pace))
    print(json.dumps(quality))


if __name__ == "__main__":
    main()
