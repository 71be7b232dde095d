"""Nodes: erase concepts in closed form (UCE, RECE, TRCE stage 1), save an erasure, load one."""
from __future__ import annotations

import logging
import os
import re

from ..erasers.closed_form import official, recipes
from ..erasers.closed_form.captions import coco_captions
from ..erasers.erasure import Erasure
from ..erasers.families import kv_family
from ..erasers.io import comfy_folders
from .comfy_adapter import ATTENTION, ComfyEncoder, apply_erasure, kv_weights, models_folder, unet_weights
from .inputs import between_steps, check_count, check_tokens, checked_numbers, folder_file, inside_folder

CATEGORY = "EraseKit"
FOLDER = comfy_folders.ERASURES


def erasers_folder() -> str:
    """Register models/erasers and return its first directory."""
    # Official releases too: UCE .safetensors, UCE-2023/RECE .pt, a TRCE folder's diffusion_pytorch_model file.
    return models_folder(FOLDER, {".safetensors", ".pt", ".pth", ".bin", ".ckpt"})


def load_any_erasure(path: str, model) -> Erasure:
    """An EraseKit erasure file, or an official UCE/RECE/TRCE release converted against this MODEL's weights."""
    if official.detect_format(path) == official.ERASEKIT:
        return Erasure.load(path)
    erasure, report = official.convert(path, unet_weights(model, ATTENTION))
    logging.getLogger("erasekit").info("converted %s:\n%s", os.path.basename(path), report.text())
    return erasure


def split_concepts(text: str) -> list[str]:
    """One concept per line, or several on a line separated by ';' or ','."""
    return [part.strip() for part in re.split(r"[\n;,]", text) if part.strip()]


def check_work(opts) -> None:
    """Refuse more concepts, guides or preserved concepts than the limit before anything is encoded."""
    for what, items in (("concepts to erase", opts.concepts), ("guide concepts", opts.guide),
                        ("concepts to preserve", opts.preserve)):
        check_count(what, len(items), "concepts")


class EraseConcepts:
    DESCRIPTION = ("Erase concepts from the MODEL in closed form, in seconds: UCE, RECE (UCE plus adversarial "
                   "re-erasure epochs) or TRCE stage 1. Edits the cross-attention keys/values of a clone; the input "
                   "MODEL is unchanged. Outputs the edited MODEL and the erasure (to save or inspect).")
    CATEGORY = CATEGORY
    FUNCTION = "erase"
    RETURN_TYPES = ("MODEL", "ERASURE")
    RETURN_NAMES = ("model", "erasure")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint, used to encode the concepts."}),
                "method": (list(recipes.METHODS), {"default": "uce"}),
                "concepts": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "Concepts to erase: one per line, or separated by ';' or ','."}),
                "guide": ("STRING", {"default": "", "tooltip": "What erased concepts become (empty: the "
                                     "unconditional prompt; 'art' for styles). One for all, or one per concept."}),
                "preserve": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "Concepts whose keys and values must not move."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05}),
            },
            "optional": {
                "token_selection": (["last", "suffix"], {"default": "last", "tooltip": "UCE: 'last' word token "
                                    "(2025 code) or 'suffix' from it to the end (2023 code, RECE's start)."}),
                "technique": (["replace", "tensor"], {"default": "replace"}),
                "lamb": ("FLOAT", {"default": 0.5, "min": 0.001, "max": 100.0, "step": 0.01}),
                "erase_scale": ("FLOAT", {"default": 1.0, "min": 0.001, "max": 100.0, "step": 0.01}),
                "preserve_scale": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "-1: the method's default."}),
                "expand_prompts": (["none", "object", "art"], {"default": "none"}),
                "rece_preset": (["none", *recipes.RECE_PRESETS], {"default": "none"}),
                "rece_epochs": ("INT", {"default": -1, "min": -1, "max": 20, "tooltip": "-1: the preset's."}),
                "trce_prior_captions": ("INT", {"default": 500, "min": 10, "max": 2000,
                                                "tooltip": "COCO captions for TRCE's prior-preservation term."}),
            },
        }

    def erase(self, model, clip, method, concepts, guide, preserve, strength, token_selection="last",
              technique="replace", lamb=0.5, erase_scale=1.0, preserve_scale=-1.0, expand_prompts="none",
              rece_preset="none", rece_epochs=-1, trce_prior_captions=500):
        opts = recipes.EraseOptions(
            method=method,
            concepts=split_concepts(concepts),
            guide=[g.strip() for g in guide.split(";")] if guide.strip() else [],
            preserve=split_concepts(preserve),
            lam=lamb,
            erase_scale=erase_scale,
            preserve_scale=None if preserve_scale < 0 else preserve_scale,
            technique=technique,
            tokens=token_selection,
            expand=None if expand_prompts == "none" else expand_prompts,
            preset=None if rece_preset == "none" else rece_preset,
            epochs=None if rece_epochs < 0 else rece_epochs,
        )
        check_work(opts)
        opts.validate()
        # ~1 s per text-encoder call: 32 prompts on a GPU, fewer on a CPU, so the Cancel button acts within seconds.
        encoder = ComfyEncoder(clip, progress=between_steps(len(opts.concepts)), check_tokens=check_tokens,
                               seconds=1.0)
        prior = recipes.caption_prior(encoder, coco_captions(trce_prior_captions)) if method == "trce" else None
        progress = between_steps(opts.epochs or recipes.RECE_PRESETS.get(opts.preset or "", {}).get("epochs", 1))
        kv = kv_weights(model)
        erasure = recipes.erase(kv, encoder, kv_family(kv).name, opts,
                                     progress=progress if method == "rece" else None, prior=prior)
        return (apply_erasure(model, erasure, strength), erasure)


class SaveErasure:
    DESCRIPTION = "Save an erasure to models/erasers as .safetensors (factors plus metadata), to reuse or share."
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"erasure": ("ERASURE",), "filename_prefix": ("STRING", {"default": "erasekit/erasure"})}}

    def save(self, erasure: Erasure, filename_prefix: str):
        root = erasers_folder()
        prefix = os.path.normpath(filename_prefix)
        if os.path.isabs(prefix) or prefix.startswith(".."):
            raise ValueError(f"filename_prefix {filename_prefix!r} must stay inside models/{FOLDER}")
        # A subfolder of the prefix may be a symlink out: refused before any path behind it is even probed.
        inside_folder(os.path.join(root, prefix), [root], filename_prefix, "filename_prefix", f"models/{FOLDER}")
        counter = 1
        while os.path.exists(path := os.path.join(root, f"{prefix}_{counter:05}.safetensors")):
            counter += 1
        erasure.save(path)
        name = os.path.relpath(path, root)
        return {"ui": {"text": [f"saved {name}: {erasure.method} erasing {', '.join(erasure.concepts)}"]}}


class LoadErasure:
    DESCRIPTION = ("Apply an erasure from models/erasers to a clone of the MODEL, at a strength: an EraseKit file, "
                   "or an official UCE (.safetensors), UCE-2023/RECE (.pt) or TRCE (folder) release, converted "
                   "against this MODEL's weights.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "ERASURE")
    RETURN_NAMES = ("model", "erasure")

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        erasers_folder()
        return {
            "required": {
                "model": ("MODEL",),
                "erasure_name": (folder_paths.get_filename_list(FOLDER),),
                "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, erasure_name, **_):
        erasers_folder()
        try:
            return os.path.getmtime(folder_file(FOLDER, erasure_name, "erasure_name"))
        except (ValueError, OSError):
            return ""  # load() reports it

    def load(self, model, erasure_name, strength):
        erasers_folder()
        path = folder_file(FOLDER, erasure_name, "erasure_name")
        erasure = load_any_erasure(path, model)
        return (apply_erasure(model, erasure, strength), erasure)


NODE_CLASS_MAPPINGS = {
    "EraseKitEraseConcepts": checked_numbers(EraseConcepts),
    "EraseKitSaveErasure": SaveErasure,
    "EraseKitLoadErasure": checked_numbers(LoadErasure),
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EraseKitEraseConcepts": "Erase Concepts, closed form (EraseKit)",
    "EraseKitSaveErasure": "Save Erasure (EraseKit)",
    "EraseKitLoadErasure": "Load Erasure (EraseKit)",
}
