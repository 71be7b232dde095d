"""AdvUnlearn: a text encoder retrained with a bilevel adversarial objective (Zhang et al., NeurIPS 2024).

encoder.py (loading released encoders and swapping them into a pipeline), train.py (the bilevel training).
Equations: docs/methods.md §5.
"""
from ..io.text_encoders import TextEncoderError
from .encoder import (
    CLIP_L_WIDTH,
    TOKEN_EMBEDDING,
    AdvUnlearnEncoder,
    check_fits,
    load_advunlearn,
    not_sd1,
    restore_text_encoder,
    swap_text_encoder,
)

__all__ = [
    "CLIP_L_WIDTH", "TOKEN_EMBEDDING", "AdvUnlearnEncoder", "TextEncoderError", "check_fits", "load_advunlearn",
    "not_sd1", "restore_text_encoder", "swap_text_encoder",
]
