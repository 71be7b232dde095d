"""Node: a prompt list (typed, or an I2P-style .csv / a .txt file from ComfyUI's input folder) as one batch: one
conditioning that stacks a prompt per batch item, the negative repeated to the same batch, an empty latent and
per-item noise (parsing: erasers/io/prompt_lists.py)."""
from __future__ import annotations

import math
import os

from ..erasers.io.prompt_lists import MAX_SEED, PromptItem, PromptListError, parse_text, read_prompt_file, select
from .inputs import between_steps, check_count, checked_numbers, input_file, input_files, prompt_tokens

CATEGORY = "EraseKit"
NO_FILE = "none (typed prompts)"
SUFFIXES = (".csv", ".txt")


def _no_file(file: str) -> bool:
    return file.strip() in ("", NO_FILE)  # "": workflows from before the picker, and `erasekit batch`


def _items(prompts: str, file: str, seed: int) -> list[PromptItem]:
    if not _no_file(file) and prompts.strip():
        raise PromptListError("type the prompts or choose a file, not both: clear the 'prompts' box or set 'file' "
                              f"to {NO_FILE!r}")
    if not _no_file(file):
        return read_prompt_file(input_file(file, "file", SUFFIXES), seed, quote=False)  # no file text in errors
    items = parse_text(prompts, seed)
    if not items:
        raise PromptListError("no prompts: type one per line in 'prompts', or choose a .csv/.txt file in 'file'")
    return items


def check_work(clip, items: list[PromptItem], negative: str) -> None:
    """Refuse a batch above the prompt limit, or a prompt above the token limit, before encoding any of them."""
    check_count("prompts in the batch", len(items), "prompts")
    for item in items:
        prompt_tokens(clip, item.prompt, f"prompt {item.index}")
    prompt_tokens(clip, negative, "the negative prompt")


def _encode_each(clip, texts: list[str]) -> list:
    """Each text as CLIPTextEncode encodes it (its pooled output and extras per prompt), with ComfyUI's progress bar
    and interrupt honoured between prompts."""
    step = between_steps(len(texts))
    entries = []
    for done, text in enumerate(texts, 1):
        entries.append(_encode(clip, text))
        step(done, len(texts))
    return entries


def _encode(clip, text: str):
    """The (tensor, extras) entry CLIPTextEncode makes for `text`, so the batch equals that node prompt by prompt."""
    import nodes

    (conditioning,) = nodes.CLIPTextEncode().encode(clip, text)
    if len(conditioning) != 1:
        raise ValueError(f"this CLIP encodes a prompt into {len(conditioning)} conditioning entries (scheduled "
                         "hooks); the prompt list can only stack one entry per prompt")
    return conditioning[0]


def stack(entries: list) -> list:
    """One conditioning entry whose batch rows are the entries' (each of batch 1). Long prompts have more 77-token
    chunks: every row is repeated to the least common multiple of the lengths, which is how ComfyUI's sampler
    batches conditionings of different lengths (repeated keys and values leave attention unchanged)."""
    import torch

    length = math.lcm(*(cond.shape[1] for cond, _ in entries))
    tensor = torch.cat([cond.repeat(1, length // cond.shape[1], 1) for cond, _ in entries])
    extras = dict(entries[0][1])
    for key in extras.keys() - {"pooled_output"}:
        if not all(key in e and _equal(e[key], extras[key]) for _, e in entries):
            raise ValueError(f"the prompts' conditionings differ in {key!r}, which the prompt list cannot batch")
    if extras.get("pooled_output") is not None:
        extras["pooled_output"] = torch.cat([e["pooled_output"] for _, e in entries])
    return [[tensor, extras]]


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return a == b


class SeedNoise:
    """NOISE (SamplerCustomAdvanced, ComfyUI from mid-2024) with a seed per batch item: item b's noise is what
    KSampler draws for a batch of one with that item's seed, so the batch's images are those of the items queued
    one by one (as `erasekit batch` does), up to the batch's float rounding."""

    def __init__(self, seeds: list[int]):
        self.seeds = seeds
        self.seed = seeds[0]  # what SamplerCustomAdvanced seeds the sampler's own randomness (SDE, ancestral) with

    def generate_noise(self, input_latent: dict):
        import comfy.sample
        import torch

        latent = input_latent["samples"]
        if len(latent) != len(self.seeds):
            raise ValueError(f"the prompt list's noise has {len(self.seeds)} seeds but the latent a batch of "
                             f"{len(latent)}: use the prompt list's latent")
        return torch.cat([comfy.sample.prepare_noise(latent[b:b + 1], seed) for b, seed in enumerate(self.seeds)])


class PromptList:
    DESCRIPTION = (
        "A prompt list as one batch (one image per prompt): typed prompts (one per line), or a .csv file (a "
        "'prompt' column and optionally evaluation_seed, as in I2P and the erasure papers' CSVs) or .txt file. "
        "Outputs the stacked positive conditioning, the negative for the same batch, an empty latent, per-prompt "
        "noise and the prompts. Seeds: each row's evaluation_seed, else seed + its row index. KSampler takes one "
        "seed for the whole batch and ignores these: with the latent's batch_index, row r gets the r-th noise of "
        "KSampler's seed (the same whichever rows are selected). The 'noise' output gives each prompt its own seed, "
        "in SamplerCustomAdvanced (not in ComfyUI versions before it).")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT", "NOISE", "STRING")
    RETURN_NAMES = ("positive", "negative", "latent", "noise", "prompts")
    OUTPUT_IS_LIST = (False, False, False, False, True)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP",),
                "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "One prompt per line (blank "
                                       "lines skipped). Leave empty to read 'file'."}),
                "file": ([NO_FILE, *input_files(SUFFIXES)], {"default": NO_FILE, "tooltip": "A .csv with a "
                         "'prompt' column (I2P layout; its guidance column is for erasekit batch, not read here) or "
                         "a .txt with one prompt per line, from ComfyUI's input folder."}),
                "negative": ("STRING", {"multiline": True, "default": ""}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip": "Rows without an "
                                 "evaluation_seed get seed + their row index."}),
                "start": ("INT", {"default": 0, "min": 0, "max": 10**7, "tooltip": "First row (from 0)."}),
                "count": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Rows in the batch (0: all from "
                                  "start)."}),
                "width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, file=NO_FILE):
        """Any file in the input folder, not only those listed when the page loaded; "" from older workflows."""
        if _no_file(file):
            return True
        try:
            input_file(file, "file", SUFFIXES)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def IS_CHANGED(cls, file=NO_FILE, **_):
        if _no_file(file):
            return ""
        try:
            return os.path.getmtime(input_file(file, "file", SUFFIXES))  # rerun when the file is edited
        except (ValueError, OSError):
            return ""  # build() reports it

    def build(self, clip, prompts, file, negative, seed, start, count, width, height):
        import nodes

        items = select(_items(prompts, file, seed), start, count)
        check_work(clip, items, negative)
        batch = len(items)
        positive = stack(_encode_each(clip, [item.prompt for item in items]))
        negative = stack([_encode(clip, negative)] * batch)
        (latent,) = nodes.EmptyLatentImage().generate(width, height, batch)
        latent["batch_index"] = [item.index for item in items]
        return positive, negative, latent, SeedNoise([item.seed for item in items]), [item.prompt for item in items]


NODE_CLASS_MAPPINGS = {"EraseKitPromptList": checked_numbers(PromptList)}
NODE_DISPLAY_NAME_MAPPINGS = {"EraseKitPromptList": "EraseKit Prompt List"}
