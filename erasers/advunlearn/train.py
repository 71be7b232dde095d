"""Training an AdvUnlearn text encoder (Zhang et al., NeurIPS 2024): adversarial unlearning of the text encoder only
(methods.md §5.2).

θ is a copy of the pipeline's text encoder with its transformer layers and final layer norm trainable (token and
position embeddings frozen); the UNet ε_U and the original encoder E_0 stay frozen, and ε_0 is the UNet with E_0.
One iteration, as the official AdvUnlearn.py does it:
1. draw a prompt setting (the concept c and its neutral n: "" for a bare concept, the same template without the
   concept when training over contexts), t_enc ~ U{0 … ddim_steps − 1} and z_T; x_t = t_enc DDIM steps from z_T
   with CFG `start_guidance` between E_0("") and E_θ(c) (the ESD rollout under the model being trained);
2. t = U[t_enc·T/ddim_steps, (t_enc + 1)·T/ddim_steps) (official ESD quirk: counted from the clean end, although x_t
   was reached from the noisy one; ``official_timestep=False`` uses the DDIM timestep x_t is at);
3. attacker (after `warmup` iterations): a soft prefix δ of `attack_tokens` word embeddings ([BOS, δ, c, EOS]),
   `attack_steps` Adam steps at `attack_lr` on ‖ε_U(x_t', E_θ([δ; c]), t') − ε_0(x_t', E_0(c), t')‖², each on a fresh
   x_t', t' (`fast_at`: the gradient's sign); started from the previous δ ("latest") or a random vocabulary token;
4. defender: one Adam step on θ for
   ‖ε_U(x_t, E_θ([δ; c]), t) − (ε_0(x_t, n) − η (ε_0(x_t, c) − ε_0(x_t, n)))‖²
   + γ · mean_r ‖ε_U(x_t^r, E_θ(c_r), t) − ε_0(x_t^r, E_0(c_r), t)‖²,
   the ESD erase loss on the adversarial prompt plus the utility term over `retain_batch` retain prompts (drawn
   without replacement, reshuffled when used up), whose x_t^r come from the same rollout conditioned on them.

The result is a `CLIPTextModel` of the pipeline's own shape, written in the released layout (config.json and
pytorch_model.bin) plus model.safetensors, which `advunlearn.load_advunlearn` and the ComfyUI node read.
Models: SD1.x/SD2.x-style diffusers pipelines (latents through the UNet's config; no VAE call is needed, the rollout
starts from noise) and the shapes world.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attack import soft_prompt
from ..files import write_stream
from ..io.clip_names import file_state_dict, load_file_state_dict, save_text_model, to_file_names
from ..text import TransformersEncoder
from ..training import resumable
from ..training.frozen import frozen
from ..training.objectives import erase_target, official_ddim, prompt_settings
from ..training.resumable import Progress, resume_path

FROZEN = ("embeddings.",)  # token and position embeddings: AdvUnlearn's text_encoder_full leaves them


@dataclass
class AdvUnlearnConfig:
    """Hyperparameters; the defaults are the official ones (methods.md §5.2)."""

    iterations: int = 1000
    warmup: int = 200  # iterations on the clean concept prompt before the attacker starts
    lr: float = 1e-5
    negative_guidance: float = 1.0  # η
    retain_weight: float = 1.0  # γ (the README's nudity example uses 0.3)
    retain_batch: int = 5
    attack_tokens: int = 1  # adv_prompt_num
    attack_steps: int = 30
    attack_lr: float = 1e-3
    attack_init: str = "latest"  # "latest" | "random"
    attack_method: str = "pgd"  # "pgd" (an Adam step, no projection) | "fast_at" (sign of the gradient)
    ddim_steps: int = 50
    start_guidance: float = 3.0
    official_timestep: bool = True
    resolution: int = 512  # latent models: the pixel size the latents stand for
    seed: int = 0
    checkpoint_every: int = 200

    @classmethod
    def shapes(cls, **overrides) -> "AdvUnlearnConfig":
        return cls(**{**SHAPES_DEFAULTS, **overrides})

    def validate(self) -> None:
        if self.iterations < 0 or not 0 <= self.warmup:
            raise ValueError(f"iterations and warmup must be >= 0, got {self.iterations} and {self.warmup}")
        if not self.lr > 0 or not self.attack_lr > 0:
            raise ValueError(f"lr and attack_lr must be > 0, got {self.lr} and {self.attack_lr}")
        if self.attack_tokens < 1 or self.attack_steps < 0 or self.retain_batch < 1:
            raise ValueError("attack_tokens and retain_batch must be >= 1 and attack_steps >= 0")
        if self.attack_init not in ("latest", "random") or self.attack_method not in ("pgd", "fast_at"):
            raise ValueError(f"attack_init is 'latest' or 'random' and attack_method 'pgd' or 'fast_at'; got "
                             f"{self.attack_init!r} and {self.attack_method!r}")
        if self.ddim_steps < 1:
            raise ValueError(f"ddim_steps must be >= 1, got {self.ddim_steps}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")


# Shapes world (toy UNet, 3-layer 64-wide encoder). An iteration's cost is its UNet evaluations, and the rollouts
# (2 per image per DDIM step, for the attacker's steps, the defender and each retain prompt) are most of them; so,
# against the official values (the runs behind each choice: docs/shapes-world.md, AdvUnlearn):
# - ddim_steps 8 (rollouts of 0-7 steps, the world samples with 10), retain_batch 3: fewer rollouts per iteration;
# - 3 attack steps at lr 1e-2 instead of 30 at 1e-3: the world's word embeddings are as large per coordinate as
#   CLIP-L's, so δ moves about as far as the official attacker's;
# - lr 2e-4: the tiny encoder at 1e-5 barely moves in a few hundred iterations;
# - retain_weight γ = 100: the utility term is about a hundredth of the erase term here, so at the official γ it
#   does not hold the concept's nearest neighbours (other shapes) in place while the concept is pushed away.
SHAPES_DEFAULTS = dict(iterations=300, warmup=60, lr=2e-4, retain_weight=100.0, retain_batch=3, attack_steps=3,
                       attack_lr=1e-2, ddim_steps=8, checkpoint_every=50)


class AdvUnlearnTrainer:
    """The state of one AdvUnlearn run on `pipe`; the pipeline's own models are never changed (θ is a copy)."""

    def __init__(self, pipe, concept: str, retain: Sequence[str], config: AdvUnlearnConfig | None = None,
                 contexts: Sequence[str] = ()):
        self.config = config = config or AdvUnlearnConfig()
        config.validate()
        if not concept.strip():
            raise ValueError("the concept to erase is empty")
        retain = [r for r in retain if r.strip()]
        if len(retain) < config.retain_batch:
            raise ValueError(f"{len(retain)} retain prompts for retain_batch {config.retain_batch}: AdvUnlearn's "
                             "utility term needs at least one batch of prompts the model must keep drawing")
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise NotImplementedError("AdvUnlearn trains the one CLIP text encoder of SD1.x/SD2.x-style pipelines; "
                                      "SDXL has two")
        self.concept, self.contexts, self.retain = concept, list(contexts), list(retain)
        settings = prompt_settings(concept, concept, "", self.contexts)
        self.concepts, self.neutrals = [s[0] for s in settings], [s[2] for s in settings]
        self.tokenizer, self.unet, self.original = pipe.tokenizer, pipe.unet, pipe.text_encoder
        weight = next(self.unet.parameters())
        self.device, self.dtype = weight.device, weight.dtype

        # E_0 never changes: every context it gives is computed once.
        encode_e0 = TransformersEncoder([self.tokenizer], [self.original])
        self.e0_concepts = self._model(encode_e0(self.concepts).embeddings)
        self.e0_neutrals = self._model(encode_e0(self.neutrals).embeddings)
        self.e0_retain = self._model(encode_e0(self.retain).embeddings)
        self.e0_empty = self._model(encode_e0([""]).embeddings)
        self.ids_clean = soft_prompt.prefixed_ids(self.tokenizer, self.concepts, 0)
        self.ids_attack = soft_prompt.prefixed_ids(self.tokenizer, self.concepts, config.attack_tokens)
        self.ids_retain = soft_prompt.prefixed_ids(self.tokenizer, self.retain, 0)
        special = set(self.tokenizer.all_special_ids)
        self.vocabulary = torch.tensor([i for i in range(len(self.tokenizer)) if i not in special])

        self.encoder = copy.deepcopy(self.original).float()
        self.encoder.eval()  # no dropout, as the official model in eval mode
        self.trainable = [p for name, p in self.encoder.named_parameters() if not _frozen(name)]
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(not _frozen(name))
        self.optimizer = torch.optim.Adam(self.trainable, lr=config.lr)

        vae = getattr(pipe, "vae", None)
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else None
        size = config.resolution // scale if scale else self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, size, size)
        scheduler_config = dict(getattr(getattr(pipe, "scheduler", None), "config", None) or {})
        self.ddim = official_ddim(scheduler_config)
        self.ddim.set_timesteps(config.ddim_steps)
        self.train_steps = int(self.ddim.config.num_train_timesteps)

        self.generator = torch.Generator().manual_seed(config.seed)
        self.delta: Tensor | None = None  # the latest adversarial prefix
        self.order = torch.randperm(len(self.retain), generator=self.generator)
        self.cursor = 0
        self.step_count = 0
        self._unet_held = ExitStack()  # the UNet held still for the run, restored on close
        self._unet_held.enter_context(frozen(self.unet))

    def _model(self, context: Tensor) -> Tensor:
        return context.to(self.device, self.dtype)

    # --- pieces ---

    def eps(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.unet(self.ddim.scale_model_input(x, t), t, encoder_hidden_states=context.to(self.dtype)).sample

    def encode(self, ids: Tensor, prefix: Tensor | None = None) -> Tensor:
        return self._model(soft_prompt.encode(self.encoder, ids, prefix))

    @torch.no_grad()
    def rollout(self, cond: Tensor, t_enc: Sequence[int]) -> Tensor:
        """Row b: x_t after t_enc[b] DDIM steps from fresh noise, CFG `start_guidance` between E_0("") and cond[b]
        ([B, L, d]). Every row is its own draw; rolling them out in one batch is only faster (CPU: one batch of 22
        costs about what 3 of 2 do)."""
        noise = torch.randn(cond.shape[0], *self.latent_shape, generator=self.generator)
        x = self._model(noise * self.ddim.init_noise_sigma)
        stops = torch.tensor(list(t_enc), device=x.device).view(-1, *[1] * len(self.latent_shape))
        out = x.clone()
        uncond = self.e0_empty.expand_as(cond)
        for j, t in enumerate(self.ddim.timesteps[:max(t_enc, default=0)]):
            eps_u, eps_c = self.eps(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
            x = self.ddim.step(eps_u + self.config.start_guidance * (eps_c - eps_u), t, x).prev_sample
            out = torch.where(stops == j + 1, x, out)
        return out

    def timestep(self, t_enc: int) -> Tensor:
        c = self.config
        if not c.official_timestep:
            return self.ddim.timesteps[min(t_enc, c.ddim_steps - 1)]
        low, high = round(t_enc / c.ddim_steps * self.train_steps), round((t_enc + 1) / c.ddim_steps * self.train_steps)
        return torch.randint(low, max(high, low + 1), (), generator=self.generator).to(self.device)

    def draws(self, setting: int, n: int, retain_ids: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(x_t, t) for this iteration: n for the setting's concept (the attacker's steps, then the defender's),
        and the retain prompts' x_t^r [R, ...] at the defender's t_enc and t (last item), rolled out under E_θ."""
        t_enc = [int(v) for v in torch.randint(self.config.ddim_steps, (n,), generator=self.generator)]
        with torch.no_grad():
            concept = self.encode(self.ids_clean[setting:setting + 1]).expand(n, -1, -1)
            cond = torch.cat([concept, self.encode(retain_ids)])
        x = self.rollout(cond, t_enc + [t_enc[-1]] * len(retain_ids))
        times = [self.timestep(k) for k in t_enc]
        return [(x[i:i + 1], times[i]) for i in range(n)] + [(x[n:], times[-1])]

    def initial_prefix(self) -> Tensor:
        if self.config.attack_init == "latest" and self.delta is not None:
            return self.delta
        table = self.encoder.get_input_embeddings().weight.detach()
        pick = self.vocabulary[torch.randint(len(self.vocabulary), (self.config.attack_tokens,),
                                             generator=self.generator)]
        return table[pick].clone()

    def attack(self, setting: int, draws: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """The lower level: a soft prefix δ [k, d] that makes ε_U with E_θ([δ; c]) match ε_0 with E_0(c); one Adam
        step per (x_t, t) in `draws`."""
        c = self.config
        delta = self.initial_prefix().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=c.attack_lr)
        for x_t, t in draws:
            with torch.no_grad():
                target = self.eps(x_t, t, self.e0_concepts[setting:setting + 1])
            loss = F.mse_loss(self.eps(x_t, t, self.encode(self.ids_attack[setting:setting + 1], delta)).float(),
                              target.float())
            (grad,) = torch.autograd.grad(loss, [delta])  # θ gets no gradient from the attacker
            delta.grad = grad.sign() if c.attack_method == "fast_at" else grad
            optimizer.step()
        self.delta = delta.detach()
        return self.delta

    def retain_rows(self) -> Tensor:
        """Indices of this iteration's retain prompts: without replacement, reshuffled when used up."""
        n = self.config.retain_batch
        if self.cursor + n > len(self.order):
            self.order = torch.randperm(len(self.retain), generator=self.generator)
            self.cursor = 0
        rows = self.order[self.cursor:self.cursor + n]
        self.cursor += n
        return rows

    def step(self) -> dict[str, float]:
        c = self.config
        setting = int(torch.randint(len(self.concepts), (), generator=self.generator))
        adversarial = self.step_count >= c.warmup and c.attack_steps > 0
        rows = self.retain_rows()
        retain_ids = self.ids_retain[rows]
        *draws, (x_t, t), (x_r, _) = self.draws(setting, (c.attack_steps if adversarial else 0) + 1, retain_ids)
        delta = self.attack(setting, draws) if adversarial else None
        ids = self.ids_attack if delta is not None else self.ids_clean
        i = slice(setting, setting + 1)
        with torch.no_grad():
            eps_c, eps_n = self.eps(torch.cat([x_t, x_t]), t,
                                    torch.cat([self.e0_concepts[i], self.e0_neutrals[i]])).chunk(2)
            target = erase_target(eps_c, eps_n, c.negative_guidance)
            retain_target = self.eps(x_r, t, self.e0_retain[rows])
        self.optimizer.zero_grad(set_to_none=True)
        erase = F.mse_loss(self.eps(x_t, t, self.encode(ids[i], delta)).float(), target.float())
        retain = F.mse_loss(self.eps(x_r, t, self.encode(retain_ids)).float(), retain_target.float())
        loss = erase + c.retain_weight * retain
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return {"loss": loss.item(), "erase": erase.item(), "retain": retain.item(), "adversarial": float(adversarial)}

    # --- results and resume ---

    def text_encoder(self):
        """The trained encoder (a `CLIPTextModel` in the original's dtype, no gradients)."""
        encoder = copy.deepcopy(self.encoder).to(self.original.dtype)
        encoder.requires_grad_(False)
        return encoder

    def fingerprint(self) -> dict:
        config = {f.name: getattr(self.config, f.name) for f in fields(self.config) if f.name != "checkpoint_every"}
        return {"concept": self.concept, "contexts": self.contexts, "retain": len(self.retain), "config": config,
                "encoder": to_file_names({name: list(p.shape) for name, p in self.encoder.named_parameters()},
                                         self.encoder)}

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint(), "step": self.step_count,
                "encoder": {k: v.detach().cpu() for k, v in file_state_dict(self.encoder).items()},
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "delta": self.delta, "order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: Mapping) -> None:
        if state["fingerprint"] != self.fingerprint():
            raise ValueError("the checkpoint is from a different run (other concept, prompts, settings or model)")
        load_file_state_dict(self.encoder, state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.delta, self.order, self.cursor = state["delta"], state["order"], int(state["cursor"])
        self.step_count = int(state["step"])

    def close(self) -> None:
        self._unet_held.close()

    def __enter__(self) -> "AdvUnlearnTrainer":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def _frozen(name: str) -> bool:
    return any(part in name for part in FROZEN)


def save_encoder(text_encoder, out: str | Path) -> Path:
    """The released layout (config.json + pytorch_model.bin, fp32 as released) plus model.safetensors, in file names
    (``text_model.*``) whichever transformers is installed."""
    out = save_text_model(text_encoder, out)
    state = {k: v.detach().float().cpu().contiguous() for k, v in file_state_dict(text_encoder).items()}
    write_stream(out / "pytorch_model.bin", lambda stream: torch.save(state, stream))
    return out


def train_advunlearn(pipe, concept: str, retain: Sequence[str], config: AdvUnlearnConfig | None = None,
                     contexts: Sequence[str] = (), progress: Progress | None = None, out: str | Path | None = None,
                     resume: bool = True):
    """Train an AdvUnlearn text encoder erasing `concept` from `pipe` and return it (a `CLIPTextModel`); with
    `out`, also write it there as a folder (`save_encoder`). `retain`: prompts whose outputs must not change
    (the official coco_object set is 243 "a photo of {object}"). `contexts`: templates with one "{}" the concept is
    drawn in, one per iteration (see spm_train.prompt_settings). With `out` and config.checkpoint_every, an
    interrupted run resumes from ``<out>.resume.pt`` (resume=False starts afresh). Deterministic for config.seed on
    a given device and thread count. `progress(step, total, losses)` after every iteration."""
    config = config or AdvUnlearnConfig()
    checkpoint = resume_path(out) if out is not None and config.checkpoint_every else None
    with AdvUnlearnTrainer(pipe, concept, retain, config, contexts) as trainer:
        resumable.run(trainer, config.iterations, checkpoint, config.checkpoint_every, resume, progress)
        encoder = trainer.text_encoder()
    if out is not None:
        save_encoder(encoder, out)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
    return encoder


__all__ = ["AdvUnlearnConfig", "SHAPES_DEFAULTS", "AdvUnlearnTrainer", "train_advunlearn", "save_encoder",
           "resume_path"]
