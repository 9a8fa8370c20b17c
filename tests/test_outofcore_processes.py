"""Out-of-core store with real processes: one writer at a time, a killed writer never
wedges the store, readers see only whole committed steps, a corrupt chunk stops a real
step process before it commits (issue 10).

The other processes are fresh Python interpreters (``subprocess``) stepping a real store
on disk; the test process is the second writer or the reader.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
zarr = pytest.importorskip("zarr", reason="the out-of-core optimizer needs zarr (.[dask])")

import xpoptim  # noqa: E402
from test_outofcore import (  # noqa: E402
    KILL_SEED,
    _kill_layout_params,
    assert_store_equals,
    in_memory,
    snapshot,
)
from xpoptim._outofcore.demo import synthetic_arrays  # noqa: E402

#: A writer process: steps the store at argv[1] to step argv[4]; at phase argv[3] of its
#: first step it writes its pid to SIGNALS/holding and waits for SIGNALS/release.
WRITER = r"""
import os, sys, time
from pathlib import Path
import xpoptim, xpoptim._outofcore.chunk_step as ooc
from xpoptim._outofcore.demo import synthetic_arrays
directory, signals, hold, until = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def hook(phase):
    if phase == hold and not (signals / "holding").exists():
        (signals / "holding.tmp").write_text(str(os.getpid()))
        (signals / "holding.tmp").rename(signals / "holding")
        while not (signals / "release").exists():
            time.sleep(0.01)
ooc._phase_hook = hook
store = xpoptim.OutOfCore.open(directory, num_workers=1)
for t in range(store.step_count + 1, until + 1):
    store.step(synthetic_arrays(store.layout, int(sys.argv[5]), t), step=t)
print("done", store.step_count)
"""


def start_writer(directory: Path, signals: Path, hold: str, until: int) -> subprocess.Popen:
    signals.mkdir(exist_ok=True)
    args = [str(directory), str(signals), hold, str(until), str(KILL_SEED)]
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, child: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.poll() is not None:
            raise AssertionError(f"the writer exited early: {child.communicate()}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the writer never reached its phase: {child.communicate()}")
        time.sleep(0.01)


@pytest.fixture
def kill_store(tmp_path: Path):
    """A store of the crash tests' layout at step 0, its history for 3 steps."""
    params, layout = _kill_layout_params()
    grads = [
        {k: v.compute() for k, v in synthetic_arrays(layout, KILL_SEED, t).items()}
        for t in (1, 2, 3)
    ]
    optimizer = xpoptim.Adam(learning_rate=0.01)
    chunks = {k: tuple(m["chunks"]) for k, m in layout.items()}
    store = xpoptim.OutOfCore.create(tmp_path / "store", optimizer, params, chunks=chunks)
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    history = [(params, {"momentums": zeros, "velocities": zeros})]
    history += in_memory(optimizer, params, grads)
    return store, grads, history


@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_step_runs(kill_store, tmp_path):
    store, grads, history = kill_store
    signals = tmp_path / "signals"
    writer = start_writer(store.directory, signals, "stored", until=1)
    try:
        wait_for(signals / "holding", writer)  # step 1 computed, not committed: mid-step
        pid = (signals / "holding").read_text()
        before = snapshot(store.directory)
        message = rf"being written by another writer \(process {pid}\).*nothing was changed"
        with pytest.raises(xpoptim.StoreError, match=message):
            store.step(grads[0], step=1)
        with pytest.raises(xpoptim.StoreError, match=message):
            xpoptim.OutOfCore.create(store.directory, xpoptim.SGD(), history[0][0], overwrite=True)
        assert snapshot(store.directory) == before
        # A reader meanwhile sees the committed step 0, whole.
        assert xpoptim.OutOfCore.open(store.directory).step_count == 0
        assert_store_equals(store, *history[0])
    finally:
        (signals / "release").write_text("")
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert out.split() == ["done", "1"]
    assert_store_equals(store, *history[1])  # the writer's step, applied once
    store.step(grads[1], step=2)  # and the lock is free again
    assert_store_equals(store, *history[2])


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["locked", "created", "stored", "flushed", "committed"])
def test_a_sigkilled_writer_never_wedges_the_store(kill_store, tmp_path, phase):
    store, grads, history = kill_store
    signals = tmp_path / "signals"
    writer = start_writer(store.directory, signals, phase, until=1)
    wait_for(signals / "holding", writer)
    with pytest.raises(xpoptim.StoreError, match=r"another writer"):
        store.step(grads[0], step=1)
    os.kill(writer.pid, signal.SIGKILL)
    writer.communicate(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    committed = 1 if phase == "committed" else 0
    assert store.step_count == committed
    assert_store_equals(store, *history[committed])
    # The lock died with its process: a new writer goes on at once.
    for t in range(committed + 1, 3):
        assert not store.step(grads[t - 1], step=t).skipped
    assert_store_equals(store, *history[2])


@pytest.mark.slow
def test_readers_see_only_whole_committed_steps(kill_store, tmp_path):
    store, _, history = kill_store
    writer = start_writer(store.directory, tmp_path / "signals", "never", until=3)
    reads = []
    try:
        while writer.poll() is None:
            params, state = store.read()
            k = state.step
            reads.append(k)
            want_params, want_buffers = history[k]
            for name, want in want_params.items():
                assert np.array_equal(params[name], want), (k, name)
            for field, values in want_buffers.items():
                for name, want in values.items():
                    assert np.array_equal(getattr(state, field)[name], want), (k, field, name)
    finally:
        _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert reads == sorted(reads)
    assert len(reads) >= 3, reads
    assert_store_equals(store, *history[3])


@pytest.mark.slow
def test_a_step_process_stops_at_a_corrupt_chunk_and_commits_nothing(kill_store, tmp_path):
    store, grads, history = kill_store
    store.step(grads[0], step=1)
    chunk = store.directory / "v1" / "velocities" / "a.weights" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))
    before = snapshot(store.directory)
    writer = start_writer(store.directory, tmp_path / "signals", "never", until=2)
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 1
    assert "CorruptChunkError" in err
    assert f"the chunk file {chunk} fails its CRC-32C checksum" in err
    assert snapshot(store.directory) == before
    assert store.step_count == 1
    # Restored from a backup (here: the right bytes), the step goes on.
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))
    store.step(grads[1], step=2)
    assert_store_equals(store, *history[2])
