"""Out-of-core store: nothing lost, corruption detected, clear errors (issue 10).

Every refusal here is checked for its error type and message, and for leaving every file
(and directory) byte-identical, modification times included. The stores are real Zarr
stores on disk; the corruptions are real edits of their files.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
zarr = pytest.importorskip("zarr", reason="the out-of-core optimizer needs zarr (.[dask])")

import xpoptim  # noqa: E402
from test_outofcore import (  # noqa: E402
    CHUNKS,
    SHAPES,
    assert_store_equals,
    in_memory,
    problem,
    snapshot,
)
from xpoptim._outofcore.chunks import CorruptChunkError  # noqa: E402


def everything(directory: Path) -> dict[str, Any]:
    """Every file and directory under ``directory``: kind, content hash, mode, mtime."""
    out: dict[str, Any] = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(directory))] = (digest, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def stepped(tmp_path: Path):
    """A store after one Adam step, the parameters, the gradients (2 steps)."""
    params, grads = problem(np.float32, steps=2)
    store = xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.Adam(), params, chunks=CHUNKS)
    store.step(grads[0], step=1)
    return store, params, grads


def user_folder(path: Path) -> Path:
    """A folder of someone's files: what `overwrite=True` once emptied."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("chapter 1")
    (path / "notes" / "todo.txt").write_text("back up the thesis")
    return path


# -- 1. data loss: overwrite only a store --------------------------------------------------


def test_overwrite_refuses_a_folder_of_other_files(tmp_path):
    folder = user_folder(tmp_path / "mine")
    before = everything(folder)
    params, _ = problem(np.float32, 0)
    with pytest.raises(
        xpoptim.StoreError,
        match=r"not empty and is not an xpoptim out-of-core store: it holds 'notes', "
        r"'thesis.tex'; overwrite=True replaces only a store, so nothing was deleted",
    ):
        xpoptim.OutOfCore.create(folder, xpoptim.Adam(), params, overwrite=True)
    assert everything(folder) == before


def test_overwrite_refuses_a_store_holding_a_file_of_someone_else(stepped):
    store, params, _ = stepped
    (store.directory / "results.csv").write_text("epoch,loss\n")
    before = everything(store.directory)
    with pytest.raises(xpoptim.StoreError, match=r"it holds 'results.csv'"):
        xpoptim.OutOfCore.create(store.directory, xpoptim.Adam(), params, overwrite=True)
    assert everything(store.directory) == before


@pytest.mark.parametrize(
    "root",
    ['{"zarr_format": 3, "node_type": "group", "attributes": {}}', "not json", "[1, 2]"],
    ids=["other-zarr-group", "invalid-json", "a-list"],
)
def test_overwrite_refuses_a_directory_that_only_looks_like_a_store(tmp_path, root):
    folder = tmp_path / "z"
    (folder / "v0").mkdir(parents=True)
    (folder / "v0" / "data.bin").write_bytes(b"precious")
    (folder / "zarr.json").write_text(root)
    before = everything(folder)
    params, _ = problem(np.float32, 0)
    with pytest.raises(xpoptim.StoreError, match=r"not recognisably an xpoptim out-of-core store"):
        xpoptim.OutOfCore.create(folder, xpoptim.Adam(), params, overwrite=True)
    assert everything(folder) == before


def test_overwrite_replaces_a_store_and_only_a_store(stepped):
    store, params, _ = stepped
    new = {k: v + 1 for k, v in params.items()}
    fresh = xpoptim.OutOfCore.create(
        store.directory, xpoptim.SGD(), new, chunks=CHUNKS, overwrite=True
    )
    assert fresh.step_count == 0
    assert sorted(p.name for p in store.directory.iterdir()) == [
        "v0",
        "xpoptim.json",
        "xpoptim.lock",
        "zarr.json",
    ]
    zeros = {k: np.zeros_like(v) for k, v in new.items()}
    assert_store_equals(fresh, new, {"velocities": zeros})
    # Without overwrite, a store is kept and the error says how to replace it.
    before = everything(store.directory)
    with pytest.raises(FileExistsError, match=r"already holds an xpoptim .* overwrite=True"):
        xpoptim.OutOfCore.create(store.directory, xpoptim.Adam(), params)
    assert everything(store.directory) == before


def test_create_in_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    params, _ = problem(np.float32, 0)
    with pytest.raises(xpoptim.StoreError, match=r"exists and is not a directory"):
        xpoptim.OutOfCore.create(tmp_path / "f", xpoptim.Adam(), params, overwrite=True)
    assert (tmp_path / "f").read_text() == "x"


# -- 3. silent corruption: checksums, missing chunks ------------------------------------------


def chunk_file(store: xpoptim.OutOfCore, key: str, *index: int) -> Path:
    return store.directory.joinpath(store.version, *key.split("/"), "c", *map(str, index))


@pytest.mark.parametrize(
    ("key", "index", "offset"),
    [("params/dense.weights", (1, 0), 5), ("velocities/bn.gamma", (2, 0, 1), 0)],
    ids=["params", "state"],
)
def test_a_flipped_byte_fails_the_step_before_anything_is_committed(stepped, key, index, offset):
    store, _, grads = stepped
    path = chunk_file(store, key, *index)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10  # one bit of one value
    path.write_bytes(bytes(data))
    before = everything(store.directory)
    with pytest.raises(CorruptChunkError, match=re.escape(f"{path} fails its CRC-32C checksum")):
        store.step(grads[1], step=2)
    assert everything(store.directory) == before  # not committed, v2 removed
    assert store.step_count == 1
    with pytest.raises(xpoptim.StoreError, match=r"fails its CRC-32C checksum"):
        store.read()
    # A truncated chunk too.
    path.write_bytes(bytes(data[:-7]))
    with pytest.raises(xpoptim.StoreError, match=r"fails its CRC-32C checksum"):
        store.step(grads[1], step=2)
    assert store.step_count == 1


@pytest.mark.parametrize(
    ("key", "index"),
    [("params/dense.bias", (1,)), ("momentums/dense.weights", (3, 0))],
    ids=["params", "state"],
)
def test_a_deleted_chunk_is_an_error_before_anything_is_written(stepped, key, index):
    store, _, grads = stepped
    path = chunk_file(store, key, *index)
    path.unlink()
    before = everything(store.directory)
    pattern = rf"the chunk file {re.escape(str(path))} is missing .* never read as zeros"
    with pytest.raises(CorruptChunkError, match=pattern):
        store.step(grads[1], step=2)
    with pytest.raises(CorruptChunkError, match=pattern):
        xpoptim.OutOfCore.open(store.directory)
    with pytest.raises(CorruptChunkError, match=pattern):
        store.read()
    assert everything(store.directory) == before


def test_a_chunk_deleted_during_a_read_is_an_error_not_zeros(stepped):
    """The reading store itself refuses a missing chunk (not only the listing before)."""
    store, _, _ = stepped
    params, _ = store.arrays()  # listed: all present
    chunk_file(store, "params/dense.bias", 2).unlink()
    with pytest.raises(CorruptChunkError, match=r"dense.bias/c/2 is missing"):
        params["dense.bias"][...]


def test_every_chunk_is_written_the_zero_state_included(tmp_path):
    params, _ = problem(np.float32, 0)
    store = xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.Adam(), params, chunks=CHUNKS)
    for field in ("params", "momentums", "velocities"):
        files = list((tmp_path / "s" / "v0" / field / "bn.gamma" / "c").rglob("*"))
        assert len([f for f in files if f.is_file()]) == 3 * 1 * 2, field
    _, state = store.read()
    assert not state.velocities["bn.gamma"].any()


def test_a_store_without_checksums_is_refused_with_a_way_out(stepped):
    store, _, _ = stepped
    root = store.directory / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["xpoptim"]["format_version"] = 1
    root.write_text(json.dumps(meta))
    before = everything(store.directory)
    with pytest.raises(
        xpoptim.StoreError,
        match=r"format version 1; this xpoptim reads version 2 \(version 1 stores have no "
        r"chunk checksums.*xpoptim.OutOfCore.upgrade\(old_directory, new_directory\)",
    ):
        xpoptim.OutOfCore.open(store.directory)
    assert everything(store.directory) == before


def test_an_array_replaced_without_checksums_is_refused(stepped):
    store, _, grads = stepped
    zarr.create_array(
        zarr.storage.LocalStore(store.directory),
        name="v1/params/dense.bias",
        shape=(7,),
        chunks=(3,),
        dtype="float32",
        compressors=None,
        overwrite=True,
    )
    before = everything(store.directory)
    with pytest.raises(xpoptim.StoreError, match=r"v1/params/dense.bias has no chunk checksums"):
        store.step(grads[1])
    assert everything(store.directory) == before


# -- 5. unclear errors: metadata and pointer ---------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{", r"xpoptim.json \(the commit pointer\) is not valid JSON"),
        ("[1]", r"must hold a JSON object, not list"),
        ('"v1"', r"must hold a JSON object, not str"),
        ({"step": None}, r"is missing \['step'\]"),
        ({"version": None}, r"is missing \['version'\]"),
        ({"optimizer": None}, r"is missing \['optimizer'\]"),
        ({"step": "1"}, r"'step' must be a non-negative integer, got '1'"),
        ({"step": 1.5}, r"'step' must be a non-negative integer, got 1.5"),
        ({"step": 1.0}, r"'step' must be a non-negative integer, got 1.0"),
        ({"step": True}, r"'step' must be a non-negative integer, got True"),
        ({"step": -1}, r"'step' must be a non-negative integer, got -1"),
        ({"version": "v0"}, r"'version' must be 'v1' for step 1, got 'v0'"),
        ({"version": "../x"}, r"'version' must be 'v1' for step 1, got '../x'"),
        ({"optimizer": [1]}, r"'optimizer' must be a JSON object"),
        ({"optimizer": {"learning_rate": "fast"}}, r"holds an optimizer config that Adam refuses"),
        ({"format_version": 1}, r"not an xpoptim out-of-core pointer of format version 2"),
    ],
)
def test_a_hand_edited_pointer_is_a_store_error(stepped, content, match):
    store, _, grads = stepped
    path = store.directory / "xpoptim.json"
    if isinstance(content, dict):
        pointer = json.loads(path.read_text())
        for key, value in content.items():
            if value is None:
                del pointer[key]
            else:
                pointer[key] = value
        content = json.dumps(pointer)
    path.write_text(content)
    before = everything(store.directory)
    with pytest.raises(xpoptim.StoreError, match=match):
        xpoptim.OutOfCore.open(store.directory)
    if "refuses" not in match:  # the config is only rebuilt by open
        with pytest.raises(xpoptim.StoreError, match=match):
            store.step(grads[1])
        with pytest.raises(xpoptim.StoreError, match=match):
            _ = store.step_count
    assert everything(store.directory) == before


@pytest.mark.parametrize(
    ("where", "content", "match"),
    [
        ("v1/params/dense.bias/zarr.json", "{not json", r"metadata of the committed array"),
        ("v1/momentums/bn.gamma/zarr.json", "[]", r"metadata of the committed array"),
        ("v1/params/dense.bias/zarr.json", '{"zarr_format": 3}', r"committed array"),
        ("zarr.json", "{not json", r"zarr.json \(the root group's metadata\) is not valid JSON"),
        ("zarr.json", "[]", r"a Zarr group but not an xpoptim out-of-core store"),
    ],
)
def test_damaged_array_or_root_metadata_is_a_store_error(stepped, where, content, match):
    store, _, grads = stepped
    (store.directory / where).write_text(content)
    before = everything(store.directory)
    with pytest.raises(xpoptim.StoreError, match=match):
        xpoptim.OutOfCore.open(store.directory)
    if where != "zarr.json":
        with pytest.raises(xpoptim.StoreError, match=match):
            store.step(grads[1])
    assert everything(store.directory) == before


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("arrays"), r"'arrays' must be a non-empty object"),
        (lambda m: m.update(fields="momentums"), r"'fields' must be a list of strings"),
        (lambda m: m.update(fields=[".."]), r"'fields' holds a name that cannot be a directory"),
        (lambda m: m["arrays"].update(x=[1]), r"arrays\['x'\] must have exactly"),
        (
            lambda m: m["arrays"]["dense.bias"].update(chunks=[0]),
            r"arrays\['dense.bias'\].chunks must be 1 positive ints",
        ),
        (
            lambda m: m["arrays"]["dense.bias"].update(shape="7"),
            r"arrays\['dense.bias'\].shape must be a list of sizes",
        ),
        (lambda m: m["arrays"].update({"..": m["arrays"]["dense.bias"]}), r"'\.\.'"),
    ],
)
def test_malformed_store_description_is_a_store_error(stepped, edit, match):
    store, _, _ = stepped
    root = store.directory / "zarr.json"
    meta = json.loads(root.read_text())
    edit(meta["attributes"]["xpoptim"])
    root.write_text(json.dumps(meta))
    before = everything(store.directory)
    with pytest.raises(xpoptim.StoreError, match=rf"malformed xpoptim description: .*{match}"):
        xpoptim.OutOfCore.open(store.directory)
    assert everything(store.directory) == before


# -- 5. names and chunks: checked before anything is written -------------------------------------


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["."], r"made of dots only"),
        ([".."], r"made of dots only"),
        (["w", "a" * 256], r"256 bytes long in UTF-8, the limit is 255"),
        (["é" * 128], r"256 bytes long"),
        (["a\x00b"], r"contains '\\x00'"),
        (["a/b"], r"contains '/'"),
        (["a\\b"], r"contains '\\\\'"),
        (["line\nbreak"], r"contains '\\n'"),
        (["__meta"], r"reserved by Zarr"),
        (["zarr.json"], r"Zarr's metadata file"),
        (["\udcff"], r"not valid Unicode"),
        ([""], r"it is empty"),
        (["Dense.W", "dense.w"], r"'Dense.W' and 'dense.w' would be the same directory"),
        (["caf\u00e9", "cafe\u0301"], r"would be the same directory"),  # NFC vs NFD
        (["\ufb01lter", "filter"], r"would be the same directory"),  # NFKC: the fi ligature
    ],
)
def test_names_the_file_system_cannot_hold_are_refused_before_any_write(tmp_path, names, match):
    assert unicodedata.normalize("NFC", "cafe\u0301") == "caf\u00e9"
    params = {n: np.ones(3, np.float32) for n in names}
    with pytest.raises(ValueError, match=rf"cannot name a Zarr array: {match}|{match}"):
        xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.Adam(), params)
    assert not (tmp_path / "s").exists()


def test_a_name_of_255_bytes_is_accepted(tmp_path):
    name = "w" * 255
    store = xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.SGD(), {name: np.ones(3)})
    store.step({name: np.ones(3)})
    assert store.names == [name]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"chunks": (0,)}, ValueError, r"chunks for 'w' must be positive, got \(0,\)"),
        ({"chunks": (-2,)}, ValueError, r"must be positive"),
        ({"chunks": (2, 2)}, ValueError, r"chunks for 'w' has 2 dimensions, the parameter 1"),
        ({"chunks": {"w": (0,)}}, ValueError, r"chunks for 'w' must be positive"),
        ({"chunks": ("2",)}, TypeError, r"chunks for 'w' must be a tuple of ints"),
        ({"chunks": (True,)}, TypeError, r"must be a tuple of ints"),
        ({"chunk_bytes": 0}, ValueError, r"chunk_bytes must be positive, got 0"),
        ({"chunk_bytes": -5}, ValueError, r"chunk_bytes must be positive, got -5"),
        ({"chunk_bytes": 1.5}, TypeError, r"chunk_bytes must be an int"),
    ],
)
def test_bad_chunks_are_clear_errors_before_any_write(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.Adam(), {"w": np.ones(4)}, **kwargs)
    assert not (tmp_path / "s").exists()


def test_reconfigure_with_a_config_it_cannot_store_is_refused_at_open(stepped):
    store, _, _ = stepped
    before = everything(store.directory)
    opt = xpoptim.Adam(learning_rate=lambda count: 0.1)
    with pytest.raises(TypeError, match=r"config cannot be stored as JSON"):
        xpoptim.OutOfCore.open(store.directory, opt, reconfigure=True)
    assert everything(store.directory) == before


def test_a_config_changed_after_open_to_one_it_cannot_store_fails_before_writing(stepped):
    store, _, grads = stepped
    store.optimizer.learning_rate = float("nan")  # JSON cannot hold NaN either
    before = everything(store.directory)
    with pytest.raises((TypeError, ValueError)):
        store.step(grads[1])
    assert everything(store.directory) == before


def test_a_failed_step_leaves_every_file_as_it_was(tmp_path):
    """A step that fails mid-computation (a NaN gradient with nonfinite='raise') commits
    nothing and removes its partial version: the directory is byte-identical."""
    params, grads = problem(np.float32, steps=2)
    opt = xpoptim.Adam(nonfinite="raise")
    store = xpoptim.OutOfCore.create(tmp_path / "s", opt, params, chunks=CHUNKS)
    store.step(grads[0])
    bad = {k: v.copy() for k, v in grads[1].items()}
    bad["bn.gamma"][1, 1, 1] = np.nan
    before = everything(store.directory)
    with pytest.raises(FloatingPointError):
        store.step(bad)
    assert everything(store.directory) == before
    store.step(grads[1])
    assert_store_equals(store, *in_memory(opt, params, grads)[-1])
    assert set(SHAPES) == set(store.names)
    assert sorted(snapshot(store.directory))[-2:] == ["xpoptim.lock", "zarr.json"]


def test_reconfigure_to_other_state_buffers_is_refused_at_open(tmp_path):
    store = xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.RMSprop(), {"w": np.ones(4)})
    before = everything(store.directory)
    with pytest.raises(
        xpoptim.StoreError,
        match=r"holds the state \['cache'\], but this optimizer keeps \['cache', "
        r"'momentum_buffer'\]",
    ):
        xpoptim.OutOfCore.open(store.directory, xpoptim.RMSprop(momentum=0.9), reconfigure=True)
    assert everything(store.directory) == before
