"""Training an SPM membrane (Lyu et al., CVPR 2024) with the official `erase_with_la` objective (methods.md §1.2).

One iteration, as the official train_spm.py does it:
1. draw k ~ U{1, …, ddim_steps − 1} and, with the membrane on, run k DDIM steps from z_T ~ N(0, I) with CFG 3
   between "" and the target: that is x_t;
2. t = the 1000-step schedule's timesteps[int(k · 1000 / ddim_steps)] (official quirk: not the DDIM step reached);
3. membrane off (frozen model): ε_pos = ε(x_t, c_pos, t), ε_neu = ε(x_t, c_neu, t); erase target
   ε_neu − g (ε_pos − ε_neu);
4. membrane on: L_erase = ‖ε_{θ+Δ}(x_t, c_tar, t) − target‖²;
5. Latent Anchoring: random embeddings a_j = s ‖E(c_tar)‖ n̂ (n ~ N(0, I) over the whole 77×d context, accepted
   with probability 1 − cos(E(c_tar), n̂), s ~ U[0.8, 1.2]);
   L_LA = ‖ε_{θ+Δ}(x_t, a, t) − ε_θ(x_t, a, t)‖²;
6. L = L_erase + β L_LA; AdamW on the membrane's up/down factors only, cosine-with-restarts LR.

Official quirk kept by default (``official_anchor_batch``): the reference code runs its anchor batch through its
CFG helper at guidance 1, which interleaves the unconditional embedding with the anchors ([∅, a_1, ∅, a_2, …]) and
keeps only the second half of that batch. So for 4 anchors L_LA is the mean over (∅, a_3, ∅, a_4): half of the
anchoring weight preserves the unconditional prediction ε(x_t, ∅), which CFG relies on. Set it to False for the
paper's description (the mean over the anchors themselves).

The membrane acts through `spm.MembraneStack` (the same module-level math `spm_diffusers` uses at inference), on
the modules `spm_diffusers.membrane_targets` finds; the text encoder and UNet are never changed. The result is a
`Membrane` written with `save_membrane`, so every SPM / LoRA loader reads it.

Models: SD1.x / SD2.x-style diffusers pipelines (tokenizer, text_encoder, unet, scheduler and a VAE; the context
is the text encoder's last hidden state, the latent shape comes from the UNet config) and the pixel-space shapes
world (no VAE; trained at its fixed 32×32). SDXL is not supported (NotImplementedError).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..text import TransformersEncoder
from ..training import resumable
from ..training.frozen import frozen
from ..training.objectives import erase_target, official_ddim, prompt_settings
from ..training.resumable import Progress, resume_path
from .hooks import membrane_targets
from .membrane import Membrane, MembraneLayer, MembraneStack, save_membrane


@dataclass
class SPMTrainConfig:
    """Hyperparameters; the defaults are the official SD1.4 configs (methods.md §1.3)."""

    rank: int = 1
    alpha: float = 1.0
    iterations: int = 3000
    lr: float = 1e-4
    weight_decay: float = 0.01  # the official AdamW8bit's default
    warmup: int = 500  # LR warm-up steps
    restarts: int = 3  # cycles of cosine_with_restarts
    ddim_steps: int = 30  # the DDIM schedule x_t is drawn from (max_denoising_steps)
    rollout_guidance: float = 3.0  # CFG of the rollout that makes x_t (hard-coded 3 in the official code)
    erase_guidance: float = 1.0  # g in ε_neu − g (ε_pos − ε_neu)
    la_strength: float = 1000.0  # β; 0 gives the `erase` ablation (no anchoring)
    anchors: int = 4  # sampling_batch_size
    official_anchor_batch: bool = True  # see the module docstring
    resolution: int = 512  # pixel bucket of latent (VAE) models
    dynamic_resolution: bool = True  # latent models: H, W ~ U{res/2, res/2 + 64, …, res − 64} (never res itself)
    seed: int = 0
    checkpoint_every: int = 500  # with `out`: a resume checkpoint every so many iterations (0: none)

    @classmethod
    def shapes(cls, **overrides) -> "SPMTrainConfig":
        """Defaults for the shapes world, sized for the 15-minute training budget (see SHAPES_DEFAULTS)."""
        return cls(**{**SHAPES_DEFAULTS, **overrides})

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.restarts < 1:
            raise ValueError(f"warmup must be >= 0 and restarts >= 1, got {self.warmup} and {self.restarts}")
        if self.ddim_steps < 2:
            raise ValueError(f"ddim_steps must be >= 2 (x_t comes from 1 … ddim_steps − 1 steps), got "
                             f"{self.ddim_steps}")
        if self.la_strength < 0 or self.anchors < 0:
            raise ValueError(f"la_strength and anchors must be >= 0, got {self.la_strength} and {self.anchors}")
        if self.la_strength > 0 and self.anchors == 0:
            raise ValueError("latent anchoring (la_strength > 0) needs anchors >= 1")
        if self.dynamic_resolution and self.resolution < 128:
            raise ValueError(f"dynamic resolution draws from 64-pixel steps between resolution/2 and resolution; "
                             f"resolution {self.resolution} is too small")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")


# Shapes-world defaults (why each differs from SD1.4's, with the runs behind them: docs/shapes-world.md, SPM):
# - ddim_steps 12: x_t comes from trajectories like the 10-step sampling the world is judged with, and the rollout
#   (k UNet calls on a CFG batch of 2) dominates an iteration's cost.
# - la_strength 100 with the world's prompt contexts (shapes.methods.spm_contexts): in a 64-wide text space a random
#   anchor overlaps any word's direction far more than in CLIP-L's 768, so the official β = 1000 also anchors the
#   concept and holds the membrane at the identity; 100 is the most anchoring that still erased.
SHAPES_DEFAULTS = dict(iterations=300, lr=3e-3, warmup=50, ddim_steps=12, la_strength=100.0, checkpoint_every=50)


# --- pieces of the objective ------------------------------------------------------------------------------------



def sample_anchors(target: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """`n` Latent-Anchoring embeddings [n, *target.shape] (float32, CPU) for the context `target` ([L, d] or
    [1, L, d]): random directions n̂ over the whole context, each accepted with probability 1 − cos(target, n̂),
    scaled to s·‖target‖ with s ~ U[0.8, 1.2]."""
    flat = target.detach().float().cpu().reshape(-1)
    norm = flat.norm()
    anchors = []
    while len(anchors) < n:
        while True:
            direction = torch.randn(flat.shape, generator=generator)
            direction = direction / direction.norm()
            accept = 1 - F.cosine_similarity(flat, direction, dim=0)
            if torch.rand((), generator=generator) < accept:
                break
        scale = 0.8 + 0.4 * torch.rand((), generator=generator)
        anchors.append((scale * norm * direction).reshape(target.shape))
    return torch.stack(anchors)


def anchor_batch(anchors: Tensor, unconditional: Tensor, official: bool = True) -> Tensor:
    """The contexts L_LA is computed on, [N, L, d] from N anchors [N, L, d] (or [N, 1, L, d]).

    official: what the reference code ends up using: the second half of [∅, a_1, ∅, a_2, …, ∅, a_N]
    (for N = 4: ∅, a_3, ∅, a_4). Otherwise the anchors themselves."""
    anchors = anchors.reshape(anchors.shape[0], *unconditional.shape[-2:])
    if not official:
        return anchors
    uncond = unconditional.reshape(1, *unconditional.shape[-2:]).to(anchors)
    interleaved = torch.stack([uncond.expand_as(anchors), anchors], dim=1).flatten(0, 1)
    return interleaved[anchors.shape[0]:]



def _check_supported(pipe) -> None:
    missing = [name for name in ("tokenizer", "text_encoder", "unet") if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(f"SPM training needs a pipeline with {', '.join(missing)}")
    unet = pipe.unet
    if getattr(pipe, "text_encoder_2", None) is not None or getattr(unet.config, "addition_embed_type", None):
        raise NotImplementedError(
            "SPM training on SDXL is not implemented: its UNet also needs the pooled text embedding (text_embeds, "
            "from text_encoder_2), add_time_ids per resolution and a concatenated penultimate-layer context, and "
            "Latent Anchoring would need anchors for the pooled embedding too (train_spm_xl.py); SD1.x, SD2.x and "
            "the shapes world are supported")
    if getattr(unet.config, "class_embed_type", None) or getattr(unet.config, "time_cond_proj_dim", None):
        raise NotImplementedError("this UNet takes extra conditioning (class labels or a guidance embedding) that "
                                  "SPM training does not provide; SD1.x/SD2.x-style UNets are supported")



# --- the trainer ------------------------------------------------------------------------------------------------


class SPMTrainer:
    """The state of one SPM training run on `pipe`; its hooks stay on the UNet until `close()` (or `with`)."""

    def __init__(self, pipe, target: str, positive: str | None = None, neutral: str = "",
                 config: SPMTrainConfig | None = None, contexts: Sequence[str] = ()):
        self.config = config = config or SPMTrainConfig()
        config.validate()
        if not target.strip() or "," in target:
            raise ValueError(f"target {target!r}: needs a non-empty concept without commas (the file's 'prompts' "
                             "metadata is comma-joined)")
        _check_supported(pipe)
        self.target, self.positive, self.neutral = target, target if positive is None else positive, neutral
        self.contexts = list(contexts)
        self.settings = prompt_settings(self.target, self.positive, neutral, self.contexts)
        self.unet = unet = pipe.unet
        weight = next(unet.parameters())
        self.device, self.dtype = weight.device, weight.dtype

        # Contexts as the pipeline makes them (last hidden state, padded to 77), [settings, L, d] each; fp32 on the
        # CPU for the anchors.
        prompts = [text for setting in self.settings for text in setting] + [""]
        encoded = TransformersEncoder([pipe.tokenizer], [pipe.text_encoder])(prompts).embeddings
        self._target_cpu = encoded[:-1:3]
        per_setting = encoded[:-1].to(self.device, self.dtype).unflatten(0, (len(self.settings), 3))
        self.c_tar, self.c_pos, self.c_neu = per_setting.unbind(1)
        self.c_unc = encoded[-1:].to(self.device, self.dtype)
        self.setting = 0  # the prompt setting of the current iteration

        # Latent geometry: channels and native size from the UNet config; a VAE (latent model) allows buckets.
        vae = getattr(pipe, "vae", None)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else None
        self.channels, self.sample_size = unet.config.in_channels, unet.config.sample_size

        scheduler_config = dict(getattr(getattr(pipe, "scheduler", None), "config", None) or {})
        self.rollout_scheduler = official_ddim(scheduler_config)
        self.rollout_scheduler.set_timesteps(config.ddim_steps)
        grid = official_ddim(scheduler_config)
        grid.set_timesteps(grid.config.num_train_timesteps)
        self.train_timesteps = grid.timesteps.clone()

        self.generator = torch.Generator().manual_seed(config.seed)
        self.targets = membrane_targets(unet)
        if not self.targets:
            raise ValueError("the UNet has no Linear/Conv2d inside Transformer2D blocks for a membrane")
        self.down: dict[str, nn.Parameter] = {}
        self.up: dict[str, nn.Parameter] = {}
        self._conv: dict[str, dict] = {}
        for path, module in self.targets.items():
            base = getattr(module, "base_layer", module)
            out_dim, in_shape = base.weight.shape[0], tuple(base.weight.shape[1:])
            down = torch.empty(config.rank, *in_shape)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=self.generator)  # as nn.Linear/Conv2d init
            self.down[path] = nn.Parameter(down.to(self.device))
            self.up[path] = nn.Parameter(torch.zeros(out_dim, config.rank, device=self.device))
            if isinstance(base, nn.Conv2d):
                self._conv[path] = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        self._owner = torch.zeros(config.rank, dtype=torch.long, device=self.device)
        self._scale = torch.full((config.rank,), config.alpha / config.rank, device=self.device)
        self._strength = torch.ones(1, 1, device=self.device)
        self._on = False

        self.optimizer = torch.optim.AdamW(self.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

        self.lr_scheduler = get_cosine_with_hard_restarts_schedule_with_warmup(
            self.optimizer, config.warmup, max(config.iterations, 1), config.restarts)
        self.step_count = 0

        # Freeze the base for the run (restored on close): no gradient, no dropout.
        self._unet_held = ExitStack()
        self._unet_held.enter_context(frozen(unet))
        self._handles = [module.register_forward_hook(self._hook(path)) for path, module in self.targets.items()]

    # --- membrane plumbing ---

    def parameters(self) -> list[nn.Parameter]:
        return [p for path in self.targets for p in (self.down[path], self.up[path])]

    def _hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: Tensor):
            if not self._on:
                return None
            stack = MembraneStack(self.down[path], self.up[path], self._owner, self._scale, "additive", 1)
            x = args[0]
            stack = stack.to(x.device, x.dtype)
            return stack.add_to(output, x, self._strength, **self._conv.get(path, {}))
        return hook

    def active(self, on: bool = True):
        """Context manager: the membrane on (strength 1) or off inside the block."""
        trainer = self

        class _Switch:
            def __enter__(self):
                self.before, trainer._on = trainer._on, on

            def __exit__(self, *exc):
                trainer._on = self.before
                return False

        return _Switch()

    def eps(self, x: Tensor, t: Tensor, contexts: Tensor) -> Tensor:
        """UNet output for each context row at the same x ([1, C, H, W]) and timestep (membrane as set)."""
        x = x.expand(contexts.shape[0], *x.shape[1:])
        return self.unet(self.rollout_scheduler.scale_model_input(x, t), t, encoder_hidden_states=contexts).sample

    def membrane(self) -> Membrane:
        """The current factors as a `Membrane` (CPU, float32) erasing the target."""
        layers = {}
        for path in self.targets:
            down = self.down[path].detach().float().cpu().clone()
            up = self.up[path].detach().float().cpu().clone()
            if path in self._conv:
                up = up[:, :, None, None]
            layers[path] = MembraneLayer(down, up, float(self.config.alpha))
        return Membrane(layers, [self.target], float(self.config.alpha))

    def close(self) -> None:
        """Remove the hooks and restore the UNet's requires_grad flags and train/eval mode."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unet_held.close()

    def __enter__(self) -> "SPMTrainer":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # --- the objective ---

    def latent_size(self) -> tuple[int, int]:
        """(H, W) of this iteration's latents: random buckets on latent models, else the native size."""
        c = self.config
        if self.vae_scale is None or not c.dynamic_resolution:
            if self.vae_scale is None:
                return self.sample_size, self.sample_size
            return c.resolution // self.vae_scale, c.resolution // self.vae_scale
        low, high = (c.resolution // 2) // 64, c.resolution // 64  # the official randint excludes `high`
        h, w = (int(torch.randint(low, high, (), generator=self.generator)) * 64 for _ in range(2))
        return h // self.vae_scale, w // self.vae_scale

    @torch.no_grad()
    def rollout(self, latents: Tensor, k: int) -> Tensor:
        """k DDIM steps from `latents` with the membrane on and CFG (rollout_guidance) between "" and the target."""
        scheduler, g = self.rollout_scheduler, self.config.rollout_guidance
        context = torch.cat([self.c_unc, self.c_tar[self.setting:self.setting + 1]])
        x = latents
        with self.active(True):
            for t in scheduler.timesteps[:k]:
                eps_u, eps_c = self.eps(x, t, context).chunk(2)
                x = scheduler.step(eps_u + g * (eps_c - eps_u), t, x).prev_sample
        return x

    def timestep(self, k: int) -> Tensor:
        """The 1000-step timestep the losses use after k rollout steps (official: index int(k·T/ddim_steps))."""
        index = int(k * len(self.train_timesteps) / self.config.ddim_steps)
        return self.train_timesteps[index]

    def anchor_rows(self) -> Tensor:
        """This iteration's L_LA contexts (on the model's device and dtype); empty without anchoring."""
        if self.config.la_strength == 0:
            return self.c_tar[:0]
        anchors = sample_anchors(self._target_cpu[self.setting], self.config.anchors, self.generator)
        rows = anchor_batch(anchors, self.c_unc.float().cpu(), self.config.official_anchor_batch)
        return rows.to(self.device, self.dtype)

    @torch.no_grad()
    def reference(self, x_t: Tensor, t: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """Membrane off: the erase target ε_neu − g (ε_pos − ε_neu) [1, C, H, W] and ε_θ(x_t, a) per anchor
        row."""
        with self.active(False):
            i = slice(self.setting, self.setting + 1)
            eps = self.eps(x_t, t, torch.cat([self.c_pos[i], self.c_neu[i], anchors]))
        return erase_target(eps[:1], eps[1:2], self.config.erase_guidance), eps[2:]

    def losses(self, x_t: Tensor, t: Tensor, anchors: Tensor) -> dict[str, Tensor]:
        """L = L_erase + β L_LA at x_t (gradients reach the membrane factors only)."""
        target, anchor_ref = self.reference(x_t, t, anchors)
        with self.active(True):
            eps = self.eps(x_t, t, torch.cat([self.c_tar[self.setting:self.setting + 1], anchors]))
        erase = F.mse_loss(eps[:1].float(), target.float())
        if anchors.shape[0] == 0:
            return {"loss": erase, "erase": erase}
        anchoring = F.mse_loss(eps[1:].float(), anchor_ref.float())
        return {"loss": erase + self.config.la_strength * anchoring, "erase": erase, "anchoring": anchoring}

    def step(self) -> dict[str, float]:
        """One training iteration; returns the losses as floats."""
        c = self.config
        if len(self.settings) > 1:
            self.setting = int(torch.randint(len(self.settings), (), generator=self.generator))
        k = int(torch.randint(1, c.ddim_steps, (), generator=self.generator))
        h, w = self.latent_size()
        noise = torch.randn(1, self.channels, h, w, generator=self.generator)
        latents = (noise * self.rollout_scheduler.init_noise_sigma).to(self.device, self.dtype)
        x_t = self.rollout(latents, k)
        t = self.timestep(k)
        anchors = self.anchor_rows()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.losses(x_t, t, anchors)
        losses["loss"].backward()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step_count += 1
        return {name: value.item() for name, value in losses.items()}

    # --- resume ---

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to resume this run."""
        config = {f.name: getattr(self.config, f.name) for f in fields(self.config) if f.name != "checkpoint_every"}
        return {"prompts": [self.target, self.positive, self.neutral], "contexts": self.contexts, "config": config,
                "layers": {path: list(self.down[path].shape) + [self.up[path].shape[0]] for path in self.targets}}

    def state_dict(self) -> dict:
        return {
            "fingerprint": self.fingerprint(),
            "step": self.step_count,
            "down": {p: v.detach().cpu() for p, v in self.down.items()},
            "up": {p: v.detach().cpu() for p, v in self.up.items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state["fingerprint"] != self.fingerprint():
            raise ValueError("the checkpoint is from a different run (other prompts, settings or model)")
        with torch.no_grad():
            for path in self.targets:
                self.down[path].copy_(state["down"][path])
                self.up[path].copy_(state["up"][path])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])


def train_spm(pipe, target: str, positive: str | None = None, neutral: str = "",
              config: SPMTrainConfig | None = None, progress: Progress | None = None,
              out: str | Path | None = None, resume: bool = True, contexts: Sequence[str] = ()) -> Membrane:
    """Train an SPM membrane erasing `target` from `pipe` (SD1.x/SD2.x-style diffusers pipeline or the shapes
    world) and return it; with `out`, also write it there with `save_membrane`.

    `positive` defaults to the target and `neutral` (the surrogate the target is pushed to) to "". `contexts`
    (templates with one "{}") place the three in prompts, one prompt setting per template (see
    `prompt_settings`); each iteration draws one, as the official trainer draws from its prompt list. Deterministic
    for a given config.seed (on a given device and thread count). With `out` and config.checkpoint_every, a
    checkpoint ``<out>.resume.pt`` is written every so many iterations; a later call with the same arguments
    continues from it (resume=False starts afresh) and it is deleted once the membrane is written.
    `progress(step, total, losses)` is called after every iteration.
    """
    config = config or SPMTrainConfig()
    checkpoint = resume_path(out) if out is not None and config.checkpoint_every else None
    with SPMTrainer(pipe, target, positive, neutral, config, contexts) as trainer:
        resumable.run(trainer, config.iterations, checkpoint, config.checkpoint_every, resume, progress)
        membrane = trainer.membrane()
    if out is not None:
        save_membrane(membrane, out)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
    return membrane


__all__ = ["SPMTrainConfig", "SHAPES_DEFAULTS", "SPMTrainer", "train_spm", "prompt_settings", "erase_target",
           "sample_anchors", "anchor_batch", "resume_path"]
