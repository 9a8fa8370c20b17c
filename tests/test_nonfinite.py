"""The ``nonfinite`` policy: "propagate", "skip" and "raise" on every backend, against the
independent float64 reference (a skipped step is a step the reference never sees)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest

import xpoptim

import reference
from conftest import BACKENDS, Backend, selected_backends, tolerance
from conftest import exact_snapshot as snapshot

KINDS = ["SGD", "RMSprop", "Adam"]
CONFIG = {"learning_rate": 0.05, "regularization": "L1", "weight_decay": 0.01}
SHAPES = {"dense.weights": (4, 3), "dense.bias": (3,)}
STEPS = 5
#: step index -> (parameter, flat index, value): two bad steps among five
BAD = {1: ("dense.bias", 0, np.nan), 3: ("dense.weights", 5, np.inf)}


def problem(dtype: Any):
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()} for _ in range(STEPS)]
    for step, (name, index, value) in BAD.items():
        grads[step][name].reshape(-1)[index] = value
    return params, grads


def numpy_session_only() -> None:
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")


@pytest.mark.parametrize("kind", KINDS)
def test_config_names_the_policy(kind):
    numpy_session_only()
    cls = getattr(xpoptim, kind)
    # The default is the seed's behaviour, so a seed-compatible config stays the seed's.
    assert cls().nonfinite == "propagate"
    assert "nonfinite" not in cls().get_config()
    opt = cls(nonfinite="skip")
    assert opt.get_config()["nonfinite"] == "skip"
    assert cls.from_config(opt.get_config()).nonfinite == "skip"
    for bad in ("ignore", None, 1):
        with pytest.raises(ValueError, match="nonfinite must be one of"):
            cls(nonfinite=bad)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy on inf - inf, in any thread
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_policy_matches_reference(backend: Backend, dtype, kind, policy, assert_no_compute):
    params_np, grads_np = problem(dtype)
    opt = getattr(xpoptim, kind)(**CONFIG, nonfinite=policy)
    params = {k: backend.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    lazy = assert_no_compute() if backend.lazy else contextlib.nullcontext()
    with lazy:  # on Dask the check adds no compute: the graph stays lazy
        for step, grads in enumerate(grads_np):
            before = (
                snapshot(backend, params, state)
                if step in BAD and backend.eager_writeable and policy == "skip"
                else None
            )
            params, state = opt.update(
                params, {k: backend.asarray(v) for k, v in grads.items()}, state
            )
            if before is not None:  # a skipped step writes nothing, in place or not
                assert snapshot(backend, params, state) == {**before, "skipped": int(state.skipped)}
    seen = (
        grads_np if policy == "propagate" else [g for i, g in enumerate(grads_np) if i not in BAD]
    )
    with np.errstate(all="ignore"):
        want_params, want_state = reference.run(kind, opt.get_config(), params_np, seen)
    assert int(state.step) == len(seen)
    if policy == "skip":
        assert int(state.skipped) == len(BAD)
    else:  # the other policies count nothing
        assert state.skipped is None
    for name, want in want_params.items():
        got = backend.to_numpy(params[name])
        assert got.dtype == dtype, name
        if policy == "skip":
            assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, want, equal_nan=True, **tolerance(dtype), err_msg=name)
    for field, buffers in want_state.items():
        for name, want in buffers.items():
            got = backend.to_numpy(getattr(state, field)[name])
            assert got.dtype == dtype, (field, name)
            np.testing.assert_allclose(got, want, equal_nan=True, **tolerance(dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_raise_names_the_parameter_and_changes_nothing(backend: Backend, kind):
    params_np, grads_np = problem(np.float64)
    opt = getattr(xpoptim, kind)(**CONFIG, nonfinite="raise")
    params = {k: backend.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    if backend.lazy or not backend.eager_writeable:
        # Lazy or traced arrays (Dask, JAX) cannot be read without computing them.
        before = snapshot(backend, params, state)
        with pytest.raises(TypeError, match="nonfinite='raise' must read"):
            opt.update(params, {k: backend.asarray(v) for k, v in grads_np[0].items()}, state)
        assert snapshot(backend, params, state) == before
        return
    params, state = opt.update(
        params, {k: backend.asarray(v) for k, v in grads_np[0].items()}, state
    )
    before = snapshot(backend, params, state)
    bad = {k: backend.asarray(v) for k, v in grads_np[1].items()}
    with pytest.raises(xpoptim.NonFiniteGradientError, match=r"'dense\.bias'") as info:
        opt.update(params, bad, state)
    assert "dense.weights" not in str(info.value)
    assert snapshot(backend, params, state) == before
    # A later finite gradient goes on from the untouched state.
    params, state = opt.update(
        params, {k: backend.asarray(v) for k, v in grads_np[2].items()}, state
    )
    want, _ = reference.run(kind, opt.get_config(), params_np, [grads_np[0], grads_np[2]])
    for name, w in want.items():
        np.testing.assert_allclose(backend.to_numpy(params[name]), w, **tolerance(np.float64))


class Layer:
    def __init__(self, name: str, param: Any) -> None:
        self.name, self.param, self.grad = name, param, None

    @property
    def params(self) -> dict[str, tuple[Any, Any]]:
        return {self.name: (self.param, self.grad)}


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_step_layers_skip_counts_and_raise_changes_nothing(backend: Backend, policy):
    if not backend.eager_writeable:
        pytest.skip(f"step(layers) updates in place, which {backend.name} arrays cannot")
    params_np, grads_np = problem(np.float64)
    opt = xpoptim.Adam(**CONFIG, nonfinite=policy)
    layers = [Layer("weights", backend.asarray(params_np["dense.weights"])),
              Layer("bias", backend.asarray(params_np["dense.bias"]))]  # fmt: skip
    seen = []
    for step, grads in enumerate(grads_np):
        layers[0].grad = backend.asarray(grads["dense.weights"])
        layers[1].grad = backend.asarray(grads["dense.bias"])
        if step in BAD and policy == "raise":
            held = [backend.to_numpy(layer.param).tobytes() for layer in layers]
            held_m = {k: backend.to_numpy(v).tobytes() for k, v in opt.state.momentums.items()}
            with pytest.raises(xpoptim.NonFiniteGradientError, match=BAD[step][0].split(".")[1]):
                opt.step(layers)
            assert [backend.to_numpy(layer.param).tobytes() for layer in layers] == held
            assert {
                k: backend.to_numpy(v).tobytes() for k, v in opt.state.momentums.items()
            } == held_m
            continue
        opt.step(layers)
        if step not in BAD:
            seen.append(grads)
    assert opt.t == len(seen) == STEPS - len(BAD)
    assert opt.state_dict()["skipped"] == (len(BAD) if policy == "skip" else 0)
    want, _ = reference.run("Adam", opt.get_config(), params_np, seen)
    np.testing.assert_allclose(
        backend.to_numpy(layers[0].param), want["dense.weights"], **tolerance(np.float64)
    )


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_skip_under_jax_jit(dtype_name):
    if "jax" not in selected_backends():
        pytest.skip("runs in the jax session")
    import jax

    backend = BACKENDS["jax"]
    dtype = np.dtype(dtype_name)
    params_np, grads_np = problem(dtype)
    opt = xpoptim.Adam(**CONFIG, nonfinite="skip")
    update = jax.jit(opt.update)
    params = {k: backend.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    for grads in grads_np:
        params, state = update(params, {k: backend.asarray(v) for k, v in grads.items()}, state)
    assert int(state.step) == STEPS - len(BAD)
    assert int(state.skipped) == len(BAD)
    seen = [g for i, g in enumerate(grads_np) if i not in BAD]
    want, _ = reference.run("Adam", opt.get_config(), params_np, seen)
    for name, w in want.items():
        got = backend.to_numpy(params[name])
        assert got.dtype == dtype
        np.testing.assert_allclose(got, w, **tolerance(dtype))
    # A jit-built state still makes a state dict (its counters are concrete here).
    assert opt.state_dict(state)["skipped"] == len(BAD)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_param_groups_decide_once_for_every_group(backend: Backend, policy, assert_no_compute):
    """A NaN in one group's gradient skips (or refuses) the update of every group."""
    from xpoptim import transforms

    params_np, grads_np = problem(np.float64)
    opt = transforms.ParamGroups(
        xpoptim.Adam(**CONFIG, nonfinite=policy),
        [{"params": ["dense.weights"], "learning_rate": 0.01}],
    )
    params = {k: backend.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    first = {k: backend.asarray(v) for k, v in grads_np[0].items()}
    if policy == "raise" and not backend.eager_writeable:
        with pytest.raises(TypeError, match="nonfinite='raise' must read"):
            opt.update(params, first, state)
        return
    params, state = opt.update(params, first, state)
    before = {k: backend.to_numpy(v).tobytes() for k, v in params.items()}
    bad = {k: backend.asarray(v) for k, v in grads_np[1].items()}  # NaN in dense.bias only
    if policy == "raise":
        with pytest.raises(xpoptim.NonFiniteGradientError, match=r"'dense\.bias'") as info:
            opt.update(params, bad, state)
        assert "dense.weights" not in str(info.value)
        assert {k: backend.to_numpy(v).tobytes() for k, v in params.items()} == before
        return
    lazy = assert_no_compute() if backend.lazy else contextlib.nullcontext()
    with lazy:
        params, state = opt.update(params, bad, state)
    assert {k: backend.to_numpy(v).tobytes() for k, v in params.items()} == before
    assert [int(sub.skipped) for sub in state.groups] == [1, 1]
    assert [int(sub.step) for sub in state.groups] == [1, 1]
    with pytest.raises(ValueError, match="cannot change nonfinite"):
        transforms.ParamGroups(xpoptim.SGD(), [{"params": ["w"], "nonfinite": "raise"}])


def test_persist_keeps_the_skip_count_and_out_of_core_refuses_skip(tmp_path):
    if "dask" not in selected_backends():
        pytest.skip("runs in the dask session")
    da = pytest.importorskip("dask.array")
    opt = xpoptim.Adam(nonfinite="skip")
    params = {"w": da.from_array(np.ones(4), chunks=2)}
    state = opt.init(params)
    for g in ([1.0, np.nan, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]):
        params, state = opt.update(params, {"w": da.from_array(np.array(g), chunks=2)}, state)
        params, state = xpoptim.persist(params, state)  # commit each lazy step
    assert int(state.skipped) == 1
    assert int(state.step) == 1
    want, _ = reference.run("Adam", opt.get_config(), {"w": np.ones(4)}, [{"w": np.full(4, 0.5)}])
    np.testing.assert_allclose(params["w"].compute(), want["w"], **tolerance(np.float64))
    # Chunks are stepped one by one there: a whole step cannot be skipped.
    pytest.importorskip("zarr")
    with pytest.raises(ValueError, match="cannot skip a whole step"):
        xpoptim.OutOfCore.create(tmp_path / "store", opt, {"w": np.ones(4)})


def test_multisteps_refuses_a_non_finite_micro_batch_under_raise():
    """Once in the running sum, a NaN would make every later k-th call raise."""
    opt = xpoptim.transforms.MultiSteps(xpoptim.SGD(nonfinite="raise", momentum=0.0), every_k=2)
    params = {"w": np.ones(2)}
    state = opt.init(params)
    with pytest.raises(xpoptim.NonFiniteGradientError, match="'w'"):
        opt.update(params, {"w": np.array([np.nan, 1.0])}, state)
    np.testing.assert_array_equal(state.accumulated["w"], np.zeros(2))
    assert state.mini_step == 0
    for _ in range(2):  # the window goes on with finite micro-batches
        params, state = opt.update(params, {"w": np.ones(2)}, state)
    np.testing.assert_allclose(params["w"], np.full(2, 1.0 - 0.01 * (1.0 + 0.001)))
