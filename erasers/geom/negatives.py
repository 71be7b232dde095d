"""Geom-Erasing (Liu, Chen et al., ECCV 2024): negative prompts of an implicit concept plus location tokens.

An implicit concept (a watermark, a QR code, text, a stamp) appears in images whose captions never name it, so its
name alone is a weak negative prompt. The paper splits the image into a k×k grid, gives every cell a token
⟨l{row}_{col}⟩ and, in the model-removal setting, learns only those token embeddings (UNet and text encoder
frozen) on captions extended with "concept ⟨cells covered by the detector box⟩". At inference the concept name and
the location tokens of the chosen cells go into the negative prompt. Without learned tokens this module describes
the cells in plain words ("stamp in the top left").

Cells are numbered row-major from the top left: cell = row·k + col. The paper has no official code; everything
here follows its description (docs/methods.md §6).

File format (``.safetensors``), readable by ComfyUI's ``embedding:`` loader:
- one tensor ``emb_params``, float32 [n, width]: the learned vector of each stored cell, in the order of the
  ``cells`` metadata. ComfyUI inserts all n vectors for ``embedding:NAME``, i.e. the stored cells' tokens.
- metadata (strings): ``format`` = "erasekit.geom_erasing", ``version`` = "1", ``concept``, ``grid`` (k),
  ``cells`` (JSON list of ints), ``tokens`` (JSON list of the token names ⟨l{row}_{col}⟩), ``width`` (the text
  encoder's embedding width), ``family`` (e.g. "sd1", "shapes"), and ``alpha`` / ``steps`` of the training run.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FileError, InputError, check_json, check_number, check_tensor, retyped
from ..files import OURS, read_safetensors, write_safetensors

FORMAT = "erasekit.geom_erasing"
VERSION = "1"
TENSOR_KEY = "emb_params"
CONCEPTS = ("watermark", "qr code", "text", "stamp")
EVERYWHERE = "everywhere"
DEFAULT_GRID = 3
_THIRDS = (("top", "", "bottom"), ("left", "", "right"))  # plain words for the first/middle/last third


class GeomError(InputError):
    """A wrong grid cell, box, concept or embedding file, with what would be right."""


def token_name(cell: int, grid: int) -> str:
    return f"<l{cell // grid}_{cell % grid}>"


def parse_cells(spec: str | Sequence[int], grid: int) -> list[int]:
    """Cells from "everywhere", a comma/space separated list ("0, 2 8") or a sequence of ints; sorted, unique."""
    if grid < 1:
        raise GeomError(f"grid must be at least 1, got {grid}")
    if isinstance(spec, str):
        if spec.strip().lower() in (EVERYWHERE, ""):
            return list(range(grid * grid))
        try:
            spec = [int(p) for p in spec.replace(",", " ").split()]
        except ValueError:
            raise GeomError(f"locations must be {EVERYWHERE!r} or cell numbers, got {spec!r}") from None
    bad = [c for c in spec if not 0 <= c < grid * grid]
    if bad:
        raise GeomError(f"unknown grid cells {bad}: a {grid}x{grid} grid has cells 0..{grid * grid - 1}, "
                        "numbered row-major from the top left")
    return sorted(set(int(c) for c in spec))


def cells_of_box(box: Sequence[float], width: int, height: int, grid: int) -> list[int]:
    """The cells a detector box (x0, y0, x1, y1 in pixels, x1/y1 exclusive) covers, as the paper's bin ranges
    ⌊a/W_bin⌋ … ⌊a²/W_bin⌋ (the exclusive end is taken just inside the box)."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise GeomError(f"box {tuple(box)} is not inside the {width}x{height} image (need 0 <= x0 < x1 <= width "
                        "and 0 <= y0 < y1 <= height)")
    bw, bh = width / grid, height / grid
    cols = range(int(x0 // bw), min(math.ceil(x1 / bw), grid))
    rows = range(int(y0 // bh), min(math.ceil(y1 / bh), grid))
    return [r * grid + c for r in rows for c in cols]


def cell_phrase(cell: int, grid: int) -> str:
    """Plain words for a cell, from the third of the image its centre lies in: "top left", "center", "right"."""
    row, col = divmod(cell, grid)
    vertical, horizontal = (_THIRDS[i][min(int(3 * (v + 0.5) / grid), 2)] for i, v in enumerate((row, col)))
    return " ".join(w for w in (vertical, horizontal) if w) or "center"


def concept_name(concept: str, custom: str = "") -> str:
    name = (custom if concept == "custom" else concept).strip()
    if not name:
        raise GeomError(f"no concept: pick one of {', '.join(CONCEPTS)} or 'custom' with a name")
    return name


def plain_negative(concept: str, cells: Sequence[int], grid: int) -> str:
    """The negative without learned tokens: the name alone for every cell (no location to tell), otherwise the
    name at each distinct place ("stamp in the top left, stamp in the bottom right")."""
    if len(cells) == grid * grid:
        return concept
    phrases = dict.fromkeys(cell_phrase(c, grid) for c in cells)  # ordered, unique (cells may share a third)
    return ", ".join(f"{concept} in the {p}" for p in phrases)


def append_negative(existing: str, addition: str) -> str:
    existing = existing.strip().rstrip(",")
    return f"{existing}, {addition}" if existing else addition


@dataclass
class LocationTokens:
    """Learned location-token vectors of one concept on a k×k grid: `vectors[i]` belongs to `cells[i]`."""
    concept: str
    grid: int
    cells: list[int]
    vectors: torch.Tensor  # [len(cells), width]
    family: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.vectors.shape[-1]

    def select(self, cells: Sequence[int]) -> torch.Tensor:
        """The vectors of `cells` (in that order); a cell this file has no token for is an error."""
        index = {c: i for i, c in enumerate(self.cells)}
        missing = [c for c in cells if c not in index]
        if missing:
            raise GeomError(f"this {self.concept!r} file has no tokens for cells {missing}; it holds {self.cells}")
        return self.vectors[[index[c] for c in cells]]

    def subset(self, cells: Sequence[int]) -> "LocationTokens":
        cells = parse_cells(cells, self.grid)
        return LocationTokens(self.concept, self.grid, cells, self.select(cells), self.family, dict(self.extra))

    def check_width(self, width: int, encoder: str = "this text encoder") -> None:
        if width != self.width:
            raise GeomError(f"the location tokens are {self.width} wide but {encoder} embeds tokens {width} wide: "
                            f"the file was trained for another text encoder (family {self.family or 'unknown'})")

    def save(self, path: str | Path, *, inputs=()) -> None:
        """Write the file atomically, with EraseKit's content hash; what `load` would refuse is never written."""
        meta = {"format": FORMAT, "version": VERSION, "concept": self.concept, "grid": str(self.grid),
                "cells": json.dumps(self.cells), "tokens": json.dumps([token_name(c, self.grid) for c in self.cells]),
                "width": str(self.width), "family": self.family, **self.extra}
        tensors = {TENSOR_KEY: self.vectors.detach().float().cpu().contiguous()}
        try:
            _check_file(path, meta, tensors)
        except InputError as err:
            raise retyped(err, LocationTokensFileError) from None
        write_safetensors(path, tensors, meta, inputs=inputs)

    @classmethod
    def load(cls, path: str | Path) -> "LocationTokens":
        """A location-token file, checked whole; any problem is a LocationTokensFileError naming file and key."""
        try:
            meta, tensors = read_safetensors(path, "location-token file")
            grid, cells, vectors = _check_file(path, meta, tensors)
        except InputError as err:
            raise retyped(err, LocationTokensFileError) from None
        known = {"format", "version", "concept", "grid", "cells", "tokens", "width", "family"}
        return cls(meta["concept"], grid, cells, vectors, meta.get("family", ""),
                   {k: v for k, v in meta.items() if k not in known and not k.startswith(OURS)})


class LocationTokensFileError(FileError, GeomError):
    """A location-token file is unreadable, corrupt, or not of this format."""


# Largest |value| of a learned token vector: CLIP token embeddings are O(1); beyond this the file is corrupt.
MAX_ABS = 1e4


def _check_file(path, meta, tensors) -> tuple[int, list[int], torch.Tensor]:
    """(grid, cells, vectors) of a location-token file, or a FileError naming the first problem."""
    if meta.get("format") != FORMAT:
        raise FileError(f"{path} is not a Geom-Erasing location-token file (metadata format "
                        f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise FileError(f"{path}: unsupported version {meta.get('version')!r} (this EraseKit reads {VERSION})")
    for key in ("concept", "grid", "cells", "width"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise FileError(file=path, key=key, expected="this metadata key, not empty", found=repr(meta.get(key)),
                            fix="the file is corrupt: train or copy it again")
    grid = _integer(path, meta, "grid", 1, 64)
    width = _integer(path, meta, "width", 1, 1 << 16)
    cells = check_json(path, "cells", meta["cells"], list, "a JSON list of cell numbers")
    if not cells or len(set(map(repr, cells))) != len(cells) or \
            any(isinstance(c, bool) or not isinstance(c, int) for c in cells):
        raise FileError(file=path, key="cells", expected="distinct cell numbers, at least one", found=repr(cells)[:80])
    try:
        parse_cells(cells, grid)
    except GeomError as err:
        raise FileError(file=path, key="cells", expected=f"cell numbers of a {grid}×{grid} grid",
                        found=str(err)[:160]) from None
    stray = sorted(set(tensors) - {TENSOR_KEY})
    if TENSOR_KEY not in tensors or stray:
        raise FileError(file=path, key=stray[0] if stray else TENSOR_KEY, expected=f"one tensor, {TENSOR_KEY!r}",
                        found=f"tensors {sorted(tensors)[:4]}", fix="the file is corrupt: train or copy it again")
    vectors = check_tensor(path, TENSOR_KEY, tensors[TENSOR_KEY], shape=(len(cells), width), max_abs=MAX_ABS)
    return grid, cells, vectors


def _integer(path, meta, key: str, low: int, high: int) -> int:
    try:
        return check_number(key, meta[key], low=low, high=high, integer=True)
    except InputError as err:
        raise FileError(file=path, key=key, expected=err.expected, found=err.found,
                        fix="the file is corrupt: train or copy it again") from None
