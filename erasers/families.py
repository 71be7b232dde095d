"""Model families and the naming schemes of UNet layers.

EraseKit names a UNet layer by its diffusers module path
(``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``): official UCE files and SPM's kohya names are built
from it. ComfyUI and single-file checkpoints use the LDM path (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``).
The two differ only in how blocks are numbered, and the numbering follows from the number of res-blocks per
resolution level, which `UNetLayout` holds.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Family:
    """A model family: erasures computed on one family apply to every fine-tune of it and to no other."""

    name: str
    label: str
    context_dim: int  # width of the text context the cross-attention keys/values read
    text_encoders: tuple[str, ...]  # ComfyUI's names for the CLIP towers whose outputs form the context
    num_res_blocks: tuple[int, ...]  # per resolution level, for the full-size model


FAMILIES = {
    f.name: f
    for f in (
        Family("sd1", "Stable Diffusion 1.x", 768, ("clip_l",), (2, 2, 2, 2)),
        Family("sd2", "Stable Diffusion 2.x", 1024, ("clip_h",), (2, 2, 2, 2)),
        Family("sdxl", "Stable Diffusion XL", 2048, ("clip_l", "clip_g"), (2, 2, 2)),
        # The toy model of shapes (diffusers/transformers classes; not loadable in ComfyUI).
        Family("shapes", "EraseKit shapes world", 64, (), (1, 1, 1)),
    )
}
_BY_CONTEXT = {f.context_dim: f for f in FAMILIES.values()}


class FamilyError(InputError):
    """The model is not one EraseKit knows, or not the family an erasure was made for."""


def family_from_context_dim(context_dim: int) -> Family:
    try:
        return _BY_CONTEXT[context_dim]
    except KeyError:
        known = ", ".join(f"{f.label} ({f.context_dim})" for f in FAMILIES.values())
        raise FamilyError(
            f"cross-attention context width {context_dim} matches no supported model family ({known})"
        ) from None


def kv_family(kv_weights: Mapping[str, object]) -> Family:
    """The family of a UNet from its attn2 to_k/to_v weights (tensors or shapes): their common context width."""
    widths = {tuple(getattr(w, "shape", w))[1] for w in kv_weights.values()}
    if len(widths) != 1:
        raise FamilyError(f"cross-attention layers of several context widths {sorted(widths)}: not an SD-style UNet")
    return family_from_context_dim(widths.pop())


@dataclass(frozen=True)
class CrossAttention:
    """One attn2 block: its diffusers path (without ``.to_k``), query width and context width."""

    name: str
    inner_dim: int
    context_dim: int


_TO_K = re.compile(r"^(?:.*?\.)?((?:down_blocks|mid_block|up_blocks|input_blocks|middle_block|output_blocks)"
                   r"\..*\.attn2)\.to_k\.weight$")


def cross_attention_layers(shapes: Mapping[str, Sequence[int]],
                           layout: "UNetLayout | None" = None) -> list[CrossAttention]:
    """The cross-attention blocks of a UNet, from its state-dict keys and shapes in either naming scheme.

    Keys may carry any prefix (``model.diffusion_model.``, ``diffusion_model.``, ``unet.``). LDM names are
    converted to diffusers names with `layout`, which is required when they occur.
    """
    layers = []
    for key, shape in shapes.items():
        match = _TO_K.match(key)
        if not match:
            continue
        name = match.group(1)
        if len(shape) != 2:
            raise FamilyError(f"{key!r} has shape {list(shape)}; a cross-attention key projection is a matrix "
                              "(2 dimensions): the model file is damaged or not an SD-style UNet")
        if not name.startswith(("down_blocks", "mid_block", "up_blocks")):
            if layout is None:
                raise ValueError("LDM-named UNet keys need a UNetLayout to be named in diffusers terms")
            try:
                name = layout.to_diffusers(name)
            except KeyError:
                raise FamilyError(f"{key!r} is not a cross-attention block of the UNet its other layers describe: "
                                  "the model file is damaged or of an unknown architecture") from None
        layers.append(CrossAttention(name, int(shape[0]), int(shape[1])))
    return sorted(layers, key=lambda layer: _natural_key(layer.name))


def _natural_key(name: str) -> list:
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    parts: list = []
    for part in name.split("."):
        parts.append((0, int(part)) if part.isdigit() else (1, order.get(part, 3), part))
    return parts


@dataclass(frozen=True)
class UNetLayout:
    """Block numbering of an SD-style UNet, given its res-blocks per level (SD1/2: (2,2,2,2); SDXL: (2,2,2)).

    LDM ``input_blocks`` start with conv_in at index 0, then per level its res-blocks and a downsampler (not
    after the last level); ``output_blocks`` run the levels deepest first with one res-block more each. The
    diffusers ``down_blocks``/``up_blocks`` number levels and blocks within them.
    """

    num_res_blocks: tuple[int, ...]

    def input_index(self, level: int, block: int) -> int:
        """LDM ``input_blocks`` index of res-block `block` of `level`; ``block == num_res_blocks[level]`` is the
        level's downsampler."""
        return 1 + sum(n + 1 for n in self.num_res_blocks[:level]) + block

    def output_index(self, up_level: int, block: int) -> int:
        """LDM ``output_blocks`` index of block `block` of diffusers ``up_blocks.{up_level}`` (deepest level first);
        the level's upsampler sits in its last block, ``block == num_res_blocks[-1 - up_level]``."""
        reversed_blocks = self.num_res_blocks[::-1]
        return sum(n + 1 for n in reversed_blocks[:up_level]) + block

    def _ldm_to_diffusers_blocks(self) -> dict[str, str]:
        table = {"middle_block.1": "mid_block.attentions.0"}
        for level, n in enumerate(self.num_res_blocks):
            for block in range(n):
                table[f"input_blocks.{self.input_index(level, block)}.1"] = f"down_blocks.{level}.attentions.{block}"
        for up_level, n in enumerate(self.num_res_blocks[::-1]):
            for block in range(n + 1):
                ldm = f"output_blocks.{self.output_index(up_level, block)}.1"
                table[ldm] = f"up_blocks.{up_level}.attentions.{block}"
        return table

    def to_diffusers(self, ldm_name: str) -> str:
        """``input_blocks.1.1.transformer_blocks.0.attn2`` ->
        ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``."""
        return _rename_prefix(ldm_name, self._ldm_to_diffusers_blocks())

    def to_ldm(self, diffusers_name: str) -> str:
        table = {v: k for k, v in self._ldm_to_diffusers_blocks().items()}
        return _rename_prefix(diffusers_name, table)

    @classmethod
    def from_ldm_keys(cls, keys: Iterable[str]) -> "UNetLayout":
        """Read the layout off a full LDM UNet state dict (any key prefix): downsamplers end each level."""
        blocks: dict[int, set[str]] = {}
        pattern = re.compile(r"(?:^|\.)input_blocks\.(\d+)\.0\.(op|in_layers)\.")
        for key in keys:
            match = pattern.search(key)
            if match:
                blocks.setdefault(int(match.group(1)), set()).add(match.group(2))
        if not blocks:
            raise FamilyError("no LDM UNet input_blocks found: is this a Stable Diffusion UNet checkpoint?")
        counts, current = [], 0
        for index in sorted(blocks):
            if "op" in blocks[index]:
                counts.append(current)
                current = 0
            else:
                current += 1
        counts.append(current)
        return cls(tuple(counts))


def _rename_prefix(name: str, table: Mapping[str, str]) -> str:
    parts = name.split(".")
    for length in (4, 3, 2):  # "down_blocks.0.attentions.0" ... "middle_block.1"
        head = ".".join(parts[:length])
        if head in table:
            return ".".join([table[head], *parts[length:]])
    raise KeyError(f"{name!r} is not a cross-attention block of this UNet layout")


@dataclass(frozen=True)
class TextEncoder:
    name: str  # clip_l, clip_h or clip_g, as ComfyUI names the towers
    layers: int
    width: int


# Where each tower's weights live in the naming schemes we read: ComfyUI's CLIP object, single-file checkpoints
# (SD1 and SDXL CLIP-L in transformers names, SD2 and SDXL's big towers in open_clip names) and bare transformers.
_TOWER_PREFIXES = (
    (re.compile(r"^(?:.*\.)?(clip_[lgh])\.transformer\.text_model\."), None),
    (re.compile(r"^cond_stage_model\.transformer\.text_model\."), "clip_l"),
    (re.compile(r"^conditioner\.embedders\.0\.transformer\.text_model\."), "clip_l"),
    (re.compile(r"^cond_stage_model\.model\."), "clip_h"),
    (re.compile(r"^conditioner\.embedders\.1\.model\."), "clip_g"),
    (re.compile(r"^text_model\."), "clip_l"),
)
_LAYER_INDEX = re.compile(r"(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.")


def text_encoders(shapes: Mapping[str, Sequence[int]]) -> list[TextEncoder]:
    """The CLIP towers in a state dict: their number of layers and width."""
    layers: dict[str, set[int]] = {}
    widths: dict[str, int] = {}
    for key, shape in shapes.items():
        for pattern, fixed_name in _TOWER_PREFIXES:
            match = pattern.match(key)
            if not match:
                continue
            name = fixed_name or match.group(1)
            rest = key[match.end():]
            index = _LAYER_INDEX.search(rest)
            if index:
                layers.setdefault(name, set()).add(int(index.group(1)))
            if rest.endswith("token_embedding.weight"):
                widths[name] = int(shape[1])
            break
    return [TextEncoder(name, len(layers.get(name, ())), widths.get(name, 0)) for name in sorted(layers)]


TOWER_WIDTH = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}  # ComfyUI tower name -> width


@dataclass(frozen=True)
class ModelReport:
    """What a model is, as far as erasures care: family, cross-attention layers, text encoders."""

    family: Family | None
    cross_attention: tuple[CrossAttention, ...]
    text_encoders: tuple[TextEncoder, ...]
    problems: tuple[str, ...]

    def applicable(self) -> list[str]:
        if self.family is None:
            return []
        kinds = [
            f"closed-form erasures (UCE, RECE, TRCE) made for {self.family.label}: "
            f"{len(self.cross_attention)} attn2 to_k/to_v pairs",
            f"SPM membranes made for {self.family.label}",
        ]
        if self.family.name == "sd1" and any(t.name == "clip_l" and t.width == 768 for t in self.text_encoders):
            kinds.append("AdvUnlearn text encoders (CLIP-L, width 768)")
        return kinds

    def text(self) -> str:
        lines = [f"family: {self.family.label if self.family else 'unknown'}"]
        widths: dict[tuple[int, int], int] = {}
        for layer in self.cross_attention:
            widths[(layer.inner_dim, layer.context_dim)] = widths.get((layer.inner_dim, layer.context_dim), 0) + 1
        lines.append(f"cross-attention layers: {len(self.cross_attention)}")
        lines += [f"  {count} x to_k/to_v {inner}x{context}" for (inner, context), count in sorted(widths.items())]
        lines.append("text encoders: " + (", ".join(
            f"{t.name} ({t.layers} layers, width {t.width})" for t in self.text_encoders) or "none given"))
        lines.append("erasures that apply:")
        lines += [f"  - {kind}" for kind in self.applicable()] or ["  - none"]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def describe_model(unet_shapes: Mapping[str, Sequence[int]],
                   text_encoder_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelReport:
    """Inspect UNet (LDM or diffusers names, any prefix) and optional text-encoder state-dict shapes."""
    problems = []
    ldm = any(".input_blocks." in f".{k}" or ".middle_block." in f".{k}" for k in unet_shapes)
    layout = UNetLayout.from_ldm_keys(unet_shapes) if ldm else None
    layers = cross_attention_layers(unet_shapes, layout)
    family = None
    contexts = sorted({layer.context_dim for layer in layers})
    if not layers:
        problems.append("no cross-attention (attn2.to_k) layers found: this is not a text-conditioned SD-style UNet")
    elif len(contexts) > 1:
        problems.append(f"cross-attention layers disagree on the context width: {contexts}")
    else:
        try:
            family = family_from_context_dim(contexts[0])
        except FamilyError as err:
            problems.append(str(err))
    towers = tuple(text_encoders(text_encoder_shapes or {}))
    if family is not None and towers:
        names = tuple(t.name for t in towers)
        if sorted(names) != sorted(family.text_encoders) or any(t.width != TOWER_WIDTH[t.name] for t in towers):
            problems.append(
                f"the text encoders ({', '.join(names)}) are not the ones {family.label} was trained with "
                f"({', '.join(family.text_encoders)}): check the CLIP input comes from the same checkpoint"
            )
    return ModelReport(family, tuple(layers), towers, tuple(problems))
