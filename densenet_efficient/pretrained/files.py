"""File helpers shared by the weights layer and the tools: atomic writes, advisory locks and sha256.

Temporary files are locked (``fcntl.flock``) by the process that writes them for as long as it writes, and the
operating system drops that lock when the process dies: :func:`remove_stale_temporaries` deletes only those no
living process holds, so a killed write's leftovers go and a concurrent writer's file stays. Windows has no
``fcntl``: there :func:`lock_file` does nothing (writes stay atomic, but are not serialised, and a file another
process holds open cannot be deleted anyway).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

if sys.platform != "win32":
    import fcntl

TEMPORARY_SUFFIX = ".tmp"


def lock_file(handle: int, *, blocking: bool = True) -> None:
    """Take an exclusive advisory lock (``fcntl.flock``) on open descriptor ``handle``, held until it is closed
    (or the process dies). Without ``blocking``, ``BlockingIOError`` says at once that another process holds it.
    Nothing on Windows."""
    if sys.platform != "win32":
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` (locked while it is written), then rename it over
    ``path``. An error names ``path`` (e.g. a full disk: ``OSError`` ENOSPC "cannot write <path>")."""
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    except OSError as error:
        raise _naming(error, path) from error
    try:
        lock_file(handle)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.replace(temporary, path)  # before the file (and its lock) is closed: no cleaner takes it for stale
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError) and not error.filename:
            raise _naming(error, path) from error
        raise


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` as an ``OSError`` of the same type that names the file it could not write."""
    return type(error)(error.errno, f"cannot write {path}: {error.strerror or error}")


def remove_stale_temporaries(directory: Path, prefix: str = ".", suffix: str = TEMPORARY_SUFFIX) -> list[Path]:
    """Delete the files ``prefix*suffix`` in ``directory`` that no living process holds locked (leftovers of a
    killed :func:`write_atomically` or download); returns them. Other names and other processes' files in
    progress are left alone."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        if not (path.name.startswith(prefix) and path.name.endswith(suffix)) or path.is_symlink():
            continue
        try:
            handle = os.open(path, os.O_RDONLY)
        except OSError:  # gone already, or a folder
            continue
        try:
            lock_file(handle, blocking=False)
            if path.is_file():
                path.unlink()
                removed.append(path)
        except OSError as error:  # held by a living writer (on Windows: open, not deletable), or gone
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.ENOENT):
                raise
        finally:
            os.close(handle)
    return removed


@contextlib.contextmanager
def locked(path: Path, *, blocking: bool = True) -> Iterator[int]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``path`` (a folder, or a file created if needed) for
    the block; yields the open descriptor. The operating system releases it if the process dies. Without
    ``blocking``, ``BlockingIOError`` says at once that another process holds it."""
    handle = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        lock_file(handle, blocking=blocking)
        yield handle
    finally:
        os.close(handle)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
