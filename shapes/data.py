"""The shapes world's data: seeded images of one coloured, patterned shape, their captions and their labels.

Every concept a method may erase has a label here, so erasure is measured by classifying what a model draws:
shape (with synonyms, the way "nudity" has "naked"), colour, fill pattern (our stand-in for artistic style), grid
position, and an implicit concept, a stamp in a corner that no caption mentions (Geom-Erasing's watermark).

`render(spec)` draws one image from its `Spec`; `sample_specs(rng, n)` draws specs with the training distribution;
`batch(seed, n)` is both, deterministic in (seed, n): the training script asks for batch `step` with seed `step`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SIZE = 32
SUPERSAMPLE = 4  # anti-aliased edges: render at 4× and average

SHAPES = ("circle", "square", "triangle", "star", "cross")
SHAPE_SYNONYMS = {
    "circle": ("disc", "round shape"),
    "square": ("box", "block"),
    "triangle": ("pyramid", "wedge"),
    "star": ("starburst", "pentagram"),
    "cross": ("plus sign", "plus"),
}
COLORS = {  # name: RGB in [0, 1]
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "purple": (0.60, 0.15, 0.80),
}
COLOR_SYNONYMS = {
    "red": ("scarlet",), "orange": ("amber",), "yellow": ("golden",),
    "green": ("emerald",), "blue": ("azure",), "purple": ("violet",),
}
PATTERNS = ("solid", "striped", "dotted")
PATTERN_WORDS = {  # (adjective, noun phrase for "with ...")
    "solid": (("solid", "plain"), ("no pattern",)),
    "striped": (("striped",), ("stripes",)),
    "dotted": (("dotted", "spotted"), ("dots", "polka dots")),
}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = ("white", "light gray", "dark gray", "noise", "grid")
STAMP_RATE = 0.3
STAMP_SIZE = 5
CAPTION_DROPOUT = 0.1  # empty captions, for classifier-free guidance

# Caption templates; {a} is the article the next word needs. Position is appended to half of the captions.
TEMPLATES = (
    "{a} {color} {pattern} {shape}",
    "{a} {pattern} {color} {shape}",
    "{a} {color} {shape} with {pattern_noun}",
    "a picture of {a} {color} {pattern} {shape}",
    "{a} {shape} that is {color} and {pattern}",
)
POSITION_SUFFIXES = (" in the {position}", " at the {position}")


@dataclass(frozen=True)
class Spec:
    shape: str
    color: str
    pattern: str
    position: int  # index into POSITIONS (row-major 3×3 grid)
    background: str
    stamp: int | None  # index into CORNERS, or None
    size: float  # radius in pixels
    jitter: tuple[float, float]  # centre offset in pixels
    seed: int  # background noise and nothing else


def grid_centre(position: int) -> tuple[float, float]:
    row, col = divmod(position, 3)
    return 8.0 + 8.0 * col, 8.0 + 8.0 * row  # x, y in pixels; cells overlap so shapes can be large


def sample_specs(rng: np.random.Generator, n: int) -> list[Spec]:
    specs = []
    for _ in range(n):
        specs.append(Spec(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=list(COLORS)[rng.integers(len(COLORS))],
            pattern=PATTERNS[rng.integers(len(PATTERNS))],
            position=int(rng.integers(len(POSITIONS))),
            background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
            stamp=int(rng.integers(len(CORNERS))) if rng.random() < STAMP_RATE else None,
            size=float(rng.uniform(6.0, 7.5)),
            jitter=(float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))),
            seed=int(rng.integers(2**31)),
        ))
    return specs


def caption(spec: Spec, rng: np.random.Generator, dropout: float = CAPTION_DROPOUT) -> str:
    """One training caption for `spec`: a random template, synonyms a third of the time, position half the time,
    never the stamp."""
    if rng.random() < dropout:
        return ""
    shape = spec.shape if rng.random() < 2 / 3 else SHAPE_SYNONYMS[spec.shape][rng.integers(2)]
    color = spec.color if rng.random() < 3 / 4 else COLOR_SYNONYMS[spec.color][0]
    adjectives, nouns = PATTERN_WORDS[spec.pattern]
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    pattern = adjectives[rng.integers(len(adjectives))]
    first = {"{color}": color, "{pattern}": pattern, "{shape}": shape}[template.split("{a} ")[1].split()[0]]
    text = template.format(a=_article(first), color=color, shape=shape, pattern=pattern,
                           pattern_noun=nouns[rng.integers(len(nouns))])
    if rng.random() < 0.5:
        text += POSITION_SUFFIXES[rng.integers(2)].format(position=POSITIONS[spec.position])
    return text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt(shape: str, color: str, pattern: str, position: int | None = None) -> str:
    """The canonical evaluation prompt; `shape` and `color` may be synonyms."""
    text = f"{_article(color)} {color} {PATTERN_WORDS[pattern][0][0]} {shape}"
    return text if position is None else f"{text} in the {POSITIONS[position]}"


# --- rendering ---------------------------------------------------------------------------------------------------

def _polygon_mask(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over the pixel grid."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        (x0, y0), (x1, y1) = vertices[i], vertices[(i + 1) % n]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xcross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xcross)
    return inside


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.8 * r
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return _polygon_mask(x, y, np.stack([r * 1.1 * np.cos(angles), r * 1.1 * np.sin(angles) + 0.15 * r], 1))
    if shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.1 * r, 0.45 * r)
        return _polygon_mask(x, y, np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1))
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _fill(pattern: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """1 where the fill shows the colour, 0 where it shows the pattern's dark ink (pixel coordinates)."""
    if pattern == "solid":
        return np.ones(px.shape)
    if pattern == "striped":  # horizontal stripes, period 4 px
        return (np.floor(py / 2) % 2 == 0).astype(float)
    if pattern == "dotted":  # 2×2 px dots on a 4 px lattice
        return 1.0 - ((np.floor(px / 2) % 2 == 0) & (np.floor(py / 2) % 2 == 0)).astype(float)
    raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3))
    if kind == "white":
        img[:] = 0.97
    elif kind == "light gray":
        img[:] = 0.78
    elif kind == "dark gray":
        img[:] = 0.30
    elif kind == "noise":
        img[:] = 0.70 + 0.12 * rng.standard_normal((SIZE, SIZE, 1))
    elif kind == "grid":
        img[:] = 0.88
        img[::8] = 0.65
        img[:, ::8] = 0.65
    else:
        raise ValueError(f"unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")
    return img


def stamp_box(corner: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels of the stamp in `corner`, 1 px from the edges."""
    right, bottom = corner in (1, 3), corner in (2, 3)
    x0 = SIZE - 1 - STAMP_SIZE if right else 1
    y0 = SIZE - 1 - STAMP_SIZE if bottom else 1
    return x0, y0, x0 + STAMP_SIZE, y0 + STAMP_SIZE


def _stamp(img: np.ndarray, corner: int) -> None:
    """A black square with a white centre dot: a mark unlike any shape, drawn over everything."""
    x0, y0, x1, y1 = stamp_box(corner)
    img[y0:y1, x0:x1] = 0.0
    img[y0 + 2, x0 + 2] = 1.0


def render(spec: Spec) -> np.ndarray:
    """[SIZE, SIZE, 3] float in [0, 1]."""
    rng = np.random.default_rng(spec.seed)
    img = _background(spec.background, rng)
    n = SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    px, py = np.meshgrid(coords, coords)
    cx, cy = grid_centre(spec.position)
    cx, cy = cx + spec.jitter[0], cy + spec.jitter[1]
    mask = _shape_mask(spec.shape, px - cx, py - cy, spec.size)
    color = np.asarray(COLORS[spec.color])
    fill = _fill(spec.pattern, px - cx + 64, py - cy + 64)  # pattern moves with the shape
    ink = color * 0.3
    layer = fill[..., None] * color + (1 - fill[..., None]) * ink
    alpha = mask.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((1, 3))[..., None]
    layer = (layer * mask[..., None]).reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).sum((1, 3))
    layer = layer / np.maximum(mask.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).sum((1, 3)), 1)[..., None]
    img = img * (1 - alpha) + layer * alpha
    if spec.stamp is not None:
        _stamp(img, spec.stamp)
    return np.clip(img, 0.0, 1.0)


def batch(seed: int, n: int, dropout: float = CAPTION_DROPOUT) -> tuple[np.ndarray, list[str], list[Spec]]:
    """n images ([n, 3, SIZE, SIZE] float32 in [-1, 1]), captions and specs, a pure function of (seed, n)."""
    rng = np.random.default_rng([seed, n])
    specs = sample_specs(rng, n)
    captions = [caption(s, rng, dropout) for s in specs]
    images = np.stack([render(s) for s in specs]).transpose(0, 3, 1, 2).astype(np.float32) * 2 - 1
    return images, captions, specs


def with_stamp(spec: Spec, corner: int | None) -> Spec:
    return replace(spec, stamp=corner)


def geom_training_set(n: int, seed: int = 0, dropout: float | None = None) -> tuple:
    """The shapes world's training images with their stamps' boxes, as a detector would report them; `dropout`:
    the fraction of empty captions (default the world's own)."""
    import torch

    images, captions, specs = batch(seed, n, **({} if dropout is None else {"dropout": dropout}))
    boxes = [[stamp_box(s.stamp)] if s.stamp is not None else [] for s in specs]
    return torch.from_numpy(images), captions, boxes
