"""Train the shapes-world model from scratch: text encoder and UNet together, ε-prediction with min-SNR weighting,
10% empty captions for classifier-free guidance; the final step's weights are the model.

No EMA of the weights: averaging the weights of the last few hundred steps averages away a rare mark that no caption
explains, so an EMA draws the never-captioned stamp far below the training rate while the final weights keep it
(the 4,000-step run's figures: docs/shapes-world.md, The shipped model).

Deterministic and resumable: batch `s` is `data.batch(seed * 1_000_003 + s, batch_size)` and its timesteps and
noise come from a generator with the same seed (distinct for every (seed, s) of a run), so a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would. A checkpoint (`DIR/checkpoint.pt`, our own
tensors only, read back with weights_only) is written every `--save-every` steps and when the time budget runs
out; `DIR/log.jsonl` has one line per logged step.

    python -m erasekit.shapes.train --out runs/world --steps 2400 [--minutes 170] [--export weights/shapes-world]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import data, model

MIN_SNR_GAMMA = 5.0


def _alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**model.SCHEDULE).alphas_cumprod


def loss_on_batch(unet, text_encoder, tokenizer, images: torch.Tensor, captions: list[str],
                  generator: torch.Generator, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    n = images.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    a = alphas_cumprod[t].view(n, 1, 1, 1)
    noisy = a.sqrt() * images + (1 - a).sqrt() * noise
    ids = tokenizer(captions, padding="max_length", max_length=model.CONTEXT_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    weight = snr.clamp(max=MIN_SNR_GAMMA) / snr  # min-SNR-γ (Hang et al. 2023) for ε-prediction
    return (weight * (pred - noise).pow(2).mean((1, 2, 3))).mean()


def _lr(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup)


def train(out: Path, steps: int, batch_size: int = 64, lr: float = 5e-4, warmup: int = 200, seed: int = 0,
          minutes: float | None = None, save_every: int = 100, log_every: int = 10) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, text_encoder, unet = model.build_models(seed)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    step, elapsed, loss_avg = 0, 0.0, None
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        step, elapsed, loss_avg = state["step"], state["elapsed"], state["loss_avg"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min trained)")
    alphas = _alphas_cumprod()
    start = time.time() - elapsed
    log = (out / "log.jsonl").open("a")

    def save() -> None:
        state = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                 "opt": opt.state_dict(), "step": step, "elapsed": time.time() - start, "loss_avg": loss_avg}
        torch.save(state, out / "checkpoint.tmp")
        (out / "checkpoint.tmp").replace(ckpt)

    unet.train(), text_encoder.train()
    while step < steps:
        images, captions, _ = data.batch(seed * 1_000_003 + step, batch_size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        loss = loss_on_batch(unet, text_encoder, tokenizer, torch.from_numpy(images), captions, generator, alphas)
        for group in opt.param_groups:
            group["lr"] = _lr(step, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        value = loss.item()
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        if step % log_every == 0 or step == steps:
            record = {"step": step, "loss": value, "loss_avg": loss_avg, "minutes": (time.time() - start) / 60}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
        out_of_time = minutes is not None and time.time() - start > minutes * 60
        if step % save_every == 0 or step == steps or out_of_time:
            save()
        if out_of_time:
            break
    summary = {"seed": seed, "steps": step, "target_steps": steps, "batch_size": batch_size, "lr": lr,
               "warmup": warmup, "minutes": (time.time() - start) / 60,
               "final_loss_avg": loss_avg, "threads": torch.get_num_threads()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def export(run: Path, dest: Path) -> None:
    """Write the weights of `run`'s checkpoint as a ShapesPipeline folder."""
    tokenizer, text_encoder, unet = model.build_models()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    unet.load_state_dict(state["unet"])
    text_encoder.load_state_dict(state["text_encoder"])
    model.ShapesPipeline(tokenizer, text_encoder.eval(), unet.eval(), model.build_scheduler()).save(dest)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, log); resumes if it has one")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, help="stop (with a checkpoint) once the run has trained this long in all, "
                    "counting the minutes of earlier sessions in --out")
    ap.add_argument("--export", type=Path, help="write the model here when training stops")
    args = ap.parse_args(argv)
    summary = train(args.out, args.steps, args.batch_size, args.lr, seed=args.seed, minutes=args.minutes)
    print(json.dumps(summary))
    if args.export:
        export(args.out, args.export)


if __name__ == "__main__":
    main()
