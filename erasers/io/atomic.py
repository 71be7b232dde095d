"""Writing a file so that readers and interrupted runs never see half of it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

SUFFIX = ".tmp"  # of the temporary file beside the target, named ".<target name>.<random>.tmp"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to a temporary file beside `path`, then rename it over `path`: a kill leaves at
    most a stray ".<name>.*.tmp" file, never a partial `path`."""
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=SUFFIX)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
