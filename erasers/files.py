"""Reading and writing the files EraseKit owns, so that nothing a user has is lost or silently changed.

- Writes are atomic: a temporary file beside the target, renamed over it, so a reader or a killed run never sees half
  a file; a stray temporary file is named ``.<target>.<random>.tmp`` and `remove_stale_partials` clears it (the next
  write of the same target does). Big files stream into it (`write_stream`); a folder is built beside its name and
  renamed (`write_folder`).
- No write lands on one of its own inputs: the same path, a hard link to it, or a symlink to it (`refuse_inputs`).
- Output files get the mode the umask gives a new file (``tempfile`` would make them 0600).
- Every safetensors file EraseKit writes carries a content hash in its metadata (`HASH_KEY`): SHA-256 over each
  tensor's name, dtype, shape and bytes and over the other metadata, in sorted order. `read_safetensors` checks it and
  refuses a file changed since; files from other tools (no hash) load as before. It costs one pass over the tensors'
  bytes (docs/benchmarks.md has the figure for 1 GB).
- Such a file also carries `WRITER_KEY` (the EraseKit version that wrote it). A file with that key, or an erasure of
  format 2 or later (the first written with the hash), but no hash is refused: deleting the hash must not turn a
  changed file into a "foreign" one that loads unchecked. Erasures of format 1 (written before the hash) and files
  from other tools load as before.
- Tensors read are copies, never views of the file's memory map: a file replaced or rewritten in place after loading
  cannot change what was loaded.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import FileError

HASH_KEY = "erasekit_sha256"
WRITER_KEY = "erasekit_writer"
OURS = "erasekit_"  # prefix of every metadata key EraseKit writes itself
FORMAT_KEY = "erasekit_format"  # an erasure file's format version (erasers/erasure.py)
HASHED_FORMAT = 2  # the first erasure format written with the content hash
SUFFIX = ".tmp"  # of the temporary file beside the target, named ".<target name>.<random>.tmp"


# ---------------------------------------------------------------------------------------------------------------
# Paths


def readable_file(path: str | os.PathLike, what: str = "file", fix: str | None = None) -> Path:
    """`path` as an existing, readable regular file, or a FileError saying which of those it is not."""
    if not isinstance(path, (str, os.PathLike)):  # ComfyUI's get_full_path gives None for a vanished file
        raise FileError(f"no {what} given (found {path!r})" + (f": {fix}" if fix else ""))
    path = Path(path)
    try:
        if path.is_dir():
            raise FileError(f"{what} {path} is a folder, not a file" + (f": {fix}" if fix else ""))
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise FileError(f"{what} {path} does not exist" + (f": {fix}" if fix else "")) from None
    except PermissionError:
        raise FileError(f"{what} {path} cannot be read (permission denied): give this user read access to it, "
                        "e.g. chmod u+r") from None
    except OSError as err:
        raise FileError(f"{what} {path} cannot be read ({err.strerror or err})") from None
    return path


def refuse_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *, option: str = "--out") -> None:
    """Raise if writing `out` would replace one of `inputs`: the same path, a hard link or a symlink to it."""
    out = Path(out)
    for source in inputs:
        if source is None:
            continue
        source = Path(source)
        if _same_file(out, source):
            raise FileError(f"{option} {out} is one of this command's inputs ({source}); writing there would "
                            "destroy it: choose another output path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def new_file_mode() -> int:
    """The permission bits a new regular file gets under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files an interrupted write of `path` left beside it; return what was removed."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for stray in path.parent.glob(f".{_glob_escape(path.name)}.*"):
            if stray.suffix in (SUFFIX, ".partial") and stray.is_file():
                stray.unlink(missing_ok=True)
                removed.append(stray)
            elif stray.suffix == SUFFIX and stray.is_dir() and not stray.is_symlink():  # of write_folder
                shutil.rmtree(stray, ignore_errors=True)
                removed.append(stray)
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _writable_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FileError(f"cannot create the output folder {folder} ({err.strerror or err}): choose another "
                        "output path") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileError(f"cannot write into {folder} (permission denied): choose another output path or make the "
                        "folder writable")


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_atomic(path: str | os.PathLike, data: bytes | str, *, inputs: Iterable = ()) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically, with the umask's mode, never over one of `inputs`."""
    path = Path(path)
    return _write_with(path, lambda out: out.write(data.encode("utf-8") if isinstance(data, str) else data), inputs)


def write_stream(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, inputs: Iterable = ()) -> Path:
    """Call `write(out)` on a binary file beside `path` and rename it over `path`: for files too big to hold as
    bytes (merged checkpoints, resume checkpoints, ``torch.save``). The same rules as `write_atomic`."""
    return _write_with(Path(path), write, inputs)


def write_folder(path: str | os.PathLike, fill: Callable[[Path], object], *, inputs: Iterable = ()) -> Path:
    """Call `fill(folder)` on a new folder beside `path` and rename it to `path` (which must not exist, or be an
    empty folder), so a killed run never leaves half a folder under the name; `remove_stale_partials` clears the
    stray folder it leaves instead. The folder gets the umask's mode."""
    path = Path(path)
    refuse_inputs(path, inputs)
    _writable_folder(path.parent)
    remove_stale_partials(path)
    if path.is_dir() and any(path.iterdir()) or path.exists() and not path.is_dir():
        raise FileError(f"{path} already exists and is not an empty folder: choose a new folder")
    try:
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=SUFFIX))
    except OSError as err:
        raise FileError(f"cannot write {path} ({err.strerror or err})") from None
    try:
        fill(staging)
        os.chmod(staging, 0o777 & ~_umask())
        if path.is_dir():
            path.rmdir()  # the empty folder the user made for it
        os.rename(staging, path)
    except OSError as err:
        raise _write_error(path, err) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _write_error(path: Path, err: OSError) -> FileError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return FileError(f"no space left to write {path}: free some space or choose another output path")
    return FileError(f"cannot write {path} ({err.strerror or err})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_with(path: Path, write, inputs: Iterable, *, to_path: bool = False) -> Path:
    """`write(out)` into a temporary file beside `path`, renamed over it; with `to_path`, `write(name)` gets the
    temporary file's name instead (a writer that opens the file itself)."""
    refuse_inputs(path, inputs)
    _writable_folder(path.parent)
    remove_stale_partials(path)
    try:
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=SUFFIX)
    except OSError as err:
        raise FileError(f"cannot write {path} ({err.strerror or err})") from None
    try:
        if to_path:
            os.close(fd)
            write(partial)
        else:
            with os.fdopen(fd, "wb") as out:
                write(out)
        os.chmod(partial, new_file_mode())
        os.replace(partial, path)
    except OSError as err:
        raise _write_error(path, err) from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return path


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      *, inputs: Iterable = ()) -> Path:
    """Save `tensors` with `metadata` and its content hash, atomically, with the umask's mode."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    metadata = {k: v for k, v in metadata.items() if k != HASH_KEY}
    metadata[WRITER_KEY] = _writer()
    metadata[HASH_KEY] = content_hash(tensors, metadata)

    def write(name: str) -> None:
        # safetensors writes the file itself: no second copy of the tensors as bytes in memory.
        try:
            save_file(tensors, name, metadata=metadata)
        except SafetensorError as err:  # its I/O errors (a full disk) come as this type
            raise OSError(str(err)) from None

    return _write_with(Path(path), write, inputs, to_path=True)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _writer() -> str:
    from . import __version__  # here: erasers/__init__ is still being imported when this module is

    return f"erasekit {__version__}"


def read_safetensors(path: str | os.PathLike, what: str = "file",
                     fix: str | None = None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, on the CPU; a FileError naming the file when it is missing,
    unreadable, truncated or malformed, or when its EraseKit content hash no longer matches."""
    from safetensors import SafetensorError, safe_open

    path = readable_file(path, what, fix)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            # safetensors maps the file: without a copy, rewriting it in place would change these tensors.
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as err:
        raise FileError(f"{path}: not a readable .safetensors file ({str(err)[:200]}); it may be truncated or "
                        "corrupt: copy, download or write it again") from None
    verify_hash(path, metadata, tensors)
    return metadata, tensors


def verify_hash(path, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise if `metadata` carries an EraseKit content hash that `tensors` and `metadata` no longer match."""
    stored = metadata.get(HASH_KEY)
    if stored is None:
        marker = _hashed_marker(metadata)
        if marker:
            raise FileError(file=path, key=HASH_KEY, expected=f"the content hash EraseKit writes beside {marker}",
                            found="none: written by EraseKit but its content hash is missing, so it may have been "
                            "changed", fix="write or copy it again from its source")
        return
    if content_hash(tensors, metadata) != stored:
        raise FileError(file=path, key=HASH_KEY, expected="the content hash EraseKit wrote",
                        found="a different content: the file was changed or damaged after it was written",
                        fix="write or copy it again from its source")


def _hashed_marker(metadata: Mapping[str, str]) -> str | None:
    """The metadata that says a file was written with a content hash: the writer's key, or an erasure format ≥ 2."""
    if WRITER_KEY in metadata:
        return repr(WRITER_KEY)
    version = str(metadata.get(FORMAT_KEY, "")).strip()
    if version.isdigit() and int(version) >= HASHED_FORMAT:
        return f"{FORMAT_KEY!r} = {version}"
    return None


def content_hash(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 over the tensors (name, dtype, shape, bytes) and the metadata other than the hash, in sorted order."""
    digest = hashlib.sha256()
    others = {k: v for k, v in metadata.items() if k != HASH_KEY}
    digest.update(json.dumps(others, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"\0{key}\0{str(tensor.dtype)}\0{list(tensor.shape)}\0".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
