"""Checkpoint files: resume through a file on every backend, a table of bad files each
refused with a clear error, and crash safety of ``save`` under SIGKILL."""

from __future__ import annotations

import ast
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import xpoptim

import reference
from conftest import BACKENDS, Backend, selected_backends, tolerance
from conftest import exact_snapshot as numpy_of

KINDS = ["SGD", "RMSprop", "Adam"]
CONFIG = {"learning_rate": 0.02, "regularization": "L2", "weight_decay": 0.01}
SHAPES = {"dense.weights": (4, 3), "dense.bias": (3,)}
STEPS, SPLIT = 6, 3


def problem(dtype: Any = np.float64):
    rng = np.random.default_rng(2)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def numpy_session_only() -> None:
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")


def run(backend: Backend, opt, params, state, grads_list):
    for g in grads_list:
        params, state = opt.update(params, {k: backend.asarray(v) for k, v in g.items()}, state)
    return params, state


# -- resume through a file ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_resume_through_a_file_is_bit_identical(backend: Backend, dtype, kind, tmp_path):
    params_np, grads_np = problem(dtype)
    opt = getattr(xpoptim, kind)(**CONFIG)
    init = {k: backend.asarray(v) for k, v in params_np.items()}
    full_params, full_state = run(backend, opt, init, opt.init(init), grads_np)
    want, _ = reference.run(kind, opt.get_config(), params_np, grads_np)
    for name, w in want.items():
        np.testing.assert_allclose(backend.to_numpy(full_params[name]), w, **tolerance(dtype))

    first = getattr(xpoptim, kind)(**CONFIG)
    init = {k: backend.asarray(v) for k, v in params_np.items()}
    params, state = run(backend, first, init, first.init(init), grads_np[:SPLIT])
    path = tmp_path / "ckpt.npz"
    xpoptim.save(path, first, params, state=state)
    del first, params, state

    # A new process would have fresh parameters of the right kind: load like them.
    fresh = {k: backend.asarray(np.zeros_like(v)) for k, v in params_np.items()}
    ck = xpoptim.load(path, like=fresh)
    assert ck.optimizer.get_config() == opt.get_config()
    params, state = run(backend, ck.optimizer, ck.params, ck.state, grads_np[SPLIT:])
    assert numpy_of(backend, params, state) == numpy_of(backend, full_params, full_state)


class Layer:
    def __init__(self, name: str, param: Any) -> None:
        self.name, self.param, self.grad = name, param, None

    @property
    def params(self) -> dict[str, tuple[Any, Any]]:
        return {self.name: (self.param, self.grad)}


@pytest.mark.parametrize("kind", KINDS)
def test_resume_step_layers_through_a_file(backend: Backend, kind, tmp_path):
    if not backend.eager_writeable:
        pytest.skip(f"step(layers) updates in place, which {backend.name} arrays cannot")
    params_np, grads_np = problem()

    def layers_from(values):
        return [Layer("weights", backend.asarray(values["dense.weights"])),
                Layer("bias", backend.asarray(values["dense.bias"]))]  # fmt: skip

    def train(opt, layers, grads_list):
        for g in grads_list:
            layers[0].grad = backend.asarray(g["dense.weights"])
            layers[1].grad = backend.asarray(g["dense.bias"])
            opt.step(layers)

    full, full_layers = getattr(xpoptim, kind)(**CONFIG), layers_from(params_np)
    train(full, full_layers, grads_np)

    first, layers = getattr(xpoptim, kind)(**CONFIG), layers_from(params_np)
    train(first, layers, grads_np[:SPLIT])
    path = tmp_path / "layers.npz"
    xpoptim.save(path, first, layers)
    ck = xpoptim.load(path)  # NumPy arrays, keyed like step(): "0.weights", "1.bias"
    assert set(ck.params) == {"0.weights", "1.bias"}
    resumed = layers_from(
        {"dense.weights": ck.params["0.weights"], "dense.bias": ck.params["1.bias"]}
    )
    train(ck.optimizer, resumed, grads_np[SPLIT:])
    for a, b in zip(resumed, full_layers, strict=True):
        assert backend.to_numpy(a.param).tobytes() == backend.to_numpy(b.param).tobytes()
    if kind == "Adam":
        assert ck.optimizer.t == STEPS
    got, want = ck.optimizer.state_dict(), full.state_dict()
    assert got["step"] == want["step"] == STEPS
    for field, buffers in want["buffers"].items():
        for name, a in buffers.items():
            assert backend.to_numpy(got["buffers"][field][name]).tobytes() == (
                backend.to_numpy(a).tobytes()
            )


def test_load_into_a_chosen_namespace(tmp_path):
    numpy_session_only()
    opt = xpoptim.Adam(**CONFIG, nonfinite="skip")
    params_np, grads_np = problem()
    params, state = run(BACKENDS["numpy"], opt, params_np, opt.init(params_np), grads_np[:2])
    xpoptim.save(tmp_path / "a.npz", opt, params, state=state)
    ck = xpoptim.load(tmp_path / "a.npz")
    assert ck.optimizer.nonfinite == "skip"
    assert isinstance(ck.params["dense.weights"], np.ndarray)
    assert isinstance(ck.state.momentums["dense.weights"], np.ndarray)
    np.testing.assert_array_equal(ck.state.velocities["dense.bias"], state.velocities["dense.bias"])
    for name in ("torch", "array_api_strict"):
        if BACKENDS[name].skip_reason():
            continue
        from array_api_compat import array_namespace

        xp = array_namespace(BACKENDS[name].asarray(np.zeros(1)))
        ck = xpoptim.load(tmp_path / "a.npz", xp=xp)
        assert array_namespace(ck.params["dense.bias"]) is xp
        assert array_namespace(ck.state.momentums["dense.bias"]) is xp


# -- bad files ----------------------------------------------------------------------------
# The file format is written out here independently of xpoptim._safetensors: 8 bytes of
# little-endian header size, the JSON header, the tensors' bytes.

LEGACY = Path(__file__).parent / "data" / "checkpoint-v1-adam.npz"  # written by xpoptim 0.1


def _good(path: Path) -> None:
    opt = xpoptim.Adam(**CONFIG)
    params_np, grads_np = problem()
    params, state = run(BACKENDS["numpy"], opt, params_np, opt.init(params_np), grads_np[:2])
    xpoptim.save(path, opt, params, state=state)


def _parts(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _put(path: Path, header: Any, buffer: bytes = b"", raw: bytes | None = None) -> None:
    blob = json.dumps(header).encode() if raw is None else raw
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + buffer)


def _edit_header(edit):
    def make(path: Path) -> None:
        header, buffer = _parts(path)
        buffer = edit(header, buffer) or buffer
        _put(path, header, buffer)

    return make


def _meta_text(path: Path, text: str) -> None:
    """Make the xpoptim metadata ``text``, with its CRC-32, so the checks past it run."""
    header, buffer = _parts(path)
    header["__metadata__"]["xpoptim"] = text
    header["__metadata__"]["xpoptim_crc32"] = f"{zlib.crc32(text.encode()):08x}"
    _put(path, header, buffer)


def _with_meta(edit):
    def make(path: Path) -> None:
        header, _ = _parts(path)
        meta = json.loads(header["__metadata__"]["xpoptim"])
        edit(meta)
        _meta_text(path, json.dumps(meta))

    return make


def _set_meta(*keys, value):
    def edit(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return _with_meta(edit)


def _truncate(fraction: float):
    def make(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return make


def _flip_in_array_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # the last tensor's bytes
    path.write_bytes(bytes(data))


def _change_learning_rate_without_its_crc(path: Path) -> None:
    header, buffer = _parts(path)
    text = header["__metadata__"]["xpoptim"]
    assert '"learning_rate": 0.02' in text
    header["__metadata__"]["xpoptim"] = text.replace(
        '"learning_rate": 0.02', '"learning_rate": 0.03'
    )
    _put(path, header, buffer)


def _tensor(name: str, **spec):
    def edit(header, buffer):
        header[name].update(spec)

    return _edit_header(edit)


def _extra_tensor(path: Path) -> None:
    header, buffer = _parts(path)
    meta = json.loads(header["__metadata__"]["xpoptim"])
    header["a77"] = {"dtype": "F64", "shape": [2], "data_offsets": [len(buffer), len(buffer) + 16]}
    meta["tensors"]["a77"] = {"dtype": "F64", "shape": [2], "crc32": zlib.crc32(bytes(16))}
    _put(path, header, buffer + bytes(16))
    _meta_text(path, json.dumps(meta))


def _nested(depth: int) -> str:
    return '{"a": ' + "[" * depth + "]" * depth + "}"


BAD_FILES = {
    "empty": (lambda p: p.write_bytes(b""), "too short for the 8-byte header size"),
    "random bytes": (
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)),
        "header size .* exceeds the limit",
    ),
    "truncated to 10%": (_truncate(0.1), "runs past the end of the file"),
    "truncated to 90%": (_truncate(0.9), "tensors end at byte .*truncated"),
    "truncated by one byte": (_truncate(1 - 1e-9), "tensors end at byte .*truncated"),
    "data beyond the tensors": (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "tensors end"),
    "flipped byte in array data": (_flip_in_array_data, r"tensor 'a\d+' has CRC-32 .*corrupt"),
    "changed metadata, CRC not updated": (
        _change_learning_rate_without_its_crc,
        "metadata has CRC-32 .*corrupt",
    ),
    "a single .npy": (lambda p: _write(p, np.save, np.zeros(3)), "single .npy array"),
    "safetensors without xpoptim metadata": (
        lambda p: _put(p, {"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)),
        "not that of an xpoptim checkpoint",
    ),
    "header size beyond the limit": (
        lambda p: p.write_bytes((2**63).to_bytes(8, "little") + b"{}"),
        "exceeds the limit",
    ),
    "huge shape, offsets to match": (
        _tensor("a0", shape=[10**9, 10**9], data_offsets=[0, 8 * 10**18]),
        "starts at byte 96 and overlaps the previous tensor",
    ),
    "huge shape, small offsets": (
        _tensor("a0", shape=[10**9, 10**9]),
        r"tensor 'a0' declares shape \(1000000000, 1000000000\)",
    ),
    "deeply nested header": (
        lambda p: _put(p, None, raw=_nested(100_000).encode()),
        "header is nested too deeply",
    ),
    "deeply nested metadata": (
        lambda p: (_good(p), _meta_text(p, _nested(100_000))),
        "metadata is nested too deeply",
    ),
    "header not an object": (lambda p: _put(p, None, raw=b"[1]"), "does not start with"),
    "NaN in the header": (
        lambda p: _put(p, None, raw=b'{"__metadata__": {}, "x": NaN}'),
        "holds NaN, which is not JSON",
    ),
    "a key twice": (
        lambda p: _put(p, None, raw=b'{"__metadata__": {}, "__metadata__": {}}'),
        r"names \['__metadata__'\] twice",
    ),
    "overlapping tensors": (_tensor("a1", data_offsets=[0, 24]), "overlaps|declares shape"),
    "a hole between tensors": (
        _edit_header(
            lambda h, b: h.update(a0={**h["a0"], "data_offsets": [8, 8 + 96]}) or b + bytes(8)
        ),
        "leaves a hole",
    ),
    "an integer dtype": (_tensor("a0", dtype="I64"), "dtype 'I64'; this reader takes"),
    "metadata of another format": (
        _edit_header(lambda h, b: h["__metadata__"].update(format="other")),
        "not that of an xpoptim",
    ),
    "format_version true": (_set_meta("format_version", value=True), "bad format_version True"),
    "format_version 1.5": (_set_meta("format_version", value=1.5), "bad format_version 1.5"),
    "format_version of the .npz files": (
        _set_meta("format_version", value=1),
        "safetensors checkpoint has format_version 2, not 1",
    ),
    "newer file version": (_set_meta("format_version", value=3), "newer than this xpoptim"),
    "newer state version": (
        _set_meta("state", "format_version", value=9),
        "newer than this xpoptim",
    ),
    "tensor table does not match the file": (
        _set_meta("tensors", "a0", "shape", value=[3, 4]),
        "tensor 'a0': the file says",
    ),
    "member missing": (
        _set_meta("state", "buffers", "momentums", "dense.bias", value="a99"),
        "missing member 'a99'",
    ),
    "member not named": (_extra_tensor, "not named by the metadata"),
    "unknown optimizer": (
        _set_meta("state", "optimizer", value="NoSuchOptimizer"),
        "unknown optimizer type 'NoSuchOptimizer'",
    ),
    "config that builds nothing": (
        _set_meta("state", "config", "beta1", value=2.0),
        "does not build a Adam",
    ),
    "config nested too deeply": (
        lambda p: _meta_text(
            p,
            json.dumps(json.loads(_parts(p)[0]["__metadata__"]["xpoptim"])).replace(
                '"beta1": 0.9', '"beta1": ' + "[" * 900 + "]" * 900
            ),
        ),
        "does not build a Adam",
    ),
    "config not a mapping": (
        _set_meta("state", "config", value=["learning_rate"]),
        "saved config of a Adam is list, not a mapping",
    ),
    "state not a dict": (_set_meta("state", value=[1]), "metadata has no state dict"),
    "params not a mapping": (_set_meta("params", value=[1]), "params must map names"),
    "a buffer named by a list": (
        _set_meta("state", "buffers", "momentums", "dense.bias", value=["a0"]),
        r"names a missing member \['a0'\]",
    ),
    "shape mismatch in the state": (
        _with_meta(
            lambda m: m["state"]["buffers"].update(
                momentums=dict(
                    zip(
                        m["state"]["buffers"]["momentums"],
                        reversed(m["state"]["buffers"]["momentums"].values()),
                        strict=True,
                    )
                )
            )
        ),
        "same parameter",
    ),
}


def _write(path: Path, how, *args, **kwargs) -> None:
    with open(path, "wb") as f:
        how(f, *args, **kwargs)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused_with_a_clear_error(case, tmp_path):
    numpy_session_only()
    make, message = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    _good(path)
    make(path)
    data = path.read_bytes()
    with pytest.raises(xpoptim.CheckpointError, match=message):
        xpoptim.load(path)
    assert path.read_bytes() == data  # reading never writes


def test_every_flipped_byte_is_detected(tmp_path):
    """Every single-byte change anywhere in a file (header size, JSON header, metadata,
    array data) is refused: the metadata's and each tensor's CRC-32 and the format's size
    checks leave no byte unchecked."""
    numpy_session_only()
    path = tmp_path / "ckpt.safetensors"
    _good(path)
    good = path.read_bytes()
    for at in range(len(good)):
        for mask in (0x01, 0x80):
            data = bytearray(good)
            data[at] ^= mask
            path.write_bytes(bytes(data))
            with pytest.raises(xpoptim.CheckpointError):
                xpoptim.load(path)


def test_missing_file_and_directory_are_os_errors(tmp_path):
    numpy_session_only()
    with pytest.raises(FileNotFoundError):
        xpoptim.load(tmp_path / "none.npz")
    with pytest.raises(IsADirectoryError):
        xpoptim.load(tmp_path)


# -- the format is safetensors: other readers and writers ------------------------------------


def test_other_safetensors_readers_read_a_checkpoint(tmp_path):
    """The reference implementation (the ``safetensors`` package) reads what save writes."""
    numpy_session_only()
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    path = tmp_path / "ckpt.safetensors"
    opt = xpoptim.Adam(**CONFIG)
    params_np, grads_np = problem(np.float32)
    params, state = run(BACKENDS["numpy"], opt, params_np, opt.init(params_np), grads_np[:2])
    xpoptim.save(path, opt, params, state=state)
    tensors = st.load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    assert metadata["format"] == "xpoptim.checkpoint"
    meta = json.loads(metadata["xpoptim"])
    for field in ("momentums", "velocities"):
        for name, member in meta["state"]["buffers"][field].items():
            want = getattr(state, field)[name]
            assert tensors[member].dtype == want.dtype == np.float32
            assert tensors[member].tobytes() == want.tobytes()
    for name, member in meta["params"].items():
        assert tensors[member].tobytes() == params[name].tobytes()


def test_reads_the_files_of_other_safetensors_writers(tmp_path):
    """The format reader takes what the reference implementation writes: every dtype it
    supports, 0-d and empty tensors, metadata."""
    numpy_session_only()
    st = pytest.importorskip("safetensors.numpy")
    from xpoptim import _safetensors

    rng = np.random.default_rng(0)
    tensors = {
        "f16": rng.normal(size=(3, 5)).astype(np.float16),
        "f32": rng.normal(size=(7,)).astype(np.float32),
        "f64": np.asarray(rng.normal()),  # 0-d
        "u8": np.arange(11, dtype=np.uint8),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "other.safetensors"
    st.save_file(tensors, str(path), metadata={"who": "someone else"})
    with open(path, "rb") as f:
        metadata, entries = _safetensors.read_header(f, path.stat().st_size)
        got = {name: _safetensors.read_tensor(f, e) for name, e in entries.items()}
    assert metadata == {"who": "someone else"}
    assert set(got) == set(tensors)
    for name, a in tensors.items():
        assert got[name].dtype == a.dtype
        assert got[name].shape == a.shape
        assert got[name].tobytes() == a.tobytes()
    # And xpoptim's checkpoint reader refuses it clearly: it is not a checkpoint.
    with pytest.raises(xpoptim.CheckpointError, match="not that of an xpoptim checkpoint"):
        xpoptim.load(path)


# -- the .npz files of xpoptim 0.1 (file format_version 1) ----------------------------------


def test_legacy_npz_checkpoint_loads_and_resumes_bit_identically(tmp_path):
    """A file written by xpoptim 0.1 (tests/data, Adam after 2 of 6 steps) loads, resumes
    exactly like a run that never stopped, and saving it again writes the new format."""
    numpy_session_only()
    np_backend = BACKENDS["numpy"]
    params_np, grads_np = problem()
    full = xpoptim.Adam(**CONFIG)
    fresh = {k: v.copy() for k, v in params_np.items()}
    full_params, full_state = run(np_backend, full, fresh, full.init(fresh), grads_np)

    ck = xpoptim.load(LEGACY)
    assert ck.optimizer.get_config() == full.get_config()
    assert ck.state.step == 2
    params, state = run(np_backend, ck.optimizer, ck.params, ck.state, grads_np[2:])
    assert numpy_of(np_backend, params, state) == numpy_of(np_backend, full_params, full_state)

    ck = xpoptim.load(LEGACY)
    xpoptim.save(tmp_path / "new.safetensors", ck.optimizer, ck.params, state=ck.state)
    assert (tmp_path / "new.safetensors").read_bytes()[:2] != b"PK"
    again = xpoptim.load(tmp_path / "new.safetensors")
    assert numpy_of(np_backend, again.params, again.state) == numpy_of(
        np_backend, ck.params, ck.state
    )


def _npz_members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _npz_rewrite(edit, how=np.savez):
    def make(path: Path) -> None:
        members = _npz_members(path)
        edit(members)
        with open(path, "wb") as f:
            how(f, **members)

    return make


def _npz_meta(edit=None, text=None):
    def change(members):
        meta = json.loads(members["__xpoptim__"].tobytes())
        if edit:
            edit(meta)
        blob = json.dumps(meta) if text is None else text
        members["__xpoptim__"] = np.frombuffer(blob.encode(), np.uint8)

    return _npz_rewrite(change)


def _zip_patch(local_at: int, central_at: int, value: int):
    """Set a 2-byte field of every member's local header and central directory entry."""

    def make(path: Path) -> None:
        data = bytearray(path.read_bytes())
        for signature, at in ((b"PK\x03\x04", local_at), (b"PK\x01\x02", central_at)):
            start = data.find(signature)
            while start >= 0:
                data[start + at : start + at + 2] = value.to_bytes(2, "little")
                start = data.find(signature, start + 4)
        path.write_bytes(bytes(data))

    return make


def _npy_header_declaring(shape: tuple[int, ...]):
    """Make member a0's .npy header declare ``shape`` (a valid zip: CRC-32s recomputed)."""

    def make(path: Path) -> None:
        with zipfile.ZipFile(path) as zf:
            raw = {info.filename: zf.read(info) for info in zf.infolist()}
        data = raw["a0.npy"]
        start = data.index(b"{")
        end = data.index(b"}", start) + 1
        header = ast.literal_eval(data[start:end].decode())
        header["shape"] = shape
        text = repr(header).encode()
        # The header keeps its length: the room comes from (or goes to) its padding spaces.
        rest = data[end:]
        grow = len(text) - (end - start)
        assert rest[: max(grow, 0)].strip() == b""
        rest = rest[grow:] if grow >= 0 else b" " * -grow + rest
        raw["a0.npy"] = data[:start] + text + rest
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for name, member in raw.items():
                zf.writestr(name, member)

    return make


LEGACY_BAD_FILES = {
    "truncated to 50%": (_truncate(0.5), "not a readable .npz"),
    "flipped byte in array data": (lambda p: _flip_npz(p), "Bad CRC-32"),
    "DEFLATE-compressed members": (
        _npz_rewrite(lambda m: None, how=np.savez_compressed),
        r"is compressed \(zip method 8\)",
    ),
    "encrypted members": (_zip_patch(6, 8, 0x1), "is encrypted"),
    "unknown compression method": (_zip_patch(8, 10, 99), r"compressed \(zip method 99\)"),
    "huge declared shape": (_npy_header_declaring((10**6, 10**6)), "declares shape"),
    "pickled object array": (
        _npz_rewrite(lambda m: m.update(a0=np.array([{"evil": 1}], dtype=object))),
        "dtype object",
    ),
    "npz without metadata": (_npz_rewrite(lambda m: m.pop("__xpoptim__")), "no '__xpoptim__'"),
    "metadata not JSON": (_npz_meta(text="{nope"), "metadata is not valid JSON"),
    "deeply nested metadata": (_npz_meta(text=_nested(100_000)), "nested too deeply"),
    "format_version true": (
        _npz_meta(lambda m: m.update(format_version=True)),
        "bad format_version True",
    ),
    "format_version of the new files": (
        _npz_meta(lambda m: m.update(format_version=2)),
        r"\.npz checkpoint has format_version 1, not 2",
    ),
    "metadata of another format": (_npz_meta(lambda m: m.update(format="x")), "not that of"),
    "integer array": (_npz_rewrite(lambda m: m.update(a0=np.zeros(12, np.int64))), "int64"),
}


def _flip_npz(path: Path) -> None:
    members = _npz_members(path)
    raw = members["a0"].tobytes()
    data = bytearray(path.read_bytes())
    at = bytes(data).find(raw) + len(raw) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", list(LEGACY_BAD_FILES))
def test_bad_legacy_npz_is_refused_with_a_clear_error(case, tmp_path):
    numpy_session_only()
    make, message = LEGACY_BAD_FILES[case]
    path = tmp_path / "old.npz"
    path.write_bytes(LEGACY.read_bytes())
    make(path)
    data = path.read_bytes()
    with pytest.raises(xpoptim.CheckpointError, match=message):
        xpoptim.load(path)
    assert path.read_bytes() == data


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    numpy_session_only()
    path = tmp_path / "ckpt.npz"
    _good(path)
    os.chmod(path, 0o640)
    old = path.read_bytes()

    def broken_write(f, tensors, metadata):
        f.write(b"\x10\0\0\0\0\0\0\0{half a header")
        raise OSError("disk full")

    monkeypatch.setattr(xpoptim._safetensors, "write", broken_write)
    opt = xpoptim.SGD()
    with pytest.raises(OSError, match="disk full"):
        xpoptim.save(path, opt, {"w": np.ones(3)}, state=opt.init({"w": np.ones(3)}))
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]
    # A successful overwrite keeps the file's permissions.
    xpoptim.save(path, opt, {"w": np.ones(3)}, state=opt.init({"w": np.ones(3)}))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]
    assert xpoptim.load(path).optimizer.get_config() == opt.get_config()


# -- crash safety: SIGKILL a writer at random moments --------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import xpoptim

    path, n, version = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    opt = xpoptim.SGD(learning_rate=0.1, momentum=0.5)
    # Warm up (first-use imports) on another file, so that kills land in real writes.
    warm = {"w": np.zeros(3)}
    xpoptim.save(path + ".warm", opt, warm, state=opt.init(warm))
    print("ready", flush=True)
    while True:
        params = {"w": np.full(n, float(version)), "b": np.full(7, float(version))}
        state = opt.init(params)._replace(step=version)
        state.velocities["w"][:] = -version
        state.velocities["b"][:] = -version
        xpoptim.save(path, opt, params, state=state)
        print(version, flush=True)
        version += 1
    """
)


def _version_of(path: Path) -> int:
    """The version in a checkpoint, after checking that the whole file is that version."""
    ck = xpoptim.load(path)
    version = int(ck.state.step)
    assert ck.params is not None
    for name, p in ck.params.items():
        assert np.all(p == version), name
        assert np.all(ck.state.velocities[name] == -version), name
    return version


@pytest.mark.slow
def test_save_survives_sigkill_at_random_moments(tmp_path):
    numpy_session_only()
    rng = random.Random(1234)
    path = tmp_path / "ckpt.npz"
    opt = xpoptim.SGD(learning_rate=0.1, momentum=0.5)
    n = 200_000  # 1.6 MB per array: a write takes long enough to be hit
    params = {"w": np.zeros(n), "b": np.zeros(7)}
    xpoptim.save(path, opt, params, state=opt.init(params))  # version 0, the "old" file
    src = str(Path(xpoptim.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    outcomes = {"old": 0, "new": 0}
    trials, deadline = 0, time.monotonic() + 12.0
    while trials < 30 and (trials < 8 or time.monotonic() < deadline):
        before = _version_of(path)
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(n), str(before + 1)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.03))  # a write takes ~10 ms here
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
        child.wait()
        child.stdout.close()
        done = [int(line) for line in rest.split()]
        last_done = done[-1] if done else before
        got = _version_of(path)  # loadable, and all of one version
        # The last completed write, or the one in flight; never a torn mix.
        assert got in (last_done, last_done + 1), (got, before, done)
        outcomes["new" if got == last_done + 1 else "old"] += 1
        trials += 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("ckpt.npz", "ckpt.npz.warm")]
    assert all(name.startswith(".ckpt.npz.") and name.endswith(".tmp") for name in leftovers)
    # Some kills landed inside a write (a torn temporary left, or the new file just in).
    assert leftovers or outcomes["new"], outcomes
    print(f"SIGKILL trials: {trials}, outcomes {outcomes}, temporaries left {len(leftovers)}")


def test_a_schedule_is_saved_by_config_and_resumes(tmp_path):
    """A built-in schedule travels in the config; its position is the state's step."""
    numpy_session_only()
    from xpoptim import schedules

    def make():
        rate = schedules.WarmupCosineDecay(0.0, 0.1, warmup_steps=2, decay_steps=6)
        return xpoptim.SGD(learning_rate=rate, momentum=0.5, nonfinite="skip")

    params_np, grads_np = problem()
    np_backend = BACKENDS["numpy"]
    full = make()
    fresh = {k: v.copy() for k, v in params_np.items()}  # updates happen in place
    full_params, full_state = run(np_backend, full, fresh, full.init(fresh), grads_np)
    first = make()
    fresh = {k: v.copy() for k, v in params_np.items()}
    params, state = run(np_backend, first, fresh, first.init(fresh), grads_np[:SPLIT])
    xpoptim.save(tmp_path / "s.npz", first, params, state=state)
    ck = xpoptim.load(tmp_path / "s.npz")
    assert ck.optimizer.get_config() == full.get_config()
    params, state = run(np_backend, ck.optimizer, ck.params, ck.state, grads_np[SPLIT:])
    assert numpy_of(np_backend, params, state) == numpy_of(np_backend, full_params, full_state)
    # A schedule that is only a Python function has no config to write: refused, no file.
    opt = xpoptim.SGD(learning_rate=lambda count: 0.1)
    with pytest.raises(TypeError, match="cannot write"):
        xpoptim.save(tmp_path / "f.npz", opt, params_np, state=opt.init(params_np))
    assert not (tmp_path / "f.npz").exists()


def test_load_like_parameters_that_do_not_fit_is_refused(tmp_path):
    numpy_session_only()
    path = tmp_path / "ckpt.npz"
    _good(path)
    params_np, _ = problem()
    wrong_shape = {**params_np, "dense.bias": np.zeros(4)}
    with pytest.raises(xpoptim.CheckpointError, match=r"saved params\['dense.bias'\] has shape"):
        xpoptim.load(path, like=wrong_shape)
    with pytest.raises(xpoptim.CheckpointError, match=r"missing \['dense.bias'\]"):
        xpoptim.load(path, like={"dense.weights": params_np["dense.weights"]})
    ck = xpoptim.load(path, like={k: v.astype(np.float32) for k, v in params_np.items()})
    assert ck.params["dense.bias"].dtype == np.float32
    assert ck.state.momentums["dense.bias"].dtype == np.float32


# -- save checks what load checks, before anything is written -------------------------------


def _fresh_adam_params():
    params_np, _ = problem()
    return params_np


SAVE_REFUSALS = {
    # The optimizer never ran step(): there is no state of its own to save.
    "before the first step": (
        lambda params, state: {"opt": xpoptim.Adam(**CONFIG), "params": params},
        ValueError,
        r"never ran step\(layers\).*opt.state_dict\(state\)",
    ),
    "params of other names": (
        lambda params, state: {"params": {"other": params["dense.bias"]}, "state": state},
        xpoptim.StateDictError,
        r"missing \['other'\], unexpected \['dense.bias', 'dense.weights'\]",
    ),
    "params of other shapes": (
        lambda params, state: {"params": {**params, "dense.bias": np.zeros(5)}, "state": state},
        xpoptim.StateDictError,
        r"\['dense.bias'\] has shape \(3,\), the parameter \(5,\)",
    ),
    "integer params": (
        lambda params, state: {
            "params": {k: v.astype(np.int64) for k, v in params.items()},
            "state": state,
        },
        xpoptim.StateDictError,
        "has dtype int64, not real floating",
    ),
    "a state of another optimizer": (
        lambda params, state: {"params": params, "state": xpoptim.SGD().init(params)},
        TypeError,
        "state must be a AdamState",
    ),
}


@pytest.mark.parametrize("case", list(SAVE_REFUSALS))
def test_save_refuses_what_load_would_refuse_and_keeps_the_good_file(case, tmp_path):
    """A save that load would refuse writes nothing: the good checkpoint stays, byte for
    byte, with no temporary beside it (main wrote a file that load then refused)."""
    numpy_session_only()
    path = tmp_path / "ckpt.safetensors"
    _good(path)
    old = path.read_bytes()
    opt = xpoptim.Adam(**CONFIG)
    params_np, grads_np = problem()
    params, state = run(BACKENDS["numpy"], opt, params_np, opt.init(params_np), grads_np[:1])
    snapshot = numpy_of(BACKENDS["numpy"], params, state)
    make, error, message = SAVE_REFUSALS[case]
    kwargs = {"opt": opt, **make(params, state)}
    with pytest.raises(error, match=message):
        xpoptim.save(path, kwargs.pop("opt"), kwargs.pop("params"), **kwargs)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]
    assert numpy_of(BACKENDS["numpy"], params, state) == snapshot
    xpoptim.load(path)  # still the good file


# -- durability: the order of the operations that make a save survive a power loss ----------


def _record_durable_operations(monkeypatch) -> list[tuple[Any, ...]]:
    """Record each os.fsync (what it syncs: a file's inode and size, or a directory) and
    os.replace, calling through to the real functions."""
    events: list[tuple[Any, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        events.append(("fsync", kind, st.st_ino, st.st_size))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.stat(src).st_ino, os.path.abspath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.parametrize("existing", [False, True], ids=["new file", "overwrite"])
def test_save_syncs_the_data_then_renames_then_syncs_the_directory(existing, tmp_path, monkeypatch):
    """The file's complete data is fsynced before the rename, and the directory after it:
    removing either fsync (or the flush before it), or renaming first, fails this test
    (a SIGKILL test cannot: the page cache survives a killed process, not a power loss)."""
    numpy_session_only()
    path = tmp_path / "ckpt.safetensors"
    if existing:
        _good(path)
    events = _record_durable_operations(monkeypatch)
    _good(path)
    monkeypatch.undo()
    final = path.stat()
    directory = os.stat(tmp_path)
    data_synced = ("fsync", "file", final.st_ino, final.st_size)  # all the bytes, this inode
    renamed = ("replace", final.st_ino, str(path))
    dir_synced = ("fsync", "dir", directory.st_ino, directory.st_size)
    assert events == [data_synced, renamed, dir_synced], events


# -- permissions: new files follow the umask, as every file open() creates ----------------


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o002], ids=oct)
def test_new_checkpoint_files_honour_the_umask(umask, tmp_path):
    """main made every new checkpoint 0o644, readable by all under umask 0o077."""
    numpy_session_only()
    old = os.umask(umask)
    try:
        _good(tmp_path / "ckpt.safetensors")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("umask", [0o077, 0o022], ids=oct)
def test_store_pointer_honours_the_umask_like_zarrs_files(umask, tmp_path):
    pytest.importorskip("zarr")
    pytest.importorskip("dask")
    if "dask" not in selected_backends():
        pytest.skip("needs Zarr and Dask: runs in the dask session")
    params = {"w": np.ones((4, 3))}
    old = os.umask(umask)
    try:
        xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.Adam(), params)
    finally:
        os.umask(old)
    pointer = stat.S_IMODE((tmp_path / "s" / "xpoptim.json").stat().st_mode)
    zarr_files = list((tmp_path / "s").rglob("zarr.json"))
    assert zarr_files
    assert pointer == 0o666 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in zarr_files} == {pointer}
