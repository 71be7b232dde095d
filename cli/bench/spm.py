"""`erasekit bench spm`: UNet step time with SPM membranes gated per sample by Facilitated Transport (FT), beside
the plain UNet and the per-prompt reference (merged weights rebuilt for each prompt, one prompt at a time, as
infer_spm.py runs).

Everything runs on random weights (the cost of a step depends only on the shapes). A batch of B UNet samples holds
B/2 images, each a (prompt, negative prompt) pair as classifier-free guidance runs them: every prompt names an
erased concept (its FT gate is 1), every negative prompt is unrelated (a gate below 1), and the contexts differ.
The reference runs one image at a time: W₀ + ΔW at its prompt's strengths (gating cond and uncond alike, as
infer_spm.py does) loaded into the UNet, then one call at batch 2. Its rebuild is paid once per prompt, so it is
spread over the sampler's steps.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

from ...erasers.spm.hooks import attach_membranes, detach_membranes, membrane_gates, membrane_targets
from ...erasers.spm.membrane import stack_membranes
from ...erasers.text import TransformersEncoder
from ...testing.tiny_models import CLIP_L_TEXT_CONFIG, SD15_UNET_CONFIG, TINY_SD15_UNET_CONFIG, random_membranes
from .timing import seconds

# tiny-sd15: SD1.5's widths and 768-wide context on two levels (107 M parameters, the CPU default); sd15: the full
# 860 M-parameter UNet (for a GPU).
UNETS = {"tiny-sd15": TINY_SD15_UNET_CONFIG, "sd15": SD15_UNET_CONFIG}
# Concepts and prompts use the shapes world's words: its tokenizer is the CLIP-framed one that ships offline.
_COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
_SHAPES = ("circle", "square", "triangle", "star", "cross")
_STYLES = tuple(f"{p} {n}" for p in ("striped", "dotted", "solid", "plain", "spotted")
                for n in ("photo", "drawing", "painting", "image"))


def _concepts(count: int) -> list[str]:
    """`count` different "colour shape" concepts (6 and 5 are coprime: 30 before one repeats)."""
    return [f"{_COLORS[i % len(_COLORS)]} {_SHAPES[i % len(_SHAPES)]}" for i in range(count)]


def _texts(concepts: Sequence[str], images: int) -> list[str]:
    """Per image, a prompt naming a concept (in turn) and a negative prompt sharing no word with any concept."""
    texts = []
    for j in range(images):
        style = _STYLES[j % len(_STYLES)]
        texts += [f"a {style} of a {concepts[j % len(concepts)]}", f"a {style} of nothing"]
    return texts


def _text_side():
    """A tokenizer and a one-layer, 768-wide CLIP text encoder: only the context's shape reaches the UNet."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ...shapes.model import build_tokenizer

    tokenizer = build_tokenizer()
    config = CLIPTextConfig(**{**CLIP_L_TEXT_CONFIG, "vocab_size": len(tokenizer), "num_hidden_layers": 1,
                               "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                               "pad_token_id": tokenizer.pad_token_id})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(config).eval().requires_grad_(False)
    return tokenizer, text_encoder


def _build_unet(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNETS[name])
    # nn.Module.to, not diffusers' override, which warns on every cast about fp32-only modules (these UNets have none).
    return torch.nn.Module.to(unet, device, dtype).eval().requires_grad_(False)


class _Bench:
    """The UNet, text side and membranes shared by every row."""

    def __init__(self, unet: str, max_membranes: int, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.unet = _build_unet(unet, device, dtype)
        tokenizer, text_encoder = _text_side()
        # attach_membranes needs a pipeline's unet, tokenizer and text encoder, nothing else.
        self.pipe = SimpleNamespace(unet=self.unet, tokenizer=tokenizer, text_encoder=text_encoder)
        self.encode = TransformersEncoder([tokenizer], [text_encoder])
        self.targets = membrane_targets(self.unet)
        self.concepts = _concepts(max(max_membranes, 1))
        self.membranes = random_membranes(self.targets, self.concepts)
        self.originals = {path: module.weight.detach().clone() for path, module in self.targets.items()}

    def step(self, x: Tensor, context: Tensor) -> Tensor:
        return self.unet(x, 500, encoder_hidden_states=context).sample

    def reference(self, x: Tensor, context: Tensor, strengths: Tensor, stacks: dict) -> tuple[float, float]:
        """Mean (rebuild, UNet call) seconds per image, one image at a time on merged weights."""
        rebuilds, calls = [], []
        for j in range(x.shape[0] // 2):
            m = strengths[2 * j].to(self.device)  # the prompt's strengths gate its negative too

            def rebuild(m=m):  # timed in this iteration; the default binds its m all the same
                for path, stack in stacks.items():
                    self.targets[path].weight.copy_(self.originals[path] + stack.dense(m))

            rebuilds.append(seconds(rebuild, self.device) if stacks else 0.0)
            pair = slice(2 * j, 2 * j + 2)
            calls.append(seconds(lambda pair=pair: self.step(x[pair], context[pair]), self.device))
        for path in stacks:
            self.targets[path].weight.copy_(self.originals[path])
        return statistics.mean(rebuilds), statistics.mean(calls)

    def row(self, batch: int, count: int, latent: int, repeats: int, steps: int) -> dict:
        x = torch.randn(batch, self.unet.config.in_channels, latent, latent,
                        generator=torch.Generator().manual_seed(batch)).to(self.device, self.dtype)
        texts = _texts(self.concepts[:max(count, 1)], batch // 2)
        membranes = self.membranes[:count]
        # What infer_spm.py reads once (the files) is stacked once, on the device; a prompt only pays for W₀ + ΔW.
        stacks = ({path: stack.to(self.device, torch.float32) for path, stack in stack_membranes(membranes).items()}
                  if count else {})
        context = self.encode(texts).embeddings.to(self.device, self.dtype)
        times: dict[str, list[float]] = {"plain": [], "ours": [], "rebuild": [], "reference": []}
        for round_ in range(repeats + 1):  # round 0 warms everything up and is not counted
            plain_first = round_ % 2 == 1  # alternate, so that neither side always runs on a cache the other left
            if plain_first:
                plain = seconds(lambda context=context: self.step(x, context), self.device)
            if count:
                attach_membranes(self.pipe, membranes)
                # Encoded again after attaching, through the hooked text encoder, so FT knows the tokens.
                context = self.encode(texts).embeddings.to(self.device, self.dtype)
            # FT strengths are computed once per distinct context and cached, and a sampler passes the same context
            # at every step: one untimed step fills the caches, so the timed one is a sampler's next step.
            gates = membrane_gates(self.pipe, context) if count else torch.zeros(batch, 0)
            if count:
                self.step(x, context)
            ours = seconds(lambda context=context: self.step(x, context), self.device)
            detach_membranes(self.pipe)
            if not plain_first:
                plain = seconds(lambda context=context: self.step(x, context), self.device)
            rebuild, reference = self.reference(x, context, gates, stacks)
            if round_:
                for key, value in zip(times, (plain, ours, rebuild, reference)):
                    times[key].append(value)
        median = {key: statistics.median(values) for key, values in times.items()}
        top = gates.amax(1) if count else None
        return {
            "batch": batch, "membranes": count, "plain_s": median["plain"], "ours_s": median["ours"],
            "rebuild_s": median["rebuild"], "reference_image_s": median["reference"] + median["rebuild"] / steps,
            "ours_image_s": median["ours"] / (batch // 2),
            "gate_prompts": top[0::2].mean().item() if count else None,
            "gate_negatives": top[1::2].mean().item() if count else None,
        }


def spm_rows(unet: str = "tiny-sd15", membranes: Sequence[int] = (0, 1, 4, 16), batches: Sequence[int] = (2, 8),
             latent: int = 32, repeats: int = 3, steps: int = 30, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Iterator[dict]:
    """Yield one measured row per (batch, membrane count), batches outermost."""
    bench = _Bench(unet, max(membranes), torch.device(device), dtype)
    for batch in batches:
        for count in membranes:
            with torch.no_grad():  # closed before the yield: the caller's grad mode is left alone
                row = bench.row(batch, count, latent, repeats, steps)
            yield row


HEADER = (f"{'batch':>5} {'memb':>4} | {'plain s':>9} {'ours s':>9} {'overhead':>8} | {'rebuild s':>9} "
          f"{'ref s/img':>9} {'ours s/img':>10} {'ref/ours':>8} | {'gates p/n':>9}")


def format_row(r: dict) -> str:
    overhead = 100 * (r["ours_s"] / r["plain_s"] - 1)
    gates = "-" if r["gate_prompts"] is None else f"{r['gate_prompts']:.2f}/{r['gate_negatives']:.2f}"
    return (f"{r['batch']:>5} {r['membranes']:>4} | {r['plain_s']:>8.4f}s {r['ours_s']:>8.4f}s {overhead:>+7.1f}% | "
            f"{r['rebuild_s']:>8.4f}s {r['reference_image_s']:>8.4f}s {r['ours_image_s']:>9.4f}s "
            f"{r['reference_image_s'] / r['ours_image_s']:>7.2f}x | {gates:>9}")


def run_spm(unet: str = "tiny-sd15", membranes: Sequence[int] = (0, 1, 4, 16), batches: Sequence[int] = (2, 8),
            latent: int = 32, repeats: int = 3, steps: int = 30, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32) -> None:
    """Measure and print each row as soon as it is done; ValueError on bad sizes, before anything runs."""
    if unet not in UNETS:
        raise ValueError(f"unknown UNet {unet!r}: {', '.join(UNETS)}")
    if not batches or any(b < 2 or b % 2 for b in batches):
        raise ValueError(f"batch sizes must be even and at least 2 (a prompt and its negative per image), got "
                         f"{list(batches)}")
    if not membranes or min(membranes) < 0:
        raise ValueError(f"membrane counts must be 0 or more, got {list(membranes)}")
    if latent < 1 or repeats < 1 or steps < 1:
        raise ValueError(f"--latent, --repeats and --steps must be at least 1 (got {latent}, {repeats}, {steps})")
    device = torch.device(device)
    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} CPU thread(s)"
    print(f"SPM, FT on, rank-1 membranes on every transformer layer of a random {unet} UNet, {str(dtype)[6:]} on "
          f"{device}{threads}, {latent}x{latent} latents. A batch of B holds B/2 images (a prompt naming an erased "
          f"concept + an unrelated negative prompt). s = seconds per UNet step, medians of {repeats} after one "
          "warm-up round; FT strengths are cached per context by an untimed step. Reference per image: rebuild "
          f"W0 + dW at its prompt's strengths (spread over {steps} steps), then one UNet call at batch 2.",
          flush=True)
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for row in spm_rows(unet, membranes, batches, latent, repeats, steps, device, dtype):
        print(format_row(row), flush=True)
