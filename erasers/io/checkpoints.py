"""Single-file Stable Diffusion checkpoints in the LDM layout that ComfyUI and A1111 read.

A single-file checkpoint holds three models under fixed prefixes: the UNet under ``model.diffusion_model.``, the
VAE under ``first_stage_model.`` and (SD1.x) the CLIP-L text encoder under ``cond_stage_model.transformer.``.
diffusers and transformers name the same tensors differently; this module converts between the two schemes and
reads and writes the files.

The conversion functions work on one model's keys without its checkpoint prefix; `split_checkpoint` and
`join_checkpoint` add and remove the prefixes.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FileError, retyped
from ..families import FamilyError, UNetLayout
from ..files import verify_hash, write_stream

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "cond_stage_model.transformer."

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(FileError):
    """A checkpoint file cannot be read or written, or its keys are not the layout a conversion expects."""


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing files


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file, or of a ``.ckpt``/``.pt``/``.pth``/``.bin`` PyTorch file, on the CPU.

    PyTorch files are unpickled with ``weights_only=True`` (a checkpoint from the internet must not be able to run
    code), and a top-level ``state_dict`` entry, as in the original SD ``.ckpt`` files, is unwrapped. Non-tensor
    entries beside the tensors (``global_step``, ``epoch``) are dropped.
    """
    path = _checked_path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    return _read_pickle(path)


def check_finite(source, tensors: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """`tensors` (weights read from `source` that EraseKit edits or computes from), or a CheckpointError naming the
    first that is not floating point or holds NaN/Inf: an erasure computed from or merged into it would be NaN."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(file=source, key=key, expected="a floating-point weight",
                                  found=str(tensor.dtype).replace("torch.", ""),
                                  fix="the checkpoint is damaged or quantised: use a float16/float32 release")
        finite = torch.isfinite(tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                                           torch.float64) else tensor.float())
        if not bool(finite.all()):
            raise CheckpointError(file=source, key=key, expected="finite values",
                                  found=f"{int((~finite).sum())} NaN or infinite value(s)",
                                  fix="the checkpoint is damaged: download or copy it again")
    return tensors


def read_checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a checkpoint, without reading the weights where the format allows.

    safetensors files are read up to their header; PyTorch zip files are memory-mapped. Errors as `read_checkpoint`.
    """
    path = _checked_path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except SafetensorError as exc:
            raise _incomplete_safetensors(path, exc) from exc
    return {key: tuple(tensor.shape) for key, tensor in _read_pickle(path, mmap=zipfile.is_zipfile(path)).items()}


def _checked_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}: check the path (ComfyUI keeps them in models/checkpoints/)")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:  # else safetensors reports it as "No such file or directory"
        raise CheckpointError(f"checkpoint {path} cannot be read (permission denied): give this user read access "
                              "to it, e.g. chmod u+r") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err.strerror or err})") from None
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: unknown checkpoint type {path.suffix.lower()!r}; expected "
            f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
        )
    return path


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as exc:
        raise _incomplete_safetensors(path, exc) from exc
    try:
        verify_hash(path, metadata, tensors)  # a file EraseKit wrote (a saved text encoder), read as a checkpoint
    except FileError as err:
        raise retyped(err, CheckpointError) from None
    return tensors


def _incomplete_safetensors(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path.name} is not a complete safetensors file ({exc}). It is most likely truncated by an interrupted "
        f"download or copy: download or copy {path} again"
    )


def _read_pickle(path: Path, mmap: bool = False) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _unsafe_pickle(path, exc) from exc
    except Exception as exc:  # noqa: BLE001
        # Damaged bytes reach torch's unpickler and zip reader, which raise whatever the garbage trips over
        # (RuntimeError, EOFError, KeyError, IndexError, TypeError, struct.error, ...): all mean "not readable".
        raise CheckpointError(
            f"{path.name} is not a readable PyTorch checkpoint ({_first_line(exc)}). It may be truncated or "
            f"damaged: download or copy {path} again"
        ) from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path.name} holds a {type(loaded).__name__}, not a dictionary of tensors")
    tensors = {key: value for key, value in loaded.items() if isinstance(value, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path.name} contains no tensors: is it a model checkpoint?")
    return tensors


_CONVERT_HINT = (
    "If you trust its source, convert it to .safetensors (load it with torch.load(weights_only=False) and save "
    "only its tensors), or use a .safetensors release"
)


def _unsafe_pickle(path: Path, exc: pickle.UnpicklingError) -> CheckpointError:
    """The weights-only unpickler refused the file: name the Python object it met if there is one."""
    message = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found or "allowed global" in message:
        what = f" ({found.group(1)})" if found else ""
        return CheckpointError(
            f"{path.name} contains Python objects besides tensors{what}, and unpickling them could run code from "
            f"the file, so EraseKit does not load it. {_CONVERT_HINT}"
        )
    detail = re.search(r"Unsupported operand \d+", message)
    return CheckpointError(
        f"{path.name} cannot be read as tensors only ({detail.group(0) if detail else _first_line(exc)}): it is "
        f"damaged, or pickled in a way only full unpickling reads. Download it again. {_CONVERT_HINT}"
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def write_checkpoint(
    path: str | os.PathLike, state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
    *, inputs: Iterable = (),
) -> Path:
    """Write tensors (and string metadata) to a ``.safetensors`` file; the same input gives the same bytes.

    The file is written in the safetensors format but not with its library: the library orders ``__metadata__`` by
    a per-process hash seed, so two runs would give different files. The file appears under its name only when
    complete, so an interrupted write never leaves a truncated checkpoint behind; never over one of `inputs`.
    """
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(f"{path.name}: checkpoints are written as .safetensors only")
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; writing them on this machine is not supported")
    meta = {"format": "pt", **(metadata or {})}
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {type(value).__name__}")

    tensors: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{key!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{key!r} has dtype {tensor.dtype}, which safetensors cannot store")
        tensors[key] = tensor.detach().to("cpu").contiguous()

    # Largest elements first keeps every tensor's offset a multiple of its element size (the header is padded
    # to 8 bytes), which memory-mapping readers rely on.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    for key in order:
        tensor = tensors[key]
        size = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    def stream(out) -> None:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        for key in order:
            tensor = tensors[key]
            if tensor.numel():
                out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)

    # files.write_stream: a killed write leaves a temporary file the next write of `path` removes, never half a file
    return write_stream(path, stream, inputs=inputs)


# ---------------------------------------------------------------------------------------------------------------
# Whole checkpoints


@dataclass
class CheckpointParts:
    """The models of a single-file checkpoint, each with its checkpoint prefix removed."""

    unet: dict[str, Tensor] = field(default_factory=dict)
    vae: dict[str, Tensor] = field(default_factory=dict)
    text_encoder: dict[str, Tensor] = field(default_factory=dict)  # SD1.x CLIP-L, transformers names
    other: dict[str, Tensor] = field(default_factory=dict)  # anything else, keys unchanged (SDXL's conditioner.*)


_PARTS = (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", CLIP_L_PREFIX))


def split_checkpoint(state_dict: Mapping[str, Tensor]) -> CheckpointParts:
    parts = CheckpointParts()
    for key, tensor in state_dict.items():
        for name, prefix in _PARTS:
            if key.startswith(prefix):
                getattr(parts, name)[key[len(prefix):]] = tensor
                break
        else:
            parts.other[key] = tensor
    return parts


def join_checkpoint(parts: CheckpointParts) -> dict[str, Tensor]:
    joined = dict(parts.other)
    for name, prefix in _PARTS:
        joined.update({prefix + key: tensor for key, tensor in getattr(parts, name).items()})
    return joined


def checkpoint_from_diffusers(
    unet: Mapping[str, Tensor],
    vae: Mapping[str, Tensor],
    text_encoder: Mapping[str, Tensor],
    layout: UNetLayout | None = None,
) -> dict[str, Tensor]:
    """An SD1.x single-file state dict from diffusers UNet and VAE and transformers CLIP-L state dicts."""
    return join_checkpoint(
        CheckpointParts(
            unet=unet_diffusers_to_ldm(unet, layout),
            vae=vae_diffusers_to_ldm(vae),
            text_encoder=clip_l_transformers_to_ldm(text_encoder),
        )
    )


# ---------------------------------------------------------------------------------------------------------------
# UNet
#
# Every UNet tensor sits in a block whose LDM and diffusers paths differ; inside a block the names are equal
# except in res-blocks. The block table pairs the paths, using UNetLayout's numbering of input and output blocks.

_RESNET_LDM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}

_UNET_OUTER_BLOCKS = (  # (LDM, diffusers)
    ("input_blocks.0.0", "conv_in"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),  # SDXL's size and crop conditioning
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
    ("middle_block.0", "mid_block.resnets.0"),
    ("middle_block.1", "mid_block.attentions.0"),
    ("middle_block.2", "mid_block.resnets.1"),
)


@dataclass(frozen=True)
class _Block:
    ldm: str
    diffusers: str
    resnet: bool = False


def _unet_blocks(layout: UNetLayout, upsampler_slots: Mapping[int, Iterable[int]]) -> list[_Block]:
    """Pairs of block paths. `upsampler_slots[up_level]`: where an LDM output block holds its upsampler, 1 after a
    res-block alone and 2 after a res-block and an attention."""
    blocks = [_Block(ldm, diff, resnet=".resnets." in diff) for ldm, diff in _UNET_OUTER_BLOCKS]
    levels = len(layout.num_res_blocks)
    for level, count in enumerate(layout.num_res_blocks):
        for block in range(count):
            index = layout.input_index(level, block)
            blocks.append(_Block(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{block}", resnet=True))
            blocks.append(_Block(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{block}"))
        if level < levels - 1:
            index = layout.input_index(level, count)
            blocks.append(_Block(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
    for up_level, count in enumerate(layout.num_res_blocks[::-1]):
        for block in range(count + 1):
            index = layout.output_index(up_level, block)
            blocks.append(_Block(f"output_blocks.{index}.0", f"up_blocks.{up_level}.resnets.{block}", resnet=True))
            blocks.append(_Block(f"output_blocks.{index}.1", f"up_blocks.{up_level}.attentions.{block}"))
        if up_level < levels - 1:
            index = layout.output_index(up_level, count)
            for slot in upsampler_slots[up_level]:
                blocks.append(_Block(f"output_blocks.{index}.{slot}.conv", f"up_blocks.{up_level}.upsamplers.0.conv"))
    return blocks


def _rename(key: str, table: Mapping[str, tuple[str, Mapping[str, str] | None]]) -> str | None:
    """Replace the longest dotted head of `key` found in `table`, then rename the head of the rest if asked."""
    parts = key.split(".")
    for length in range(min(len(parts) - 1, 5), 0, -1):
        entry = table.get(".".join(parts[:length]))
        if entry is None:
            continue
        target, inner = entry
        rest = parts[length:]
        if inner is not None:
            for inner_length in (2, 1):
                renamed = inner.get(".".join(rest[:inner_length]))
                if renamed is not None and len(rest) > inner_length:
                    rest = [renamed, *rest[inner_length:]]
                    break
            else:
                return None
        return ".".join([target, *rest])
    return None


def unet_layout_from_diffusers_keys(keys: Iterable[str]) -> UNetLayout:
    """The res-blocks per level of a diffusers UNet, from its state-dict keys."""
    counts: dict[int, int] = {}
    pattern = re.compile(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.")
    for key in keys:
        match = pattern.match(key)
        if match:
            level, block = int(match.group(1)), int(match.group(2))
            counts[level] = max(counts.get(level, 0), block + 1)
    if not counts or sorted(counts) != list(range(len(counts))):
        raise FamilyError("no diffusers UNet down_blocks found: is this a diffusers UNet2DConditionModel state dict?")
    return UNetLayout(tuple(counts[level] for level in range(len(counts))))


def unet_key_map(diffusers_keys: Iterable[str], layout: UNetLayout | None = None) -> dict[str, str]:
    """diffusers UNet key -> LDM key (without ``model.diffusion_model.``), for every key given.

    Where an upsampler sits in its LDM output block depends on whether that level has attentions, which is read
    off the keys themselves, so pass all keys of the model.
    """
    keys = list(diffusers_keys)
    layout = layout or unet_layout_from_diffusers_keys(keys)
    with_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    slots = {level: (2 if level in with_attention else 1,) for level in range(len(layout.num_res_blocks))}
    table = {b.diffusers: (b.ldm, _RESNET_DIFFUSERS_TO_LDM if b.resnet else None) for b in _unet_blocks(layout, slots)}
    # diffusers calls SD2-unCLIP's embedding of the image class_embedding; LDM has one label_emb for both.
    table["class_embedding.linear_1"] = table["add_embedding.linear_1"]
    table["class_embedding.linear_2"] = table["add_embedding.linear_2"]
    mapping, unknown = {}, []
    for key in keys:
        renamed = _rename(key, table)
        if renamed is None:
            unknown.append(key)
        else:
            mapping[key] = renamed
    if unknown:
        what = f"a diffusers UNet with res-blocks {layout.num_res_blocks}"
        raise CheckpointError(_unknown_keys_message(unknown, what))
    return mapping


def unet_diffusers_to_ldm(state_dict: Mapping[str, Tensor], layout: UNetLayout | None = None) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict in LDM names (without ``model.diffusion_model.``)."""
    mapping = unet_key_map(state_dict.keys(), layout)
    return {mapping[key]: tensor for key, tensor in state_dict.items()}


def unet_ldm_to_diffusers(state_dict: Mapping[str, Tensor], layout: UNetLayout | None = None) -> dict[str, Tensor]:
    """An LDM UNet state dict (without ``model.diffusion_model.``) in diffusers UNet2DConditionModel names."""
    layout = layout or UNetLayout.from_ldm_keys(state_dict.keys())
    # An output block's upsampler is its last module: read either slot, whichever the checkpoint has.
    slots = {level: (1, 2) for level in range(len(layout.num_res_blocks))}
    table = {b.ldm: (b.diffusers, _RESNET_LDM_TO_DIFFUSERS if b.resnet else None) for b in _unet_blocks(layout, slots)}
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        renamed = _rename(key, table)
        if renamed is None:
            unknown.append(key)
        else:
            converted[renamed] = tensor
    if unknown:
        raise CheckpointError(_unknown_keys_message(unknown, f"an LDM UNet with res-blocks {layout.num_res_blocks}"))
    return converted


def _unknown_keys_message(unknown: list[str], what: str) -> str:
    shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    hint = ""
    if any(key.startswith((UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")) for key in unknown):
        hint = "; these keys still carry their checkpoint prefix: separate the models with split_checkpoint() first"
    return f"{len(unknown)} keys are not part of {what}: {shown}{hint}"


# ---------------------------------------------------------------------------------------------------------------
# VAE (AutoencoderKL)
#
# LDM numbers the decoder's levels from the full resolution up, diffusers from the latent down, so decoder level
# numbers are mirrored. The mid-block attention is a 1x1 convolution in LDM and a linear layer in diffusers.

_VAE_ATTENTION_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers before 0.15 named the attention projections query/key/value/proj_attn.
_VAE_ATTENTION_DIFFUSERS_TO_LDM = {
    **{v: k for k, v in _VAE_ATTENTION_LDM_TO_DIFFUSERS.items()},
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_VAE_ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")


def _vae_levels(keys: Iterable[str], pattern: str) -> int:
    levels = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not levels:
        raise CheckpointError("no VAE decoder levels found: is this an AutoencoderKL state dict?")
    return max(levels) + 1


def vae_diffusers_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict in LDM names (without ``first_stage_model.``)."""
    levels = _vae_levels(state_dict, r"decoder\.up_blocks\.(\d+)\.")
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        renamed = _vae_key_to_ldm(key, levels)
        if renamed is None:
            unknown.append(key)
            continue
        if _is_vae_projection_weight(renamed) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        converted[renamed] = tensor
    if unknown:
        raise CheckpointError(_unknown_keys_message(unknown, "a diffusers AutoencoderKL"))
    return converted


def vae_ldm_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An LDM VAE state dict (without ``first_stage_model.``) in diffusers AutoencoderKL names."""
    levels = _vae_levels(state_dict, r"decoder\.up\.(\d+)\.")
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        renamed = _vae_key_to_diffusers(key, levels)
        if renamed is None:
            unknown.append(key)
            continue
        if _is_vae_projection_weight(key) and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        converted[renamed] = tensor
    if unknown:
        raise CheckpointError(_unknown_keys_message(unknown, "an LDM AutoencoderKL"))
    return converted


def _is_vae_projection_weight(ldm_key: str) -> bool:
    return any(ldm_key.endswith(f"mid.attn_1.{name}.weight") for name in _VAE_ATTENTION_PROJECTIONS)


_VAE_SAME = re.compile(r"^(?:quant_conv|post_quant_conv|(?:encoder|decoder)\.(?:conv_in|conv_out))\.(?:weight|bias)$")


def _vae_key_to_ldm(key: str, levels: int) -> str | None:
    if _VAE_SAME.match(key):
        return key
    if m := re.match(r"^(encoder|decoder)\.conv_norm_out\.(weight|bias)$", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet_to_ldm(m[3])}.{m[4]}"
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet_to_ldm(m[3])}.{m[4]}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)$", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet_to_ldm(m[3])}.{m[4]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
        name = _VAE_ATTENTION_DIFFUSERS_TO_LDM.get(m[2])
        return None if name is None else f"{m[1]}.mid.attn_1.{name}.{m[3]}"
    return None


def _vae_key_to_diffusers(key: str, levels: int) -> str | None:
    if _VAE_SAME.match(key):
        return key
    if m := re.match(r"^(encoder|decoder)\.norm_out\.(weight|bias)$", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if m := re.match(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_vae_resnet_to_diffusers(m[3])}.{m[4]}"
    if m := re.match(r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.match(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$", key):
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_vae_resnet_to_diffusers(m[3])}.{m[4]}"
    if m := re.match(r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$", key):
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)$", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_vae_resnet_to_diffusers(m[3])}.{m[4]}"
    if m := re.match(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", key):
        name = _VAE_ATTENTION_LDM_TO_DIFFUSERS.get(m[2])
        return None if name is None else f"{m[1]}.mid_block.attentions.0.{name}.{m[3]}"
    return None


def _vae_resnet_to_ldm(name: str) -> str:
    return "nin_shortcut" if name == "conv_shortcut" else name


def _vae_resnet_to_diffusers(name: str) -> str:
    return "conv_shortcut" if name == "nin_shortcut" else name


# ---------------------------------------------------------------------------------------------------------------
# CLIP-L text encoder (SD1.x)
#
# SD1.x checkpoints store a transformers CLIPTextModel under cond_stage_model.transformer. with its own names.
# position_ids is a constant buffer that older transformers saved and newer ones do not load.

_POSITION_IDS = "text_model.embeddings.position_ids"


def clip_l_transformers_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers CLIPTextModel state dict in checkpoint names (without ``cond_stage_model.transformer.``)."""
    unknown = [key for key in state_dict if not key.startswith("text_model.")]
    if unknown:
        raise CheckpointError(_unknown_keys_message(unknown, "a transformers CLIPTextModel"))
    return {key: tensor for key, tensor in state_dict.items() if key != _POSITION_IDS}


def clip_l_ldm_to_transformers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint CLIP-L keys (without ``cond_stage_model.transformer.``) in transformers CLIPTextModel names.

    Early SD1.x checkpoints were saved by a transformers without the ``text_model.`` level; those keys gain it.
    """
    converted = {}
    for key, tensor in state_dict.items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        if key != _POSITION_IDS:
            converted[key] = tensor
    return converted
