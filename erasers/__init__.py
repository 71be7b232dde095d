"""The framework-agnostic core of EraseKit: math, file formats and training. Never imports ComfyUI."""
