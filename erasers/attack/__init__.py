"""Attacks for evaluation: UnlearnDiffAtk's adversarial prompt prefixes (unlearn_diff.py) and the soft-prompt
attacker AdvUnlearn trains against (soft_prompt.py). Equations: docs/methods.md §5."""
from .unlearn_diff import (
    LR,
    SEARCH_TIMESTEPS,
    SEARCH_WEIGHT_DECAY,
    STEPS,
    AttackResult,
    K,
    SearchResult,
    attack_loss,
    project_to_simplex,
    search_timesteps,
    unlearn_diff_attack,
    unlearn_diff_search,
)

__all__ = [
    "K", "LR", "SEARCH_TIMESTEPS", "SEARCH_WEIGHT_DECAY", "STEPS", "AttackResult", "SearchResult", "attack_loss",
    "project_to_simplex", "search_timesteps", "unlearn_diff_attack", "unlearn_diff_search",
]
