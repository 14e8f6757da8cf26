"""File helpers shared by the weights layer and the tools: bounded reads, atomic writes, advisory locks, sha256,
and the one parser of on/off environment switches.

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
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

if sys.platform != "win32":
    import fcntl

TEMPORARY_SUFFIX = ".tmp"
MAX_WEIGHTS_BYTES = 2**32  # the largest weights file read or downloaded when no size is pinned (1G float32 values)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """The on/off switch in environment variable ``name``: ``1 true yes on`` (any case) or ``0 false no off`` and
    unset/empty; anything else raises ``ValueError`` naming the variable and the valid values, so that a switch
    never turns on by a spelling it does not know."""
    value = os.environ.get(name, "").strip().lower()
    if value not in (*_TRUE, *_FALSE):
        raise ValueError(
            f"{name}={os.environ[name]!r} is not an on/off value: use one of {', '.join(_TRUE)} to turn it on, "
            f"{', '.join(v for v in _FALSE if v)} (or unset) to turn it off"
        )
    return value in _TRUE


def read_regular_file(path: str | os.PathLike, limit: int, error: type[Exception]) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes, else ``error`` saying what
    it is. Opened without blocking and checked on the open descriptor before anything is read: a FIFO never
    stalls, a folder or device is named as such, a huge (even sparse) file is refused by its size, and a file
    swapped after a check cannot be the one read."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:  # as it is: gone (a reader may look again)
        raise
    except OSError as cause:
        raise error(f"cannot open {path}: {cause.strerror or cause}") from cause
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(handle)
        if stat.S_ISREG(info.st_mode):
            raise error(f"{path} is {info.st_size:,} bytes, more than the {limit:,} bytes such a file may hold")
        kind = "folder" if stat.S_ISDIR(info.st_mode) else "FIFO" if stat.S_ISFIFO(info.st_mode) else "special file"
        raise error(f"{path} is a {kind}, not a regular file")
    with os.fdopen(handle, "rb") as file:
        data = file.read(info.st_size)
        if len(data) != info.st_size or file.read(1):
            raise error(f"{path} changed size while it was read")
    return data


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
