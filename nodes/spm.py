"""Node: load an SPM membrane onto a MODEL and CLIP (the adapter, and how FT reaches the layers:
membrane_adapter.py)."""
from __future__ import annotations

import os
from pathlib import Path

from ..erasers.io import comfy_folders
from ..erasers.spm.membrane import Membrane, MissingConceptsError, load_membrane
from .comfy_adapter import models_folder
from .inputs import checked_numbers, folder_file
from .membrane_adapter import apply_membrane

CATEGORY = "EraseKit"
FOLDER = comfy_folders.SPM


def spm_folder() -> str:
    """Register models/spm and return its first directory."""
    return models_folder(FOLDER, {".safetensors"})


# --- node -------------------------------------------------------------------------------------------------------


class LoadMembrane:
    DESCRIPTION = ("Load an SPM membrane (models/spm) onto the MODEL, with Facilitated Transport: each prompt, "
                   "the negative included, is gated by how close it is to the concepts the membrane erases, per "
                   "sample of every UNet batch (uncond_gate 'positive': the negative by its image's positive prompt, "
                   "as the official infer_spm.py). Route the CLIP through this node (its prompts' token ids are "
                   "recorded for FT). Chain loaders for several membranes. FT off: a plain LoRA.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")

    def __init__(self) -> None:
        self.loaded: tuple[tuple, Membrane] | None = None  # like LoraLoader: the last file read, and how

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        spm_folder()
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP", {"tooltip": "Encodes the erased concepts for FT; connect its output to the text "
                                             "encoders."}),
                "membrane_name": (folder_paths.get_filename_list(FOLDER),),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05}),
                "facilitated_transport": ("BOOLEAN", {"default": True, "tooltip": "Gate the membrane per prompt "
                                                      "(off: a plain LoRA at this strength for every prompt)."}),
                "combine": (["additive", "official"], {"default": "additive", "tooltip": "How the membranes of a "
                            "chain add up: 'additive' sums them; 'official' reproduces infer_spm.py (factors "
                            "scaled and summed: cross terms, and strength²)."}),
            },
            "optional": {
                "concepts": ("STRING", {"default": "", "tooltip": "The concepts the membrane erases, comma-separated, "
                             "for FT. Empty: the file's 'prompts' metadata (files without it need this)."}),
                "uncond_gate": (["own", "positive"], {"default": "own", "tooltip": "How FT gates the negative "
                                "prompt's samples: 'own' by the negative prompt itself; 'positive' by their image's "
                                "positive prompt, as the official infer_spm.py does (with combine 'official': its "
                                "computation). Every loader of a chain must choose the same."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, membrane_name, **_):
        spm_folder()
        try:
            return os.path.getmtime(folder_file(FOLDER, membrane_name, "membrane_name"))
        except (ValueError, OSError):
            return ""  # load() reports it

    def load(self, model, clip, membrane_name, strength, facilitated_transport=True, combine="additive", concepts="",
             uncond_gate="own"):
        spm_folder()
        path = folder_file(FOLDER, membrane_name, "membrane_name")
        key = (path, os.path.getmtime(path), concepts, facilitated_transport)
        if self.loaded is None or self.loaded[0] != key:
            self.loaded = (key, _read(path, concepts, facilitated_transport))
        return apply_membrane(model, clip, self.loaded[1], strength, facilitated_transport, combine, uncond_gate)


def _read(path: str, concepts: str, ft: bool) -> Membrane:
    names = [c.strip() for c in concepts.split(",") if c.strip()] or None
    try:
        return load_membrane(path, names)
    except MissingConceptsError:
        if ft:
            raise MissingConceptsError(
                f"{Path(path).name} does not say which concepts it erases (no 'prompts' metadata), and Facilitated "
                "Transport needs them: type them into this node's 'concepts' input (comma-separated), or turn "
                "facilitated_transport off to apply it as a plain LoRA") from None
        return load_membrane(path, [Path(path).stem])  # FT off never compares prompts with the concepts


NODE_CLASS_MAPPINGS = {"EraseKitLoadMembrane": checked_numbers(LoadMembrane)}
NODE_DISPLAY_NAME_MAPPINGS = {"EraseKitLoadMembrane": "Load SPM Membrane (EraseKit)"}
