"""The shapes-world model: Stable Diffusion's classes at toy size, so every eraser runs on it unchanged.

A transformers `CLIPTextModel` (64 wide, 77 positions, BOS/EOS/padding like CLIP) reads a word-level tokenizer over
the world's vocabulary; a diffusers `UNet2DConditionModel` with cross-attention at 16×16 and 8×8 denoises 32×32 RGB
pixels directly (no VAE: the images are small). `ShapesPipeline` has the attributes diffusers pipelines have
(`unet`, `text_encoder`, `tokenizer`, `scheduler`), so adapters written for those pipelines accept it.

Files (weights/shapes-world/): ``unet/`` and ``text_encoder/`` in diffusers/transformers folder layout
(config.json + model.safetensors / diffusion_pytorch_model.safetensors), ``tokenizer/`` (tokenizer.json),
``scheduler/`` (scheduler_config.json).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..erasers.io.clip_names import save_text_model
from ..erasers.text import CONTEXT_TOKENS, TransformersEncoder
from . import data

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
CONTEXT_DIM = 64
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights" / "shapes-world"

UNET_CONFIG = dict(
    sample_size=data.SIZE, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(32, 64, 64), norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=CONTEXT_DIM, attention_head_dim=4,  # diffusers reads this as the number of heads
)
TEXT_CONFIG = dict(
    hidden_size=CONTEXT_DIM, intermediate_size=4 * CONTEXT_DIM, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=CONTEXT_TOKENS, projection_dim=CONTEXT_DIM, hidden_act="quick_gelu",
    bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
SAMPLE_STEPS = 10
GUIDANCE = 4.0
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
# Words beyond the captions' own, so that evaluation and attack prompts have ordinary words to use.
EXTRA_WORDS = ("photo", "image", "drawing", "of", "the", "and", "with", "shape", "object", "art", "style",
               "painting", "by", "on", "background", "mark", "stamp", "watermark", "logo", "corner", "nothing")


def vocabulary() -> list[str]:
    words: set[str] = set(EXTRA_WORDS)
    for text in (*data.SHAPES, *(s for v in data.SHAPE_SYNONYMS.values() for s in v), *data.COLORS,
                 *(s for v in data.COLOR_SYNONYMS.values() for s in v),
                 *(w for adj, nouns in data.PATTERN_WORDS.values() for w in (*adj, *nouns)), *data.POSITIONS,
                 *data.TEMPLATES, *data.POSITION_SUFFIXES, "a an"):
        words.update(w for w in text.replace("{", " {").split() if not w.startswith("{"))
    return [BOS, EOS, UNK, *sorted(words)]


def build_tokenizer():
    """A word-level tokenizer that frames ids as CLIP does: BOS, words, EOS, padded with EOS to 77."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=UNK, model_max_length=CONTEXT_TOKENS)


def build_models(seed: int = 0):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return tokenizer, text_encoder, unet


def build_scheduler():
    """DPM-Solver++ starting one spacing below t = 999: the cosine schedule's last ᾱ is ~1e-8, where turning an ε
    prediction into x₀ divides by √ᾱ and blows up (samples starting at t = 999 are pure noise)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULE, timestep_spacing="leading", steps_offset=1)


@dataclass
class ShapesPipeline:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    # The negative used when a call names none ([1, 77, width]); erasures that work through the negative prompt
    # (a plain-word negative, Geom-Erasing's location tokens) set it, as a ComfyUI graph wires a negative in.
    negative_context: torch.Tensor | None = None

    @classmethod
    def load(cls, path: str | Path = WEIGHTS_DIR) -> "ShapesPipeline":
        from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        path = Path(path)
        if not (path / "unet" / "config.json").is_file():
            raise FileNotFoundError(f"no shapes-world model in {path} (expected unet/, text_encoder/, tokenizer/, "
                                    "scheduler/); reinstall the package or train one with scripts/train_shapes.py")
        return cls(
            tokenizer=PreTrainedTokenizerFast.from_pretrained(path / "tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder").eval(),
            unet=UNet2DConditionModel.from_pretrained(path / "unet").eval(),
            scheduler=DPMSolverMultistepScheduler.from_pretrained(path / "scheduler"),
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path / "tokenizer")
        save_text_model(self.text_encoder, path / "text_encoder")  # in file names under transformers 4 and 5
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(path / "scheduler")

    def encoder(self) -> TransformersEncoder:
        """The eraser-side text encoder: the context the UNet sees, with word counts."""
        return TransformersEncoder([self.tokenizer], [self.text_encoder])

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encoder()(prompts).embeddings

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = SAMPLE_STEPS,
                 guidance: float = GUIDANCE, negative: str | Sequence[str] = "", batch_size: int = 128,
                 context: torch.Tensor | None = None, negative_context: torch.Tensor | None = None) -> np.ndarray:
        """Images [N, SIZE, SIZE, 3] uint8, one per (prompt, seed); each image depends on its own seed only.

        `context` replaces the encoded prompts (attacks and soft prompts pass embeddings directly);
        `negative_context` ([1 or N, 77, width]) the encoded negatives (learned tokens, e.g. Geom-Erasing's).
        Without either negative, the pipeline's own `negative_context` (None: the empty prompt)."""
        prompts = list(prompts)
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if negative_context is None and not any(negatives):
            negative_context = self.negative_context
        out = []
        for start in range(0, len(prompts), batch_size):
            end = min(start + batch_size, len(prompts))
            cond = context[start:end] if context is not None else self.encode(prompts[start:end])
            uncond = (self.encode(negatives[start:end]) if negative_context is None
                      else negative_context.expand(len(prompts), -1, -1)[start:end])
            noise = torch.stack([torch.randn(3, data.SIZE, data.SIZE, generator=torch.Generator().manual_seed(int(s)))
                                 for s in seeds[start:end]])
            out.append(self.denoise(noise, cond, uncond, steps, guidance))
        images = torch.cat(out).clamp(-1, 1)
        return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def denoise(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
                guidance: float) -> torch.Tensor:
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # private state: calls may interleave
        scheduler.set_timesteps(steps)
        x = x * scheduler.init_noise_sigma
        context = torch.cat([uncond, cond])
        for t in scheduler.timesteps:
            eps = self.unet(scheduler.scale_model_input(torch.cat([x, x]), t), t,
                            encoder_hidden_states=context).sample
            eps_u, eps_c = eps.chunk(2)
            x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        return x
