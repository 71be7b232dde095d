"""Node: report what a MODEL and CLIP are, and so which erasure files can apply to them."""
from __future__ import annotations

from ..erasers.families import describe_model

CATEGORY = "EraseKit"


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in module.state_dict(keep_vars=True).items()}


class InspectModel:
    DESCRIPTION = ("Reports the model family, the cross-attention layers (count and widths) and the text encoders, "
                   "i.e. which erasure files can apply to this MODEL and CLIP.")
    CATEGORY = CATEGORY
    FUNCTION = "inspect"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": ("MODEL", {"tooltip": "The diffusion model to inspect."})},
            "optional": {"clip": ("CLIP", {"tooltip": "Its text encoder (checked against the model's family)."})},
        }

    def inspect(self, model, clip=None):
        # Shapes only, read from the live modules: nothing is copied or patched.
        unet = _shapes(model.model.diffusion_model)
        text = _shapes(clip.cond_stage_model) if clip is not None else None
        report = describe_model(unet, text).text()
        return {"ui": {"text": [report]}, "result": (report,)}


NODE_CLASS_MAPPINGS = {"EraseKitInspectModel": InspectModel}
NODE_DISPLAY_NAME_MAPPINGS = {"EraseKitInspectModel": "Inspect Model for Erasure (EraseKit)"}
