"""Node: load an SPM membrane onto a MODEL and CLIP (the adapter, and how FT reaches the layers:
membrane_adapter.py)."""
from __future__ import annotations

import os

from ..erasers.spm import Membrane, load_membrane
from .comfy_adapter import models_folder
from .membrane_adapter import apply_membrane

CATEGORY = "EraseKit"
FOLDER = "spm"


def spm_folder() -> str:
    """Register models/spm and return its first directory."""
    return models_folder(FOLDER, {".safetensors"})


# --- node -------------------------------------------------------------------------------------------------------


class LoadMembrane:
    DESCRIPTION = ("Load an SPM membrane (models/spm) onto the MODEL, with Facilitated Transport: each prompt, "
                   "the negative included, is gated by how close it is to the concepts the membrane erases, per "
                   "sample of every UNet batch. Route the CLIP through this node (its prompts' token ids are "
                   "recorded for FT). Chain loaders for several membranes. FT off: a plain LoRA.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")

    def __init__(self) -> None:
        self.loaded: tuple[str, float, Membrane] | None = None  # like LoraLoader: the last file read

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
            }
        }

    @classmethod
    def IS_CHANGED(cls, membrane_name, **_):
        import folder_paths

        spm_folder()
        path = folder_paths.get_full_path(FOLDER, membrane_name)
        return os.path.getmtime(path) if path else ""

    def load(self, model, clip, membrane_name, strength, facilitated_transport=True, combine="additive"):
        import folder_paths

        spm_folder()
        path = folder_paths.get_full_path(FOLDER, membrane_name)
        if path is None:
            raise FileNotFoundError(f"no SPM membrane {membrane_name!r} in models/{FOLDER}")
        mtime = os.path.getmtime(path)
        if self.loaded is None or self.loaded[:2] != (path, mtime):
            self.loaded = (path, mtime, load_membrane(path))
        return apply_membrane(model, clip, self.loaded[2], strength, facilitated_transport, combine)


NODE_CLASS_MAPPINGS = {"EraseKitLoadMembrane": LoadMembrane}
NODE_DISPLAY_NAME_MAPPINGS = {"EraseKitLoadMembrane": "Load SPM Membrane (EraseKit)"}
