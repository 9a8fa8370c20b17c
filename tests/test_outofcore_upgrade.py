"""Stores of format version 1 (no chunk checksums): refused by `open`, copied into a new
checksummed store by `OutOfCore.upgrade` (issue 10).

The version 1 stores here are made as that version wrote them: every array without a
checksum codec, every chunk written except the zero state of step 0 (left as Zarr's fill
value), and format version 1 in the description and the pointer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
zarr = pytest.importorskip("zarr", reason="the out-of-core optimizer needs zarr (.[dask])")

import xpoptim  # noqa: E402
from test_outofcore import CHUNKS, assert_store_equals, in_memory, problem  # noqa: E402
from test_outofcore_errors import everything  # noqa: E402
from xpoptim._outofcore.chunks import CorruptChunkError  # noqa: E402


def version_1_store(directory: Path, optimizer: xpoptim.Optimizer, params, grads) -> Path:
    """A store of format version 1 after ``len(grads)`` steps."""
    store = xpoptim.OutOfCore.create(directory, optimizer, params, chunks=CHUNKS)
    for g in grads:
        store.step(g)
    k = store.step_count
    values = store.read()
    local = zarr.storage.LocalStore(directory)
    for key in ["params", *optimizer._buffer_fields()]:
        for name, value in (values[0] if key == "params" else getattr(values[1], key)).items():
            path = f"v{k}/{key}/{name}"
            shutil.rmtree(directory / path)
            array = zarr.create_array(
                local,
                name=path,
                shape=value.shape,
                chunks=CHUNKS[name],
                dtype=value.dtype,
                fill_value=0,
                compressors=None,
                config={"write_empty_chunks": True},
            )
            if key == "params" or k > 0:  # version 1 left the zero state unwritten
                array[...] = value
    for name in ("zarr.json", "xpoptim.json"):
        meta = json.loads((directory / name).read_text())
        target = meta["attributes"]["xpoptim"] if name == "zarr.json" else meta
        target["format_version"] = 1
        (directory / name).write_text(json.dumps(meta))
    (directory / "xpoptim.lock").unlink()  # version 1 had no lock file
    return directory


@pytest.mark.parametrize("steps", [0, 2])
def test_a_version_1_store_is_refused_by_open_and_upgraded_into_a_new_store(tmp_path, steps):
    params, grads = problem(np.float32, steps + 1)
    optimizer = xpoptim.Adam(learning_rate=0.02)
    old = version_1_store(tmp_path / "old", optimizer, params, grads[:steps])
    before = everything(old)
    with pytest.raises(
        xpoptim.StoreError,
        match=r"format version 1; this xpoptim reads version 2 \(version 1 stores have no "
        r"chunk checksums.*xpoptim.OutOfCore.upgrade\(old_directory, new_directory\)",
    ):
        xpoptim.OutOfCore.open(old)
    new = xpoptim.OutOfCore.upgrade(old, tmp_path / "new")
    assert everything(old) == before  # only read
    assert new.step_count == steps
    assert new.optimizer.get_config() == optimizer.get_config()
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    want = [(params, {"momentums": zeros, "velocities": zeros})]
    want += in_memory(optimizer, params, grads)
    assert_store_equals(new, *want[steps])
    # The new store is checksummed and steps on bit-exactly.
    array = zarr.open_array(tmp_path / "new", path=f"v{steps}/momentums/bn.gamma", mode="r")
    assert array.compressors == (zarr.codecs.Crc32cCodec(),)
    new.step(grads[steps], step=steps + 1)
    assert_store_equals(new, *want[steps + 1])


def test_upgrade_refuses_a_version_1_store_with_a_missing_chunk(tmp_path):
    params, grads = problem(np.float32, 1)
    old = version_1_store(tmp_path / "old", xpoptim.Adam(), params, grads)
    chunk = old / "v1" / "velocities" / "dense.weights" / "c" / "2" / "0"
    chunk.unlink()
    before = everything(old)
    with pytest.raises(CorruptChunkError, match=r"dense.weights/c/2/0 is missing"):
        xpoptim.OutOfCore.upgrade(old, tmp_path / "new")
    assert everything(old) == before
    assert not (tmp_path / "new").exists()


def test_upgrade_refuses_itself_as_destination_and_copies_a_current_store(tmp_path):
    params, grads = problem(np.float32, 1)
    store = xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.SGD(), params, chunks=CHUNKS)
    with pytest.raises(ValueError, match=r"destination must not be source"):
        xpoptim.OutOfCore.upgrade(store.directory, store.directory)
    store.step(grads[0])
    # A format 2 store copies too (this is how a directory store moves to Icechunk).
    copy = xpoptim.OutOfCore.upgrade(store.directory, tmp_path / "new")
    assert copy.step_count == 1
    (p1, s1), (p2, s2) = store.read(), copy.read()
    for n in p1:
        np.testing.assert_array_equal(p1[n], p2[n])
        for field in store.optimizer._buffer_fields():
            np.testing.assert_array_equal(getattr(s1, field)[n], getattr(s2, field)[n])
