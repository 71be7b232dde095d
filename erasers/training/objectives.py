"""Pieces of the objectives that EraseKit's trainers share (SPM, AdvUnlearn): ESD's erase target, the prompt
settings a run draws from, and the official DDIM sampler their rollouts use (methods.md §1.2, §5.2)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor


def erase_target(eps_pos: Tensor, eps_neu: Tensor, guidance: float) -> Tensor:
    """What the membrane-on prediction for the target is pulled to: ε_neu − g (ε_pos − ε_neu)."""
    return eps_neu - guidance * (eps_pos - eps_neu)


def prompt_settings(target: str, positive: str, neutral: str,
                    contexts: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """(target, positive, neutral) prompts per iteration choice: the bare three without contexts (the official
    single-entry prompt file), else each context template with its "{}" filled by each of them.

    Why contexts: a membrane trained on a bare word only learns what that word's embedding does on its own. In a
    small text encoder (the shapes world) the word inside a prompt ("a red striped circle") embeds differently
    from the word alone, and the bare word barely moves the UNet (far less than the same word in a prompt:
    docs/shapes-world.md, SPM), so such a membrane leaves every real prompt untouched. Filling the neutral into the same
    template ("a red striped {}" → "a red striped") keeps what the rest of the prompt asks for."""
    for context in contexts:
        if context.count("{}") != 1:
            raise ValueError(f"context {context!r}: needs exactly one '{{}}' where the concept goes")
    if not contexts:
        return [(target, positive, neutral)]
    fill = lambda context, text: " ".join(context.replace("{}", text).split())  # noqa: E731
    return [(fill(c, target), fill(c, positive), fill(c, neutral)) for c in contexts]


def official_ddim(scheduler_config: Mapping, fallback_prediction: str = "epsilon"):
    """The official DDIM (steps_offset 0, set_alpha_to_one, leading spacing, no clipping) on the model's betas."""
    from diffusers import DDIMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    kwargs = {k: scheduler_config[k] for k in keys if scheduler_config.get(k) is not None}
    return DDIMScheduler(**kwargs, clip_sample=False,
                         prediction_type=scheduler_config.get("prediction_type", fallback_prediction))
