"""Atomic file replacement: a reader (or a crash) sees the old file or the new one, never
a torn one. Used by checkpoint files and by the out-of-core store's commit pointer."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from typing import IO

#: Temporary files are named ``.{name}.<random>.tmp`` beside their target.
TMP_SUFFIX = ".tmp"


def replace_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)``: into a temporary file beside it, flushed and
    fsynced, then renamed over ``path``, then the directory fsynced (so the rename is
    durable too). An existing file's permissions are kept; a new file gets the mode the
    process's umask gives (``0o666 & ~umask``), like any file ``open`` creates.
    """
    target = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(target)
    try:
        mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    fd, tmp = _create_temporary(directory, base)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None and hasattr(os, "fchmod"):  # POSIX
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


def _create_temporary(directory: str, base: str) -> tuple[int, str]:
    """A new, empty ``.{base}.<random>.tmp`` in ``directory``, open for writing.

    Created with mode ``0o666`` so that the kernel applies the umask (and a default ACL),
    where ``tempfile.mkstemp`` would make it ``0o600``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {base!r} in {directory}")


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
