"""Thin ComfyUI nodes over erasers/. No module here imports ComfyUI at import time, so `import erasekit` works
without it; ComfyUI modules are imported inside node functions."""
from . import advunlearn, closed_form, geom_erasing, inspect_model, prompt_list, spm

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (inspect_model, closed_form, spm, prompt_list, geom_erasing, advunlearn):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
