"""Geom-Erasing: implicit concepts (watermarks, QR codes, text) erased through negative prompts with learned
location tokens (Liu et al., 2023). negatives.py (the tokens, their files and the negative prompts), train.py
(training in the paper's model- and data-removal settings). Equations: docs/methods.md §6."""
