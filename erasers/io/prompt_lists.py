"""Prompt lists for batch generation, shared by the Prompt List node and `erasekit batch`.

Two forms:
- text: one prompt per line; blank lines are skipped.
- CSV in the layout of the erasure benchmarks' prompt files (I2P, the UCE / ESD / RECE evaluation CSVs): a header
  row with a `prompt` column (required) and optionally `evaluation_seed` and `evaluation_guidance` (I2P's own
  release calls them `sd_seed` and `sd_guidance_scale`) and `categories`; other columns are ignored. Every data
  row is an item, one with an empty prompt included (blank lines are skipped): indices count the data rows.

A row without a seed gets `seed + index`, with the index counted over the whole list, so an item's seed does not
depend on which rows a run selects.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import FileError

SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale")
MAX_SEED = 2**64 - 1  # ComfyUI's seed range


class PromptListError(FileError):
    pass


@dataclass(frozen=True)
class PromptItem:
    index: int  # position in the whole list: the CSV's data row, or the text's non-blank line
    prompt: str
    seed: int
    guidance: float | None = None  # None: the workflow's or the pipeline's own
    categories: str | None = None


def parse_text(text: str, seed: int = 0) -> list[PromptItem]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [PromptItem(i, line, seed + i) for i, line in enumerate(lines)]


def parse_csv(text: str, seed: int = 0, source: str = "the CSV", quote: bool = True) -> list[PromptItem]:
    """The CSV's items. `quote`: messages may quote the file's header and cells (False on a shared server, where the
    file may be someone else's)."""
    if not text.strip():
        raise PromptListError(f"{source} is empty: write a header row with a 'prompt' column and one prompt per row")
    reader = csv.reader(io.StringIO(text))
    rows = _rows(reader, source)
    header = [name.strip().lower() for name in next(rows)]
    if "prompt" not in header:
        columns = ', '.join(repr(h) for h in header) if quote else f"{len(header)}, none named 'prompt'"
        raise PromptListError(
            f"{source} has no 'prompt' column (its columns: {columns}); name the column "
            "that holds the prompts 'prompt' in the header row, or use a .txt file with one prompt per line")
    column = {name: header.index(name) for name in header}
    seed_col = next((c for c in SEED_COLUMNS if c in column), None)
    guidance_col = next((c for c in GUIDANCE_COLUMNS if c in column), None)

    def cell(row: list[str], name: str | None) -> str:
        return row[column[name]].strip() if name in column and column[name] < len(row) else ""

    items = []
    for row in rows:
        if not any(value.strip() for value in row):
            continue  # a blank line, typically the last one
        index, where = len(items), f"{source} row {len(items) + 1} (line {reader.line_num})"
        seed_text, guidance_text = cell(row, seed_col), cell(row, guidance_col)
        items.append(PromptItem(
            index=index,
            prompt=cell(row, "prompt"),
            seed=_seed(seed_text, seed_col, where, quote) if seed_text else seed + index,
            guidance=_guidance(guidance_text, guidance_col, where, quote) if guidance_text else None,
            categories=cell(row, "categories") or None,
        ))
    if not items:
        raise PromptListError(f"{source} has a header row but no prompts")
    return items


def _rows(reader, source: str):
    """The reader's rows, with csv's own errors (a field over its 131072-character limit, a NUL byte) as a
    PromptListError naming the file and line instead of a bare csv.Error."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise PromptListError(f"{source} line {reader.line_num}: not a readable CSV row ({err}); a quote left "
                                  "open makes the rest of the file one field: close it, or shorten the cell") \
                from None
        yield row


def _seed(text: str, column: str, where: str, quote: bool = True) -> int:
    try:
        value: int | None = int(text)
    except ValueError:
        try:
            number = float(text)  # CSVs written through pandas hold integer columns with gaps as "1234.0"
        except ValueError:
            number = math.nan
        value = int(number) if number.is_integer() else None
    if value is None or not 0 <= value <= MAX_SEED:
        cell = f" {text!r}" if quote else ""
        raise PromptListError(f"{where}: {column}{cell} is not a whole number from 0 to {MAX_SEED}; fix the cell, "
                              "or leave it empty to use the seed option + the row's index")
    return value


def _guidance(text: str, column: str, where: str, quote: bool = True) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        cell = f" {text!r}" if quote else ""
        raise PromptListError(f"{where}: {column}{cell} is not a guidance scale (a number >= 0); fix the cell, "
                              "or leave it empty to use the workflow's")
    return value


def read_prompt_file(path: str | Path, seed: int = 0, quote: bool = True) -> list[PromptItem]:
    """A .csv file (header with a 'prompt' column) or any other text file (one prompt per line); `quote` as in
    parse_csv."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets save UTF-8 with a byte-order mark
    except FileNotFoundError:
        raise PromptListError(f"no prompt file {path}") from None
    except UnicodeDecodeError as err:
        raise PromptListError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") \
            from None
    if path.suffix.lower() == ".csv":
        return parse_csv(text, seed, str(path), quote)
    items = parse_text(text, seed)
    if not items:
        raise PromptListError(f"{path} is empty: write one prompt per line")
    return items


def select(items: list[PromptItem], start: int = 0, count: int = 0) -> list[PromptItem]:
    """Items start, start+1, ... (`count` of them; 0: to the end)."""
    if start < 0 or count < 0:
        raise PromptListError(f"start ({start}) and count ({count}) must be >= 0")
    if start >= len(items):
        raise PromptListError(f"start {start} is past the last prompt: the list has {len(items)} (indices from 0)")
    return items[start:start + count if count else None]
