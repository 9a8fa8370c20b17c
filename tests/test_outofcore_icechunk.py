"""The Icechunk engine on local disk: results, history, expiry, corruption, bad input.

Results are compared bit for bit with the in-memory optimizer run on NumPy copies
(`test_outofcore.in_memory`), an independent computation of the same rules; the storage
bound is checked against the arrays' own byte count. Object storage (the S3 server) is in
``test_outofcore_s3.py``, kills in ``test_outofcore_kills.py``, clusters in
``test_outofcore_cluster.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
pytest.importorskip("zarr", reason="the out-of-core optimizer needs zarr (.[dask])")
pytest.importorskip("icechunk", reason="the Icechunk engine needs icechunk (.[icechunk])")

import xpoptim
from test_outofcore import (
    CASES,
    CHUNKS,
    assert_store_equals,
    in_memory,
    problem,
    snapshot,
)
from xpoptim._outofcore.chunks import CorruptChunkError


def create(path: Path, optimizer: xpoptim.Optimizer, params: dict, **kw) -> xpoptim.OutOfCore:
    return xpoptim.OutOfCore.create(
        path, optimizer, params, chunks=CHUNKS, engine="icechunk", num_workers=2, **kw
    )


def used_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def data_bytes(params: dict, buffers: int) -> int:
    return sum(v.nbytes for v in params.values()) * (1 + buffers)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]['regularization']}")
def test_equals_in_memory_optimizer_bit_exactly(tmp_path, case, dtype):
    kind, config = case
    params, grads = problem(dtype, 3)
    optimizer = getattr(xpoptim, kind)(**config)
    store = create(tmp_path / "s", optimizer, params)
    assert (store.engine, store.step_count) == ("icechunk", 0)
    want = in_memory(optimizer, params, grads)
    for t, g in enumerate(grads, start=1):
        summary = store.step(g, step=t)
        assert (summary.step, summary.skipped) == (t, False)
        assert_store_equals(store, *want[t - 1])
    reopened = xpoptim.OutOfCore.open(tmp_path / "s")  # the engine is detected
    assert type(reopened) is type(store)
    assert reopened.step_count == 3
    assert_store_equals(reopened, *want[-1])
    assert reopened.step(grads[-1], step=3).skipped  # idempotent re-run


def test_history_tags_open_at_a_step_and_rollback(tmp_path):
    params, grads = problem(np.float32, 6)
    optimizer = xpoptim.Adam(0.02)
    want = in_memory(optimizer, params, grads)
    store = create(tmp_path / "s", optimizer, params, keep_steps=2)
    for t in (1, 2, 3):
        store.step(grads[t - 1], step=t)
    assert [c.step for c in store.history()] == [3, 2]  # keep_steps=2
    assert store.tag("after-2", step=2).tags == ("after-2",)
    with pytest.raises(xpoptim.StoreError, match="already has a tag 'after-2'"):
        store.tag("after-2")
    for t in (4, 5):
        store.step(grads[t - 1], step=t)
    history = store.history()
    assert [(c.step, c.tags) for c in history] == [(5, ()), (4, ()), (2, ("after-2",))]
    with pytest.raises(xpoptim.StoreError, match=r"does not hold step 1 any more .*\[2, 4, 5\]"):
        xpoptim.OutOfCore.open(tmp_path / "s", step=1)

    old = xpoptim.OutOfCore.open(tmp_path / "s", tag="after-2")
    assert (old.step_count, old.read_only) == (2, True)
    assert_store_equals(old, *want[1])
    assert_store_equals(xpoptim.OutOfCore.open(tmp_path / "s", step=4), *want[3])
    before = snapshot(tmp_path / "s")
    with pytest.raises(xpoptim.StoreError, match=r"read-only at step 2.*rollback"):
        old.step(grads[2], step=3)
    assert snapshot(tmp_path / "s") == before

    store.rollback(tag="after-2")
    assert store.step_count == 2
    for t in (3, 4, 5, 6):  # continuing from step 2 redoes the same steps, bit for bit
        store.step(grads[t - 1], step=t)
        assert_store_equals(store, *want[t - 1])


def test_storage_stays_at_about_two_versions(tmp_path):
    """keep_steps=1: after each step the previous step expires and its chunks are
    garbage-collected, so disk use is one committed version (plus metadata) between
    steps, whatever the number of steps."""
    shapes = {"w": (256, 128), "b": (128,)}
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    store = xpoptim.OutOfCore.create(
        tmp_path / "s",
        xpoptim.Adam(),
        params,
        chunks={"w": (64, 128), "b": (64,)},
        engine="icechunk",
    )
    version = data_bytes(params, 2)
    sizes = []
    for _ in range(10):
        store.step({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()})
        sizes.append(used_bytes(tmp_path / "s"))
    assert len(store.history()) == 1
    # One version's chunks plus the metadata of a few snapshots and manifests: never more
    # than about two versions, and no growth from step to step.
    assert max(sizes) < 2 * version, (sizes, version)
    assert sizes[-1] <= sizes[2] * 1.1, sizes


def test_a_corrupt_chunk_fails_the_step_and_nothing_is_committed(tmp_path):
    # Large enough chunks that Icechunk keeps them as objects (tiny ones are inlined
    # into the manifest).
    big = {"w": np.random.default_rng(2).normal(size=(512, 64)).astype(np.float32)}
    store = xpoptim.OutOfCore.create(
        tmp_path / "s", xpoptim.Adam(), big, chunks={"w": (128, 64)}, engine="icechunk"
    )
    store.step({"w": np.ones((512, 64), np.float32)})
    chunk_files = sorted((tmp_path / "s" / "chunks").iterdir())
    assert len(chunk_files) == 3 * 4  # params, m, v: 4 chunks each
    victim = chunk_files[5]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    before = snapshot(tmp_path / "s")
    with pytest.raises(CorruptChunkError, match="checksum"):
        store.step({"w": np.ones((512, 64), np.float32)})
    assert store.step_count == 1
    after = snapshot(tmp_path / "s")
    # Nothing committed: the refs and snapshots are those of step 1 (the failed step's
    # chunks may have been written, unreferenced; garbage collection removes them).
    assert {k: v for k, v in after.items() if k.startswith(("refs", "snapshots"))} == {
        k: v for k, v in before.items() if k.startswith(("refs", "snapshots"))
    }
    with pytest.raises(xpoptim.StoreError):
        store.read()

    victim.unlink()  # a chunk object gone: an error, never zeros
    with pytest.raises(xpoptim.StoreError):
        store.read()


def test_bad_input_changes_nothing(tmp_path):
    params, grads = problem(np.float32, 1)
    store = create(tmp_path / "s", xpoptim.Adam(), params)
    before = snapshot(tmp_path / "s")
    bad = dict(grads[0])
    bad["dense.bias"] = bad["dense.bias"][:3]
    with pytest.raises(ValueError, match=r"grads\['dense.bias'\] has shape"):
        store.step(bad)
    with pytest.raises(ValueError, match="missing"):
        store.step({"dense.bias": grads[0]["dense.bias"]})
    with pytest.raises(ValueError, match="the next step is 1"):
        store.step(grads[0], step=2)
    with pytest.raises(TypeError, match="step must be an int"):
        store.step(grads[0], step="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give exactly one of step or tag"):
        store.rollback()
    with pytest.raises(xpoptim.StoreError, match="no tag 'nope'"):
        store.rollback(tag="nope")
    with pytest.raises(ValueError, match="keep_steps must be a positive int"):
        create(tmp_path / "t", xpoptim.Adam(), params, keep_steps=0)
    with pytest.raises(ValueError, match="keep_steps applies to Icechunk stores"):
        xpoptim.OutOfCore.create(tmp_path / "u", xpoptim.Adam(), params, keep_steps=2)
    assert snapshot(tmp_path / "s") == before
    assert not (tmp_path / "t").exists()
    assert not (tmp_path / "u").exists()


def test_create_replaces_only_an_xpoptim_store(tmp_path):
    params, grads = problem(np.float32, 1)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(xpoptim.StoreError, match="not empty and not an Icechunk store"):
        create(folder, xpoptim.Adam(), params, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]

    store = create(tmp_path / "s", xpoptim.Adam(), params)
    store.step(grads[0])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        create(tmp_path / "s", xpoptim.SGD(), params)
    replaced = create(tmp_path / "s", xpoptim.SGD(0.5), params, overwrite=True)
    assert (replaced.step_count, type(replaced.optimizer).__name__) == (0, "SGD")
    assert_store_equals(replaced, params, {})


def test_a_second_local_writer_is_refused_at_once(tmp_path):
    """Icechunk's local storage is not safe for concurrent commits: the engine holds the
    directory engine's writer lock around each step (real processes: test_outofcore_kills)."""
    from xpoptim._outofcore.lock import writer_lock

    params, grads = problem(np.float32, 1)
    store = create(tmp_path / "s", xpoptim.Adam(), params)
    before = snapshot(tmp_path / "s")
    with (
        writer_lock(tmp_path / "s"),
        pytest.raises(xpoptim.ConcurrentWriterError, match="another writer"),
    ):
        store.step(grads[0])
    assert snapshot(tmp_path / "s") == before
    store.step(grads[0])
    assert store.step_count == 1


def test_upgrade_moves_a_directory_store_into_icechunk(tmp_path):
    params, grads = problem(np.float32, 4)
    optimizer = xpoptim.RMSprop(0.01, momentum=0.5)
    want = in_memory(optimizer, params, grads)
    old = xpoptim.OutOfCore.create(tmp_path / "old", optimizer, params, chunks=CHUNKS)
    old.step(grads[0])
    old.step(grads[1])
    new = xpoptim.OutOfCore.upgrade(tmp_path / "old", tmp_path / "new", engine="icechunk")
    assert (new.engine, new.step_count) == ("icechunk", 2)
    assert_store_equals(new, *want[1])
    new.step(grads[2], step=3)
    new.step(grads[3], step=4)
    assert_store_equals(new, *want[3])
    assert old.step_count == 2  # the source was only read


def test_directory_stores_say_how_to_get_history(tmp_path):
    params, _ = problem(np.float32, 0)
    store = xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.Adam(), params, chunks=CHUNKS)
    assert [c.step for c in store.history()] == [0]
    with pytest.raises(xpoptim.StoreError, match=r"engine='icechunk'.*OutOfCore\.upgrade"):
        store.tag("x")
    with pytest.raises(xpoptim.StoreError, match="engine='icechunk'"):
        store.rollback(step=0)
    with pytest.raises(xpoptim.StoreError, match="engine='icechunk'"):
        xpoptim.OutOfCore.open(tmp_path / "s", step=0)


def test_open_refuses_what_is_not_an_xpoptim_store(tmp_path):
    import icechunk
    import zarr

    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(tmp_path / "r")))
    session = repo.writable_session("main")
    zarr.group(store=session.store, attributes={"other": 1})
    session.commit("someone else's data")
    with pytest.raises(xpoptim.StoreError, match="Icechunk repository but not an xpoptim store"):
        xpoptim.OutOfCore.open(tmp_path / "r")
    with pytest.raises(FileNotFoundError):
        xpoptim.OutOfCore.open(tmp_path / "nothing", engine="icechunk")
    assert os.listdir(tmp_path) == ["r"]
