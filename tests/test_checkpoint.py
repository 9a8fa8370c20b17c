"""Checkpoint files: resume through a file on every backend, a table of bad files each
refused with a clear error, and crash safety of ``save`` under SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
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


def _good(path: Path) -> None:
    opt = xpoptim.Adam(**CONFIG)
    params_np, grads_np = problem()
    params, state = run(BACKENDS["numpy"], opt, params_np, opt.init(params_np), grads_np[:2])
    xpoptim.save(path, opt, params, state=state)


def _members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _with_meta(path: Path, edit) -> None:
    members = _members(path)
    meta = json.loads(members["__xpoptim__"].tobytes())
    edit(meta, members)
    members["__xpoptim__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **members)


def _truncate(fraction: float):
    def make(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return make


def _flip_in_array_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    members = _members(path)
    # Corrupt a byte inside the largest array's data (not in a header).
    key = max((k for k in members if k != "__xpoptim__"), key=lambda k: members[k].nbytes)
    raw = members[key].tobytes()
    at = bytes(data).find(raw) + len(raw) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _set_meta(*keys, value):
    def edit(meta, members):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return lambda path: _with_meta(path, edit)


def _object_array(path: Path) -> None:
    members = _members(path)
    members["a0"] = np.array([{"evil": 1}], dtype=object)
    with open(path, "wb") as f:
        np.savez(f, **members)


def _replace_member(key: str, value: np.ndarray):
    def make(path: Path) -> None:
        members = _members(path)
        members[key] = value
        with open(path, "wb") as f:
            np.savez(f, **members)

    return make


def _write(path: Path, how, *args, **kwargs) -> None:
    with open(path, "wb") as f:
        how(f, *args, **kwargs)


BAD_FILES = {
    "empty": (lambda p: p.write_bytes(b""), "not a readable xpoptim checkpoint"),
    "random bytes": (
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)),
        "not a readable xpoptim checkpoint",
    ),
    "truncated to 10%": (_truncate(0.1), "truncated or corrupt"),
    "truncated to 50%": (_truncate(0.5), "truncated or corrupt"),
    "truncated by one byte": (_truncate(1 - 1e-9), "truncated or corrupt"),
    "flipped byte in array data": (_flip_in_array_data, "truncated or corrupt"),
    "a single .npy": (lambda p: _write(p, np.save, np.zeros(3)), "single .npy array"),
    "npz without metadata": (
        lambda p: _write(p, np.savez, a0=np.zeros(3)),
        "no '__xpoptim__' member",
    ),
    "pickled object array": (_object_array, "truncated or corrupt"),
    "metadata not JSON": (
        _replace_member("__xpoptim__", np.frombuffer(b"{nope", np.uint8)),
        "unreadable metadata",
    ),
    "metadata of another format": (_set_meta("format", value="other"), "not that of an xpoptim"),
    "newer file version": (_set_meta("format_version", value=2), "newer than this xpoptim"),
    "newer state version": (
        _set_meta("state", "format_version", value=9),
        "newer than this xpoptim",
    ),
    "member missing": (
        _set_meta("state", "buffers", "momentums", "dense.bias", value="a99"),
        "missing member 'a99'",
    ),
    "member not named": (_replace_member("a77", np.zeros(2)), "not named by the metadata"),
    "unknown optimizer": (
        _set_meta("state", "optimizer", value="Lion"),
        "unknown optimizer type 'Lion'",
    ),
    "config that builds nothing": (
        _set_meta("state", "config", "beta1", value=2.0),
        "does not build a Adam",
    ),
    "integer buffer": (_replace_member("a0", np.zeros(12, np.int64)), "not real floating"),
    "shape mismatch in the state": (_replace_member("a1", np.zeros(5)), "same parameter"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused_with_a_clear_error(case, tmp_path):
    numpy_session_only()
    make, message = BAD_FILES[case]
    path = tmp_path / "bad.npz"
    _good(path)
    make(path)
    data = path.read_bytes()
    with pytest.raises(xpoptim.CheckpointError, match=message):
        xpoptim.load(path)
    assert path.read_bytes() == data  # reading never writes


def test_missing_file_and_directory_are_os_errors(tmp_path):
    numpy_session_only()
    with pytest.raises(FileNotFoundError):
        xpoptim.load(tmp_path / "none.npz")
    with pytest.raises(IsADirectoryError):
        xpoptim.load(tmp_path)


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    numpy_session_only()
    path = tmp_path / "ckpt.npz"
    _good(path)
    os.chmod(path, 0o640)
    old = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
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
