"""One writer at a time: an exclusive ``flock`` on the store's lock file.

Every operation that changes a store (`OutOfCore.create`, `OutOfCore.step`, the
clean-up of a re-run step) holds the lock from before it reads the pointer until after
it has committed and deleted the old version. A second writer (another process, or
another thread of the same one: ``flock`` locks belong to an open file, not to a
process) is refused at once with a `StoreError`; it never waits, and never writes.

The kernel drops the lock when the file is closed, which happens when its process ends
however it ends (SIGKILL, power loss aside): a killed writer never wedges the store, and
there is nothing to clean up. The lock file itself stays, empty, and is never written:
the holder's process id in the error message comes from ``/proc/locks`` (Linux). A
process forked (not spawned) while a step runs shares the open file, and so the lock,
until it exits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import ConcurrentWriterError
from .layout import LOCK

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
                raise ConcurrentWriterError(
                    f"{directory} is being written by another writer ({_holder(fd)}): an "
                    "out-of-core store takes one writer at a time, so nothing was changed; "
                    "wait for it to finish or stop it (a killed writer releases the lock)"
                ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """Who holds the flock on ``fd``'s file, from ``/proc/locks`` (Linux only)."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields and key in fields:
            pid = fields[fields.index(key) - 1]
            if pid.isdigit():
                return f"process {pid}" + (", this process" if int(pid) == os.getpid() else "")
    return "process id unknown"
