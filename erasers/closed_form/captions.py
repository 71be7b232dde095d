"""Prompt data shipped with the package (see erasers/closed_form/data/README.md)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


@lru_cache(maxsize=1)
def _all_coco_captions() -> tuple[str, ...]:
    return tuple(line for line in (DATA / "coco_captions_2k.txt").read_text().splitlines() if line.strip())


def coco_captions(count: int) -> list[str]:
    """The first `count` shipped COCO captions (at most 2,000)."""
    captions = _all_coco_captions()
    if not 0 < count <= len(captions):
        raise ValueError(f"{count} COCO captions asked for; between 1 and {len(captions)} are shipped")
    return list(captions[:count])
