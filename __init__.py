"""EraseKit: concept erasure for text-to-image diffusion models.

This folder is both a ComfyUI custom node pack (ComfyUI reads NODE_CLASS_MAPPINGS here) and the Python package
`erasekit` (the framework-agnostic core is `erasekit.erasers`). Importing it never imports ComfyUI.
"""
from .erasers import __version__
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
