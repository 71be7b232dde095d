"""Node: an AdvUnlearn text encoder (erasers/advunlearn/encoder.py) in place of an SD1.x CLIP's own, as weight
patches on a clone of the CLIP: the input CLIP, and the module its clones share, are never changed."""
from __future__ import annotations

import os

from ..erasers.advunlearn.encoder import AdvUnlearnEncoder, check_fits, load_advunlearn, not_sd1
from ..erasers.families import text_encoders
from ..erasers.io import comfy_folders
from .comfy_adapter import original_weight
from .inputs import checked_numbers, folder_file

CATEGORY = "EraseKit"
FOLDER = comfy_folders.TEXT_ENCODERS
PREFIX = "clip_l.transformer."  # ComfyUI's SD1ClipModel names: the transformers names under this prefix


class LoadAdvUnlearn:
    DESCRIPTION = ("Replace an SD1.x CLIP's text encoder with an AdvUnlearn one from models/text_encoders (or "
                   "models/clip): a released folder's pytorch_model.bin or model.safetensors, a training .pt, or one "
                   "safetensors file. Strength blends the CLIP's own weights (0) with AdvUnlearn's (1). Route this "
                   "CLIP to every text encoder, the negative prompt's included.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)

    def __init__(self) -> None:
        self.loaded: tuple[tuple, AdvUnlearnEncoder] | None = None  # like LoraLoader: the last file read

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "clip": ("CLIP",),
                "encoder_name": (folder_paths.get_filename_list(FOLDER),),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, encoder_name, **_):
        try:
            return os.path.getmtime(folder_file(FOLDER, encoder_name, "encoder_name"))
        except (ValueError, OSError):
            return ""  # load() reports it

    def load(self, clip, encoder_name, strength):
        path = folder_file(FOLDER, encoder_name, "encoder_name")
        key = (path, os.path.getmtime(path))
        if self.loaded is None or self.loaded[0] != key:
            self.loaded = (key, load_advunlearn(path))
        return (apply_text_encoder(clip, self.loaded[1], strength),)


def apply_text_encoder(clip, encoder: AdvUnlearnEncoder, strength: float = 1.0):
    """A clone of `clip` whose CLIP-L weights are `strength` of the way from its own to the encoder's.

    Each patch is the difference from the CLIP's unpatched weight, so patches the CLIP already carries (a LoRA) stay
    on top.
    """
    own = clip.cond_stage_model.state_dict()
    towers = {key.split(".", 1)[0] for key in own}
    if towers != {"clip_l"}:
        widths = {t.name: t.width for t in text_encoders({k: tuple(v.shape) for k, v in own.items()})}
        raise not_sd1("this CLIP", {name: widths.get(name, 0) for name in towers})
    check_fits(encoder, {k[len(PREFIX):]: v.shape for k, v in own.items() if k.startswith(PREFIX)}, "this CLIP")
    patches = {}
    for name, new in encoder.state_dict.items():
        key = PREFIX + name
        # On the CPU, where the encoder is: a loaded CLIP's weights may sit on the GPU. ComfyUI moves patches itself.
        delta = new.float() - original_weight(clip.patcher, key, own[key]).float().cpu()
        if delta.any():  # AdvUnlearn leaves the embeddings frozen: equal to the base model's, nothing to patch
            patches[key] = (delta,)
    patched = clip.clone()
    accepted = set(patched.add_patches(patches, strength))
    if accepted != set(patches):
        raise RuntimeError(f"ComfyUI took no patch for {sorted(set(patches) - accepted)[0]}")
    return patched


NODE_CLASS_MAPPINGS = {"EraseKitLoadAdvUnlearn": checked_numbers(LoadAdvUnlearn)}
NODE_DISPLAY_NAME_MAPPINGS = {"EraseKitLoadAdvUnlearn": "Load AdvUnlearn Text Encoder (EraseKit)"}
