"""The framework-agnostic core of EraseKit: math, file formats and training. Never imports ComfyUI."""

# The package's version, here in the core so that files it writes can name it; the top-level package re-exports it.
__version__ = "0.1.0"
