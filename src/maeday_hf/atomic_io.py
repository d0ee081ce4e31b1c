"""Atomic file writes: readers, resumed runs and interrupted commands never see half a file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temp_path)` on a temporary file next to `path`, then rename it to `path`.

    On any failure (an exception, Ctrl-C) the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def replace_folder(finished: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the complete folder `finished` to `target`, replacing what is there.

    An existing `target` is renamed aside first and deleted only after the swap, so `target` is at every moment either
    the old folder or the new one, never a mix. If another process put a folder at `target` in the meantime (e.g. a
    concurrent writer of the same deterministic content), the rename fails and that `OSError` is raised.
    """
    finished, target = Path(finished), Path(target)
    previous = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    try:
        if target.exists():
            os.replace(target, previous)
        os.replace(finished, target)
    finally:
        shutil.rmtree(previous, ignore_errors=True)
    return target
