"""Atomic file writes: readers, resumed runs and interrupted commands never see half a file.

Temporary files and folders are created the way a plain `open(path, "w")` or `Path.mkdir()` creates them (mode `0o666`
or `0o777`, which the kernel narrows by the umask or a default ACL), under a random name with `O_EXCL`. The renamed
result therefore has the permissions a direct write would give it. `tempfile.mkstemp` / `mkdtemp` would make it
owner-only (`0o600` / `0o700`), and reading the umask to widen that afterwards can only be done by setting it
(`os.umask`), which races with files other threads create meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_MAX_NAME_TRIES = 100


def _create_fresh(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """`create(parent / <prefix><random><suffix>)` on a name nobody has taken (`create` must fail if it exists)."""
    for _ in range(_MAX_NAME_TRIES):
        candidate = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"No free temporary name {prefix}*{suffix} in {parent} after {_MAX_NAME_TRIES} tries.")


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # as open(path, "w") does, plus O_EXCL


def make_partial_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty folder `parent/<prefix><random>`, with the permissions `Path.mkdir` gives; `parent` is created."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return _create_fresh(Path(parent), prefix, "", Path.mkdir)


def make_partial_file(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty file `parent/<prefix><random>` (created exclusively, with the permissions `open(path, "w")`
    gives), to be written and renamed into place by the caller; `parent` is created."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return _create_fresh(Path(parent), prefix, "", _create_file)


@contextlib.contextmanager
def folders_removed_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """If the block fails, remove the folders of `path` (it and its parents) that did not exist when it began, where
    they are empty: a failed run leaves none of the folders it created, and nothing anyone put in them."""
    path = Path(path)
    created = [folder for folder in (path, *path.parents) if not folder.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):  # (rmdir removes only empty ones)
                folder.rmdir()
        raise


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temp_path)` on a temporary file next to `path`, then rename it to `path`.

    On any failure (an exception, Ctrl-C) the temporary file is removed and `path` is left as it was. The file ends up
    with the permissions `open(path, "w")` would give it (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = _create_fresh(path.parent, f".{path.name}.", ".tmp", _create_file)
    try:
        write(str(temp_path))
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return path


def replace_folder(
    finished: str | os.PathLike, target: str | os.PathLike, check_replaced: Callable[[Path], None] | None = None
) -> Path:
    """Move the complete folder `finished` to `target`, replacing what is there.

    An existing `target` is renamed aside first and deleted only after the swap, so `target` is at every moment either
    the old folder or the new one, never a mix. If the swap fails, the old folder is put back. If another process put a
    folder at `target` in the meantime (e.g. a concurrent writer of the same deterministic content), the rename fails,
    that folder stays, and the `OSError` is raised.

    `check_replaced`, if given, is called with what was at `target` once it is renamed aside (so whatever it checks
    cannot change before the swap); if it raises, that is put back and the error raised.
    """
    finished, target = Path(finished), Path(target)
    previous = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    _remove(previous)  # left by a killed swap (PIDs recur, e.g. in containers)
    moved_aside = target.exists() or target.is_symlink()
    if moved_aside:
        os.replace(target, previous)
    try:
        if moved_aside and check_replaced is not None:
            check_replaced(previous)
        os.replace(finished, target)
    except BaseException:
        if moved_aside and not target.exists():
            os.replace(previous, target)  # put the old folder back
        raise
    finally:
        if target.exists():  # the new folder (or a concurrent writer's) is in place: the old one can go
            _remove(previous)
    return target


def _remove(path: Path) -> None:
    """Delete `path` whatever it is (folder, file, or a link, not what it points to); nothing if it is not there."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# A partial folder or file is held with an advisory lock (flock) while its process works on it. A process that is
# killed outright (SIGKILL, the OOM killer) cannot clean up, but the kernel drops its lock: a later run can then tell
# that partial, abandoned, from one a concurrent run is still writing, and remove it. flock is coherent within one
# kernel only (NFS clients, for one, keep folder locks to themselves), so a partial's name carries a tag of the host
# that made it, and a run only ever removes its own host's.
try:
    import fcntl
except ImportError:  # (Windows: partials are not locked, and none are ever removed as abandoned)
    fcntl = None

_ABANDONED_AFTER_SECONDS = 60.0
"""A partial younger than this is never removed: its run may be between creating it and locking it."""
_HOST_TAG = hashlib.sha256(socket.gethostname().encode(errors="surrogateescape")).hexdigest()[:8]
_RANDOM_PART = re.compile(r"[0-9a-f]{12}")  # (secrets.token_hex(6), as _create_fresh names them)


def _host_prefix(prefix: str) -> str:
    return f"{prefix}{_HOST_TAG}-"


def make_held_partial_dir(parent: str | os.PathLike, prefix: str) -> tuple[Path, int | None]:
    """`make_partial_dir` under a name tagged with this host, held (`hold`) for this process: `(path, handle)`."""
    return _make_held(make_partial_dir, parent, prefix)


def make_held_partial_file(parent: str | os.PathLike, prefix: str) -> tuple[Path, int | None]:
    """`make_partial_file` under a name tagged with this host, held (`hold`) for this process: `(path, handle)`."""
    return _make_held(make_partial_file, parent, prefix)


def _make_held(make: Callable[[str | os.PathLike, str], Path], parent: str | os.PathLike,
               prefix: str) -> tuple[Path, int | None]:
    path = make(parent, _host_prefix(prefix))
    try:
        return path, hold(path)
    except BaseException:
        _remove(path)
        raise


def _open_to_lock(path: str | os.PathLike) -> int:
    # (a regular file is opened for writing: an exclusive flock over NFS needs it)
    return os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR)


def hold(path: str | os.PathLike) -> int | None:
    """Lock the partial folder or file `path` for this process; returns the handle for `let_go` (None where locks are
    not available: the partial then only looks abandoned to no one)."""
    if fcntl is None:
        return None
    handle = _open_to_lock(path)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # (a file system without locks)
        os.close(handle)
        return None
    return handle


def let_go(handle: int | None) -> None:
    """Release a `hold` (also after the partial was renamed into place or deleted)."""
    if handle is not None:
        os.close(handle)


def remove_abandoned(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Delete this host's partials `parent/<prefix><host tag>-<random>` (as `make_held_partial_*` name them) whose
    process is gone: older than a minute and locked by no one.

    Returns what was removed. Nothing else is touched, and nothing is removed where locks are not available or cannot
    be taken: a partial is only deleted when it is certain no process holds it.
    """
    if fcntl is None:
        return []
    host_prefix = _host_prefix(prefix)
    try:
        entries = list(Path(parent).iterdir())
    except OSError:  # (missing, or not listable)
        return []
    removed = []
    for candidate in entries:
        name = candidate.name
        if not (name.startswith(host_prefix) and _RANDOM_PART.fullmatch(name[len(host_prefix):])):
            continue
        if candidate.is_symlink():
            continue
        try:
            if time.time() - candidate.stat().st_mtime < _ABANDONED_AFTER_SECONDS:
                continue
            handle = _open_to_lock(candidate)
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(handle)
            continue  # held by a running process (or no locks here)
        try:
            if not os.path.lexists(candidate):  # renamed into place by its run in the meantime
                continue
            _remove(candidate)
        finally:
            os.close(handle)
        removed.append(candidate)
    return removed
