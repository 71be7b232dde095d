"""The shapes world's judge: a small CNN that says what an image shows, so erasure is measured by classification.

One convolutional trunk with five heads: shape, colour, fill pattern, grid position (softmax each) and the stamp
(four sigmoids, one per corner; "stamp present" is any of them above 0.5). It is trained only on `data.render`
images, augmented the way a diffusion model's samples differ from renders (pixel noise, slight blur, colour and
contrast shifts, ±1 px shifts), so that it judges generated images rather than the renderer's exact pixels.

    python -m erasekit.shapes.judge --out weights/shapes-judge [--steps 600] [--seed 0]

writes judge.safetensors (config in its metadata), report.json (held-out accuracies) and README.md.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..erasers.io.checkpoints import write_checkpoint
from . import data

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights" / "shapes-judge"
WEIGHTS_FILE = "judge.safetensors"
HEADS = {"shape": data.SHAPES, "color": tuple(data.COLORS), "pattern": data.PATTERNS,
         "position": data.POSITIONS, "stamp": data.CORNERS}
CONFIG = {"widths": [16, 32, 48, 64, 64], "hidden": 128, "heads": HEADS}
# Spec streams: the training pool and the held-out set are drawn from different streams of one seed.
TRAIN_STREAM, HELDOUT_STREAM = 0, 1
TRAIN_IMAGES = 16_000
HELDOUT_IMAGES = 2_000


class JudgeNet(nn.Module):
    """Full-resolution convolutions first (stripes and dots are 2 px features), then a flattened 4×4 map so the
    position and stamp heads can see where things are."""

    def __init__(self, widths: list[int], hidden: int, heads: dict[str, tuple[str, ...]]):
        super().__init__()
        w0, w1, w2, w3, w4 = widths

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.trunk = nn.Sequential(
            *block(3, w0), *block(w0, w1), nn.MaxPool2d(2),
            *block(w1, w2), *block(w2, w3), nn.MaxPool2d(2),
            *block(w3, w4), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(w4 * 16, hidden), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: [N, 3, 32, 32] in [0, 1]; logits per head."""
        features = self.trunk(x * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}


@dataclass
class Verdicts:
    """What the judge sees in each of N images: indices into data.SHAPES, list(data.COLORS), data.PATTERNS and
    data.POSITIONS, whether there is a stamp, and each head's probabilities (stamp: one per corner)."""
    shape: np.ndarray
    color: np.ndarray
    pattern: np.ndarray
    position: np.ndarray
    stamp: np.ndarray
    shape_probs: np.ndarray
    color_probs: np.ndarray
    pattern_probs: np.ndarray
    position_probs: np.ndarray
    stamp_probs: np.ndarray


class Judge:
    """The trained network behind a callable: `Judge.load()(images) -> Verdicts`."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> Judge:
        path = Path(path) if path is not None else WEIGHTS_DIR / WEIGHTS_FILE
        retrain = f"python -m erasekit.shapes.judge --out {path.parent}"
        if not path.is_file():
            raise FileNotFoundError(f"no shapes judge at {path}; train one (about 5 minutes on a CPU) with: {retrain}")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                config = json.loads(handle.metadata()["config"])
                state = {key: handle.get_tensor(key) for key in handle.keys()}
            if {k: tuple(v) for k, v in config["heads"].items()} != HEADS:
                raise ValueError("its classes are not this shapes world's (data.py changed since it was trained)")
            net = JudgeNet(config["widths"], config["hidden"], HEADS)
            net.load_state_dict(state)
        except Exception as exc:  # any failure to read means the same thing to the user: retrain
            raise ValueError(f"cannot read the shapes judge {path} ({exc}); retrain it with: {retrain}") from exc
        return cls(net)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 512) -> Verdicts:
        """images: uint8 [N, 32, 32, 3], as the shapes-world sampler returns them."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (data.SIZE, data.SIZE, 3):
            raise ValueError(f"the judge takes uint8 images [N, {data.SIZE}, {data.SIZE}, 3], "
                             f"got {images.dtype} {list(images.shape)}")
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        chunks = [self.net(x[i:i + batch_size].float() / 255) for i in range(0, len(x), batch_size)]
        logits = {name: torch.cat([c[name] for c in chunks]) if chunks else torch.zeros(0, len(HEADS[name]))
                  for name in HEADS}
        probs = {name: (torch.sigmoid(v) if name == "stamp" else torch.softmax(v, 1)).numpy()
                 for name, v in logits.items()}
        return Verdicts(
            shape=probs["shape"].argmax(1), color=probs["color"].argmax(1), pattern=probs["pattern"].argmax(1),
            position=probs["position"].argmax(1), stamp=(probs["stamp"] > 0.5).any(1),
            shape_probs=probs["shape"], color_probs=probs["color"], pattern_probs=probs["pattern"],
            position_probs=probs["position"], stamp_probs=probs["stamp"],
        )


# --- data and augmentation -------------------------------------------------------------------------------------

def rendered(rng: np.random.Generator, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n rendered images, uint8 [n, 32, 32, 3], and their labels: class indices per head, and for the stamp a
    [n, 4] 0/1 array (one column per corner)."""
    specs = data.sample_specs(rng, n)
    images = (np.stack([data.render(s) for s in specs]) * 255).round().astype(np.uint8)
    corners = np.zeros((n, len(data.CORNERS)), dtype=np.float32)
    for i, s in enumerate(specs):
        if s.stamp is not None:
            corners[i, s.stamp] = 1
    labels = {"shape": np.array([data.SHAPES.index(s.shape) for s in specs]),
              "color": np.array([HEADS["color"].index(s.color) for s in specs]),
              "pattern": np.array([data.PATTERNS.index(s.pattern) for s in specs]),
              "position": np.array([s.position for s in specs]), "stamp": corners}
    return images, labels


_BLUR = torch.tensor([0.27, 0.46, 0.27])  # a Gaussian of σ≈0.85 px, sampled at -1, 0, 1


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The ways a diffusion model's samples differ from renders, at random strengths, on x [N, 3, 32, 32] in
    [0, 1]. Shifts are ±1 px: the stamp sits 1 px from the edge, so it stays whole and in its corner."""
    n = x.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    offsets = torch.randint(0, 3, (n, 2), generator=generator)
    x = torch.stack([padded[i, :, dy:dy + data.SIZE, dx:dx + data.SIZE] for i, (dx, dy) in enumerate(offsets.tolist())])
    kernel = (_BLUR[:, None] * _BLUR[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    amount = uniform(0, 1, 1, 1, 1) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.6)
    x = x + amount * (blurred - x)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * uniform(0.85, 1.15, 1, 1, 1)  # contrast
    x = x * uniform(0.92, 1.08, 3, 1, 1) + uniform(-0.06, 0.06, 1, 1, 1)  # per-channel gain, brightness
    x = x + uniform(0, 0.05, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return (x.clamp(0, 1) * 255).round() / 255  # the judge only ever sees uint8 images


# --- training --------------------------------------------------------------------------------------------------

def _loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits["stamp"], labels["stamp"])
    for name in ("shape", "color", "pattern", "position"):
        loss = loss + F.cross_entropy(logits[name], labels[name])
    return loss


def accuracies(verdicts: Verdicts, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Per head; "stamp" is presence, "stamp_corners" all four corner decisions right."""
    corners = verdicts.stamp_probs > 0.5
    return {
        **{name: float((getattr(verdicts, name) == labels[name]).mean())
           for name in ("shape", "color", "pattern", "position")},
        "stamp": float((verdicts.stamp == labels["stamp"].any(1)).mean()),
        "stamp_corners": float((corners == labels["stamp"].astype(bool)).all(1).mean()),
    }


def train_judge(out_dir: str | Path, steps: int = 600, seed: int = 0, batch_size: int = 128,
                lr: float = 3e-3) -> dict:
    """Train on a pool of rendered images with fresh augmentations every step; write judge.safetensors and
    report.json to out_dir and return the report. Deterministic in (seed, steps, thread count)."""
    start, cpu_start = time.time(), time.process_time()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = rendered(np.random.default_rng([seed, TRAIN_STREAM]), TRAIN_IMAGES)
    pool = torch.from_numpy(images).permute(0, 3, 1, 2)
    targets = {k: torch.from_numpy(v) for k, v in labels.items()}
    net = JudgeNet(CONFIG["widths"], CONFIG["hidden"], HEADS)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(pool), (batch_size,), generator=generator)
        x = augment(pool[idx].float() / 255, generator)
        loss = _loss(net(x), {k: v[idx] for k, v in targets.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)

    judge = Judge(net)
    held_images, held_labels = rendered(np.random.default_rng([seed, HELDOUT_STREAM]), HELDOUT_IMAGES)
    held = torch.from_numpy(held_images).permute(0, 3, 1, 2).float() / 255
    shaken = augment(held, torch.Generator().manual_seed(seed + 1))
    shaken_images = (shaken * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    report = {
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "train_images": TRAIN_IMAGES,
        "heldout_images": HELDOUT_IMAGES, "parameters": sum(p.numel() for p in net.parameters()),
        "threads": torch.get_num_threads(),
        "heldout": accuracies(judge(held_images), held_labels),
        "heldout_augmented": accuracies(judge(shaken_images), held_labels),
    }
    # CPU time is the budget that holds on any machine; wall time also counts waiting for a busy one.
    report["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    report["wall_seconds"] = round(time.time() - start, 1)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    write_checkpoint(out_dir / WEIGHTS_FILE, state, {"config": json.dumps(CONFIG)})
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def model_card(report: dict) -> str:
    rows = "\n".join(f"| {head} | {100 * acc:.2f}% | {100 * report['heldout_augmented'][head]:.2f}% |"
                     for head, acc in report["heldout"].items())
    return f"""# shapes-judge

The evaluator of the shapes world: a {report['parameters']:,}-parameter CNN (`erasekit.shapes.judge`) that
reads a uint8 32×32 image and says its shape (5), colour (6), fill pattern (3), grid position (9) and whether it has
a stamp (one sigmoid per corner). The concept-erasure metrics (`erasekit.shapes.metrics`) classify the
shapes-world model's samples with it.

## Training

- data: {report['train_images']:,} images rendered by `erasekit.shapes.data` (spec seed [{report['seed']}, \
{TRAIN_STREAM}]); no generated images;
- {report['steps']} AdamW steps of {report['batch_size']} images, one-cycle schedule, peak lr {report['lr']};
- fresh augmentations every step, standing in for how samples differ from renders: ±1 px shifts, slight blur,
  contrast ±15%, per-channel gain ±8%, brightness ±0.06, Gaussian noise σ ≤ 0.05, uint8 quantisation;
- rendering, training and evaluation: {report['cpu_seconds'] / 60:.1f} CPU minutes on {report['threads']} thread(s) \
({report['wall_seconds'] / 60:.1f} minutes wall clock, on a machine shared with other jobs).

Reproduce with

    python -m erasekit.shapes.judge --out weights/shapes-judge --steps {report['steps']} --seed {report['seed']}

## Held-out accuracy

{report['heldout_images']:,} freshly rendered images (spec seed [{report['seed']}, {HELDOUT_STREAM}]), as rendered and \
with the training augmentations applied.
"stamp" is presence (any corner > 0.5); "stamp_corners" is all four corner decisions right.

| head | rendered | augmented |
|---|---|---|
{rows}

## Limits

Trained on renders only: a sample far from the renderer's look (a smeared or hybrid shape) is still put in one
class. Read its verdicts on such images as the closest class, not as ground truth.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="the training time budget is for one thread")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = train_judge(args.out, steps=args.steps, seed=args.seed)
    (args.out / "README.md").write_text(model_card(report))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
