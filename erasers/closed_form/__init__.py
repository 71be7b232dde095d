"""Closed-form edits of the cross-attention keys and values: UCE, RECE and TRCE stage 1.

solve.py (the shared least-squares solve and its low-rank form), recipes.py (each method's choice of embeddings,
the entry point `erase`), reference.py (the per-layer dense form the tests and benchmarks compare with),
official.py (the official releases' files turned into erasures), captions.py (TRCE's COCO prior).
Equations: docs/methods.md §2–4 (§2.4: the shared solve).
"""
from .recipes import METHODS, RECE_PRESETS, TEMPLATES, TRCE_FRAMES, EraseOptions, caption_prior, erase

__all__ = ["METHODS", "RECE_PRESETS", "TEMPLATES", "TRCE_FRAMES", "EraseOptions", "caption_prior", "erase"]
