"""Atomic file replacement: a reader (or a crash) sees the old file or the new one, never
a torn one. Used by checkpoint files and by the out-of-core store's commit pointer."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from typing import IO

#: Temporary files are named ``.{name}.<random>.tmp`` beside their target.
TMP_SUFFIX = ".tmp"


def replace_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)``: into a temporary file beside it, flushed and
    fsynced, then renamed over ``path``, then the directory fsynced (so the rename is
    durable too). An existing file's permissions are kept.
    """
    target = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX; mkstemp made it 0o600
                os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file, or a directory (making its entries durable: a rename, a new file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """`fsync_path` for a directory; a no-op off POSIX, where directories cannot be opened."""
    if os.name == "posix":
        fsync_path(directory)


def is_temporary(name: str, target: str) -> bool:
    """Whether ``name`` is a temporary file that `replace_atomically` left for ``target``
    (the process writing it was killed before the rename)."""
    return name.startswith(f".{target}.") and name.endswith(TMP_SUFFIX)
