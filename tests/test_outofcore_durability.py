"""The order of durable operations of each out-of-core commit (issue 10).

A SIGKILL cannot see a missing ``fsync`` (the page cache survives a killed process, not a
power loss), so these tests record the real ``os.fsync`` and ``os.replace`` calls of a
create and of a step, and check the protocol of ``docs/out-of-core.md``:

1. every file (chunk data and array metadata) and every directory of the new version
   ``v{k+1}`` is fsynced, and so is the store directory (which holds the entry
   ``v{k+1}``) — all before the pointer is replaced;
2. the temporary pointer file is fsynced, then ``os.replace``-d onto ``xpoptim.json``
   (once);
3. the store directory is fsynced after that rename.

Removing any one of these fsyncs (or doing it after the rename) fails a test here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
zarr = pytest.importorskip("zarr", reason="the out-of-core optimizer needs zarr (.[dask])")

import xpoptim  # noqa: E402
from test_outofcore import CHUNKS, problem  # noqa: E402


class Recorder:
    """Records ``("fsync", path)`` and ``("replace", src, dst)`` in call order, then
    calls the real functions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, ...]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: Any) -> None:
            fd = fd if isinstance(fd, int) else fd.fileno()
            self.calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src: Any, dst: Any, **kwargs: Any) -> None:
            self.calls.append(("replace", os.fspath(src), os.fspath(dst)))
            real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index_of_fsync(self, path: Path, before: int | None = None, after: int = -1) -> int:
        """The index of an fsync of ``path`` in (after, before), or -1."""
        stop = len(self.calls) if before is None else before
        for i in range(after + 1, stop):
            if self.calls[i] == ("fsync", str(path)):
                return i
        return -1


def check_commit_order(calls: Recorder, directory: Path, version: str) -> None:
    pointer = str(directory / "xpoptim.json")
    commits = [i for i, c in enumerate(calls.calls) if c[0] == "replace" and c[2] == pointer]
    assert len(commits) == 1, calls.calls
    commit = commits[0]
    tmp = calls.calls[commit][1]
    assert Path(tmp).parent == directory
    assert tmp.endswith(".tmp")
    # 2. the temporary pointer's data is durable before the rename
    assert calls.index_of_fsync(Path(tmp), before=commit) >= 0, "pointer data not fsynced"
    # 1. every file and directory of the new version, and the store directory, before it
    new = directory / version
    paths = [new, *sorted(new.rglob("*"))]
    files = [p for p in paths if p.is_file()]
    assert any("/c/" in str(p) for p in files)  # chunk data is among them
    assert any(p.name == "zarr.json" for p in files)  # and array metadata
    missing = [str(p) for p in paths if calls.index_of_fsync(p, before=commit) < 0]
    assert not missing, f"not fsynced before the commit: {missing[:5]} ({len(missing)})"
    assert calls.index_of_fsync(directory, before=commit) >= 0, "the entry of the version"
    # 3. the rename itself is durable: the directory fsynced after it
    assert calls.index_of_fsync(directory, after=commit) > commit, "rename not made durable"


def test_create_flushes_everything_then_commits_then_flushes_the_directory(tmp_path, monkeypatch):
    params, _ = problem(np.float32, 0)
    calls = Recorder(monkeypatch)
    xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.Adam(), params, chunks=CHUNKS)
    check_commit_order(calls, tmp_path / "s", "v0")
    # The root group's metadata too (the store's description).
    target = str(tmp_path / "s" / "xpoptim.json")
    pointer = next(i for i, c in enumerate(calls.calls) if c[0] == "replace" and c[2] == target)
    assert calls.index_of_fsync(tmp_path / "s" / "zarr.json", before=pointer) >= 0


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_each_step_flushes_the_new_version_then_commits_then_flushes_the_directory(
    tmp_path, monkeypatch, kind
):
    params, grads = problem(np.float32, 2)
    store = xpoptim.OutOfCore.create(
        tmp_path / "s", getattr(xpoptim, kind)(), params, chunks=CHUNKS
    )
    for t, g in enumerate(grads, start=1):
        with monkeypatch.context() as m:
            calls = Recorder(m)
            store.step(g, step=t)
        check_commit_order(calls, tmp_path / "s", f"v{t}")


def test_the_recorder_sees_a_missing_fsync(tmp_path, monkeypatch):
    """The check fails when one fsync is left out (here: the store directory's after
    the rename), so the tests above can fail."""
    params, grads = problem(np.float32, 1)
    store = xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.Adam(), params, chunks=CHUNKS)
    calls = Recorder(monkeypatch)
    store.step(grads[0])
    directory = str(tmp_path / "s")
    last = max(i for i, c in enumerate(calls.calls) if c == ("fsync", directory))
    del calls.calls[last]
    with pytest.raises(AssertionError, match="rename not made durable"):
        check_commit_order(calls, tmp_path / "s", "v1")
