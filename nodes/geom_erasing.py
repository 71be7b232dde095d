"""Node: a Geom-Erasing negative prompt (erasers/geom/negatives.py): an implicit concept at grid locations, in plain
words or with learned location tokens from models/embeddings, appended to an existing negative."""
from __future__ import annotations

from ..erasers.geom.negatives import (
    CONCEPTS,
    DEFAULT_GRID,
    GeomError,
    LocationTokens,
    append_negative,
    concept_name,
    parse_cells,
    plain_negative,
)
from .inputs import checked_numbers, folder_file

CATEGORY = "EraseKit"
NO_FILE = "none (plain words)"


def encode_tokens(clip, tokens) -> list:
    """Conditioning as CLIPTextEncode makes it from tokens (the newest ComfyUI schedules hooks; 2024's has none)."""
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def splice(chunks: list, vectors, end_token: int) -> list:
    """The token chunks with `vectors` inserted before the last chunk's end token, as ComfyUI inserts an
    `embedding:` file's vectors (tensors in place of token ids); trailing padding makes room."""
    *head, last = chunks
    end = next(i for i, entry in enumerate(last) if i > 0 and isinstance(entry[0], int) and entry[0] == end_token)
    if len(last) - end - 1 < len(vectors):
        raise GeomError(f"no room for {len(vectors)} location tokens after the negative text in CLIP's 77-token "
                        "window: shorten the existing negative or choose fewer locations")
    extra = tuple(last[end][2:])  # keep the entries' layout: (token, weight) or (token, weight, word id)
    inserted = [(v, 1.0, *extra) for v in vectors]
    return [*head, (last[:end] + inserted + last[end:])[:len(last)]]


class GeomErasingNegative:
    DESCRIPTION = (
        "Geom-Erasing negative prompt: an implicit concept (watermark, QR code, text, stamp or your own) at grid "
        "locations, appended to an existing negative. Without an embedding file the locations are plain words "
        "('watermark in the top left'); with a Geom-Erasing file from models/embeddings (erasekit train-geom) the "
        "concept name is followed by its learned location tokens. Cells are numbered row-major from the top left "
        "(3x3: 0 1 2 / 3 4 5 / 6 7 8).")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("negative",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "clip": ("CLIP",),
                "concept": ([*CONCEPTS, "custom"], {"default": "watermark"}),
                "custom_concept": ("STRING", {"default": "", "tooltip": "The concept's name when concept is custom."}),
                "locations": ("STRING", {"default": "everywhere", "tooltip": "'everywhere' or cell numbers, e.g. "
                                         "'0, 2, 6, 8' for the corners of a 3x3 grid."}),
                "grid": ("INT", {"default": DEFAULT_GRID, "min": 1, "max": 16, "tooltip": "k of the k x k grid; "
                                 "must match the embedding file's."}),
                "embedding": ([NO_FILE, *folder_paths.get_filename_list("embeddings")],),
                "negative": ("STRING", {"multiline": True, "default": "", "tooltip": "An existing negative "
                                        "prompt to append to."}),
            }
        }

    def build(self, clip, concept, custom_concept, locations, grid, embedding, negative):
        name = concept_name(concept, custom_concept)
        cells = parse_cells(locations, grid)
        if embedding == NO_FILE:
            return (encode_tokens(clip, clip.tokenize(append_negative(negative, plain_negative(name, cells, grid)))),)
        tokens = LocationTokens.load(folder_file("embeddings", embedding, "embedding"))
        if tokens.concept != name:
            raise GeomError(f"{embedding} holds location tokens of {tokens.concept!r}, not {name!r}: choose that "
                            "concept")
        if tokens.grid != grid:
            raise GeomError(f"{embedding} was trained on a {tokens.grid}x{tokens.grid} grid; set grid to "
                            f"{tokens.grid}")
        chunks = clip.tokenize(append_negative(negative, name))
        if len(chunks) != 1:
            raise GeomError(f"location-token files hold one text encoder's vectors; this CLIP has {len(chunks)} "
                            f"({', '.join(chunks)})")
        (key,) = chunks
        sub = getattr(clip.tokenizer, f"clip_{key}")
        width = getattr(clip.cond_stage_model, f"clip_{key}").transformer.get_input_embeddings().weight.shape[1]
        tokens.check_width(width, f"this CLIP (clip_{key})")
        return (encode_tokens(clip, {key: splice(chunks[key], tokens.select(cells), sub.end_token)}),)


NODE_CLASS_MAPPINGS = {"EraseKitGeomErasingNegative": checked_numbers(GeomErasingNegative)}
NODE_DISPLAY_NAME_MAPPINGS = {"EraseKitGeomErasingNegative": "Geom-Erasing Negative (EraseKit)"}
