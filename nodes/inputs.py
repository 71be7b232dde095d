"""What the nodes accept from a prompt, checked in one place.

A prompt posted to ComfyUI's API is untrusted: a shared server must not read files outside its own folders, and
ComfyUI does not always hold a number to its widget's range (NaN passes every comparison). So:

- files: `folder_file` (a model folder: models/erasers, models/spm, ...) and `input_file` (the input folder) resolve a
  picked name inside the folder's real path; absolute names, `..` and symlinks leading out are refused, and no
  message quotes what a refused file holds;
- numbers: `checked_numbers` makes a node's function check every INT/FLOAT it receives against that node's own
  INPUT_TYPES declaration, so the declaration and the check cannot drift apart;
- work: `limit` reads the limits on concepts, prompts and prompt tokens, which a user raises on purpose through
  environment variables, and `check_limit` refuses work above one before any of it starts.
"""
from __future__ import annotations

import functools
import inspect
import os

from ..erasers.errors import FileError, InputError, check_limit, check_number

# name: (environment variable, default). The defaults keep one prompt's work to minutes and memory to a few GB.
LIMITS = {
    "concepts": ("ERASEKIT_MAX_CONCEPTS", 500),
    "prompts": ("ERASEKIT_MAX_PROMPTS", 4096),
    "prompt_tokens": ("ERASEKIT_MAX_PROMPT_TOKENS", 300),
}
START_TOKEN, END_TOKEN = 49406, 49407  # CLIP's, in every SD tokenizer ComfyUI ships
INPUT_ANNOTATION = "[input]"  # ComfyUI's own names carry it at the end ("a.csv [input]"); the picker's at the start


# --- limits --------------------------------------------------------------------------------------------------------


def limit(name: str) -> int:
    """The limit `name` (LIMITS): its environment variable when set, else the default."""
    variable, default = LIMITS[name]
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(key=variable, expected="a whole number ≥ 1", found=repr(text)[:40],
                         fix=f"set {variable} to a count, or unset it for the default {default}")
    return value


def check_count(what: str, count: int, name: str) -> None:
    """Refuse `count` items above the limit `name`, naming the variable that raises it."""
    variable = LIMITS[name][0]
    check_limit(what, count, limit(name), setting=f"{variable}=<count> in the environment ComfyUI starts in")


def prompt_tokens(clip, text: str, what: str) -> int:
    """The number of CLIP tokens of `text` (ComfyUI's tokenizer, all 77-token chunks), refused above the limit."""
    return check_tokens(clip.tokenize(text), what)


def check_tokens(tokens: dict, what: str) -> int:
    """The word tokens in ComfyUI's tokens of a prompt (every chunk), refused above the limit."""
    chunks = tokens.get("l") or next(iter(tokens.values()))  # "l" pads with the end token, SDXL's "g" with 0
    count = sum(1 for chunk in chunks for entry in chunk
                if not isinstance(entry[0], int) or entry[0] not in (START_TOKEN, END_TOKEN))
    variable, _ = LIMITS["prompt_tokens"]
    check_limit(f"tokens in {what}", count, limit("prompt_tokens"),
                setting=f"{variable}=<count> in the environment ComfyUI starts in (CLIP reads 75 per chunk)")
    return count


def between_steps(total: int):
    """A callback(done, total) for long loops: stops at ComfyUI's interrupt (the Cancel button, POST /interrupt)
    and moves ComfyUI's progress bar."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(total, 1))

    def step(done: int, of: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, of)

    return step


# --- files ---------------------------------------------------------------------------------------------------------


def folder_file(kind: str, name: str, input_name: str) -> str:
    """The file `name` picked for `input_name` from ComfyUI's folder `kind` (folder_paths), inside that folder."""
    import folder_paths

    where = f"models/{kind}"
    _refuse_escape(name, input_name, where)
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        raise FileError(key=input_name, expected=f"a file in {where}", found=f"no file {name!r} there",
                        fix="choose one from the list (after adding files, refresh ComfyUI's lists with R)")
    return inside_folder(path, folder_paths.get_folder_paths(kind), name, input_name, where)


def input_file(name: str, input_name: str, suffixes: tuple[str, ...]) -> str:
    """The file `name` picked for `input_name` from ComfyUI's input folder (plain, or annotated with [input])."""
    import folder_paths

    plain = strip_input_annotation(name)
    _refuse_escape(plain, input_name, "the input folder")
    if not plain.lower().endswith(suffixes):
        raise FileError(key=input_name, expected=f"a {' or '.join(suffixes)} file in ComfyUI's input folder",
                        found=repr(name)[:120], fix="choose one from the list")
    root = folder_paths.get_input_directory()
    path = os.path.join(root, plain)
    if not os.path.isfile(path):
        raise FileError(key=input_name, expected="a file in ComfyUI's input folder", found=f"no file {plain!r} there",
                        fix="put the file in ComfyUI's input folder and choose it from the list (refresh with R)")
    return inside_folder(path, [root], plain, input_name, "the input folder")


def input_files(suffixes: tuple[str, ...]) -> list[str]:
    """The files in ComfyUI's input folder (and below it) with these suffixes, as names for a picker."""
    import folder_paths

    root = folder_paths.get_input_directory()
    names = []
    for folder, subfolders, files in os.walk(root, followlinks=False):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        relative = os.path.relpath(folder, root)
        for file in files:
            if file.lower().endswith(suffixes) and not file.startswith("."):
                names.append(file if relative == "." else f"{relative}/{file}".replace(os.sep, "/"))
    return sorted(names)


def strip_input_annotation(name: str) -> str:
    name = name.strip()
    if name.startswith(INPUT_ANNOTATION):
        return name[len(INPUT_ANNOTATION):].strip()
    if name.endswith(INPUT_ANNOTATION):
        return name[:-len(INPUT_ANNOTATION)].strip()
    return name


def _refuse_escape(name: str, input_name: str, where: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("~", "/", "\\")) or ":" in parts[0] or ".." in parts or "\0" in name:
        raise FileError(key=input_name, expected=f"a file name inside {where}", found=repr(name)[:120],
                        fix=f"choose a file from the list; absolute paths and '..' are refused on purpose, so a "
                            f"prompt cannot read files outside {where}")


def inside_folder(path: str, roots, name: str, input_name: str, where: str) -> str:
    """`path` if its real path (symlinks followed) lies inside one of `roots`' real paths."""
    real = os.path.realpath(path)
    for root in roots:
        top = os.path.realpath(root)
        if os.path.commonpath([real, top]) == top:
            return path
    raise FileError(key=input_name, expected=f"a file inside {where}", found=f"{name!r} resolves outside it (a "
                    "symlink leading out)", fix=f"copy the file into {where}, or add its folder to ComfyUI's "
                    "extra_model_paths.yaml")


# --- numbers -------------------------------------------------------------------------------------------------------


def checked_numbers(cls):
    """Class decorator: the node's FUNCTION checks every INT and FLOAT it gets against the node's INPUT_TYPES."""
    method = getattr(cls, cls.FUNCTION)
    signature = inspect.signature(method)

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        check_numbers(cls, signature.bind(self, *args, **kwargs).arguments)
        return method(self, *args, **kwargs)

    setattr(cls, cls.FUNCTION, run)
    return cls


def check_numbers(cls, values: dict) -> None:
    """Each INT/FLOAT input in `values`: a finite number within its declared min and max (an integer for INT)."""
    for name, kind, options in number_inputs(cls):
        if name not in values:
            continue
        value, low, high = values[name], options.get("min"), options.get("max")
        key, fix = f"{cls.__name__}.{name}", f"set {name} to a value the widget allows (the API does not enforce it)"
        if kind == "INT" and isinstance(value, int) and not isinstance(value, bool):
            # Exactly, as integers: a seed's max (2**64 - 1) is not a float, and rounds past itself as one.
            if (low is None or value >= low) and (high is None or value <= high):
                continue
        check_number(key, value, low=low, high=high, integer=kind == "INT", fix=fix)


def number_inputs(cls) -> list[tuple[str, str, dict]]:
    """(name, 'INT' or 'FLOAT', options) of every numeric input the node declares."""
    declared = cls.INPUT_TYPES()
    out = []
    for part in ("required", "optional"):
        for name, spec in declared.get(part, {}).items():
            if spec and spec[0] in ("INT", "FLOAT"):
                out.append((name, spec[0], spec[1] if len(spec) > 1 else {}))
    return out
