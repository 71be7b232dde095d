"""Reading model component files: one diffusers component folder (``unet/``, ``text_encoder/``, ...) with its
weights as one file or shards with an index, ``.safetensors`` or PyTorch ``.bin``, optional variants such as
``.fp16``; and the metadata of a safetensors file. Every reader of folders, shards and safetensors metadata in
EraseKit goes through here.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from .checkpoints import SAFETENSORS_SUFFIXES, CheckpointError, read_checkpoint, read_checkpoint_shapes

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# diffusers' and transformers' weight file names (other .bin files, e.g. training_args.bin, are not weights)
_WEIGHT_NAME = re.compile(r"^(?:diffusion_pytorch_model|pytorch_model|model)[.-]")

Select = Callable[[str], bool]


# ---------------------------------------------------------------------------------------------------------------
# diffusers component folders


@dataclass(frozen=True)
class WeightSet:
    """One saved copy of a component's weights: a single file, or shards listed by an index; a `variant` (fp16,
    ...) or the default."""

    folder: Path
    files: tuple[str, ...]
    index: str | None = None
    variant: str | None = None

    @property
    def safetensors(self) -> bool:
        return all(name.endswith(".safetensors") for name in self.files)

    def paths(self) -> list[Path]:
        return [self.folder / name for name in self.files]


def _variant(name: str) -> str | None:
    """``diffusion_pytorch_model.fp16.safetensors`` -> fp16; ``model.safetensors.index.fp16.json`` -> fp16."""
    stem = re.sub(r"-\d{5}-of-\d{5}", "", name)
    stem = re.sub(r"\.(safetensors|bin)\.index(\..+)?\.json$", r"\2", stem)
    stem = re.sub(r"\.(safetensors|bin)$", "", stem)
    parts = stem.split(".", 1)
    return parts[1].lstrip(".") or None if len(parts) > 1 else None


def weight_sets(component: str | os.PathLike) -> list[WeightSet]:
    """Every copy of the weights in a diffusers component folder, the preferred first: safetensors before .bin, the
    default before variants."""
    folder = Path(component)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    sets: list[WeightSet] = []
    sharded: set[str] = set()
    for index in sorted(p for p in folder.glob("*.index*.json") if _WEIGHT_NAME.match(p.name)):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, OSError) as err:
            raise CheckpointError(f"{index}: not a readable shard index ({err})") from None
        files = tuple(sorted(set(weight_map.values())))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists {missing[0]}, which is not in {folder}: the download is "
                                  "incomplete")
        sets.append(WeightSet(folder, files, index.name, _variant(index.name)))
        sharded.update(files)
    for path in sorted(folder.iterdir()):
        if (path.suffix in WEIGHT_SUFFIXES and _WEIGHT_NAME.match(path.name) and path.is_file()
                and path.name not in sharded):
            sets.append(WeightSet(folder, (path.name,), None, _variant(path.name)))
    if not sets:
        raise CheckpointError(f"{folder} holds no weights (.safetensors or .bin files)")
    return sorted(sets, key=lambda s: (not s.safetensors, s.variant is not None, s.variant or "", s.files))


def read_weight_set(weights: WeightSet, select: Select | None = None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for path in weights.paths():
        out.update(read_file(path, select))
    return out


def read_component(component: str | os.PathLike, select: Select | None = None) -> dict[str, Tensor]:
    """The (selected) tensors of a diffusers component folder, from its preferred weight set."""
    return read_weight_set(weight_sets(component)[0], select)


def read_file(path: Path, select: Select | None = None) -> dict[str, Tensor]:
    """Tensors of one file; for safetensors only the selected ones are read."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES and select is not None:
        from safetensors import SafetensorError, safe_open

        read_checkpoint_shapes(path)  # checks the file is complete, with the usual message
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys() if select(key)}
        except SafetensorError as err:
            raise CheckpointError(f"{path.name} cannot be read ({err}): copy or download it again") from err
    tensors = read_checkpoint(path)
    return tensors if select is None else {k: v for k, v in tensors.items() if select(k)}


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata()
    except SafetensorError as err:
        raise CheckpointError(f"{Path(path).name}: cannot read its metadata ({err})") from err


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "unet").is_dir()
