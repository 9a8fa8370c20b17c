"""One writer at a time: an exclusive ``flock`` on the store's lock file.

Every operation that changes a store (`OutOfCore.create`, `OutOfCore.step`, the
clean-up of a re-run step) holds the lock from before it reads the pointer until after
it has committed and deleted the old version. A second writer (another process, or
another thread of the same one: ``flock`` locks belong to an open file, not to a
process) is refused at once with a `StoreError`; it never waits, and never writes.

The kernel drops the lock when the file is closed, which happens when its process ends
however it ends (SIGKILL, power loss aside): a killed writer never wedges the store, and
there is nothing to clean up. The lock file itself stays; it holds the last writer's
process id, for the error message only. A process forked (not spawned) while a step
runs shares the open file, and so the lock, until it exits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ._outofcore_layout import LOCK, StoreError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """Hold the store's writer lock for the ``with`` block, or raise `StoreError` now.

    Raises:
        StoreError: another writer holds the lock (its process id in the message).
    """
    path = directory / LOCK
    # The lock file is created with the process umask, like Zarr's files.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"{directory} is being written by another writer ({_holder(fd)}): an "
                    "out-of-core store takes one writer at a time, so nothing was changed; "
                    "wait for it to finish or stop it (a killed writer releases the lock)"
                ) from None
            pid = f"{os.getpid()}\n".encode()
            if os.pread(fd, 64, 0) != pid:  # unchanged (mtime too) when this process wrote it
                os.ftruncate(fd, 0)
                os.pwrite(fd, pid, 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    if not pid.isdigit():
        return "process id unknown"
    return f"process {pid}" + (", this process" if int(pid) == os.getpid() else "")
