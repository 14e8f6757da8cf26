"""File helpers of the weights layer and the tools: the strict on/off switch, bounded reads, atomic writes (a
``fcntl.flock`` held by a writer marks its temporary file as live for ``remove_stale_temporaries``)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from pathlib import Path

if sys.platform != "win32":
    import fcntl

TEMPORARY_SUFFIX = ".tmp"
MAX_WEIGHTS_BYTES = 2**32  # the largest weights file read or downloaded when no size is pinned
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """Environment switch ``name``: on for ``1 true yes on``, off for ``0 false no off`` or unset (any case);
    anything else is a ``ValueError`` naming the variable and the valid values (a switch never fails open)."""
    value = os.environ.get(name, "").strip().lower()
    if value not in (*_TRUE, *_FALSE):
        raise ValueError(
            f"{name}={os.environ[name]!r} is not an on/off value: use one of {', '.join(_TRUE)} to turn it on, "
            f"{', '.join(v for v in _FALSE if v)} (or unset) to turn it off"
        )
    return value in _TRUE


def read_regular_file(path: str | os.PathLike, limit: int, error: type[Exception]) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes, else ``error`` saying what it is. Checked
    on the descriptor opened without blocking: a FIFO never stalls, a huge (even sparse) file is refused by its
    size before it is read, and the file checked is the file read."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
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
        data = file.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise error(f"{path} changed size while it was read")
    return data


def lock_file(handle: int, *, blocking: bool = True) -> None:
    """Exclusive ``fcntl.flock`` on descriptor ``handle`` until it is closed (``BlockingIOError`` if taken and not
    ``blocking``)."""
    if sys.platform != "win32":
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a locked temporary file beside ``path``, then rename it over ``path``; an ``OSError``
    names ``path`` (e.g. ENOSPC "cannot write <path>")."""
    temporary = ""
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
        lock_file(handle)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.replace(temporary, path)  # still locked: no cleaner takes it for a leftover
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)  # "" when mkstemp failed: nothing to remove
        if isinstance(error, OSError):
            raise type(error)(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        raise


def remove_stale_temporaries(directory: Path, prefix: str = ".", suffix: str = TEMPORARY_SUFFIX) -> list[Path]:
    """Delete the files ``prefix*suffix`` in ``directory`` that no living process holds locked (a killed
    :func:`write_atomically`'s); returns them."""
    removed: list[Path] = []
    for path in directory.glob(f"{prefix}*{suffix}") if directory.is_dir() else ():
        if path.is_symlink() or not path.is_file():
            continue
        try:
            handle = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            lock_file(handle, blocking=False)
            path.unlink()
            removed.append(path)
        except OSError as error:  # held by a living writer, or gone
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.ENOENT):
                raise
        finally:
            os.close(handle)
    return removed
