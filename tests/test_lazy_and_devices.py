"""Dask stays lazy and keeps chunks; state follows the parameters' device; jax.jit works."""

from __future__ import annotations

import numpy as np
import pytest

import xpoptim

import reference
from conftest import buffers_of, tolerance

KINDS = ["SGD", "RMSprop", "Adam"]


@pytest.mark.parametrize("kind", KINDS)
def test_dask_update_is_lazy_and_keeps_chunks(assert_no_compute, kind):
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4))
    grads = [rng.normal(size=(6, 4)) for _ in range(3)]
    params = {"w": da.from_array(w, chunks=(2, 3))}
    opt = getattr(xpoptim, kind)(weight_decay=0.05)
    with assert_no_compute():
        state = opt.init(params)
        for g in grads:
            params, state = opt.update(params, {"w": da.from_array(g, chunks=(2, 3))}, state)
    assert params["w"].chunks == ((2, 2, 2), (3, 1))
    for buffers in buffers_of(state):
        assert buffers["w"].chunks == ((2, 2, 2), (3, 1))
    want, _ = reference.run(kind, opt.get_config(), {"w": w}, [{"w": g} for g in grads])
    np.testing.assert_allclose(params["w"].compute(), want["w"], **tolerance(np.float64))


def test_the_no_compute_guard_catches_a_compute(assert_no_compute):
    da = pytest.importorskip("dask.array")
    with assert_no_compute(), pytest.raises(AssertionError, match="must stay lazy"):
        da.ones(3).sum().compute()


@pytest.mark.parametrize("kind", KINDS)
def test_state_and_results_stay_on_the_parameters_device(kind):
    strict = pytest.importorskip("array_api_strict")
    dev = strict.Device("device1")
    params = {
        "w": strict.asarray([[1.0, -2.0]], device=dev),
        "bias": strict.asarray([0.5], device=dev),
    }
    grads = {
        "w": strict.asarray([[0.1, 0.2]], device=dev),
        "bias": strict.asarray([0.3], device=dev),
    }
    opt = getattr(xpoptim, kind)()
    state = opt.init(params)
    for _ in range(2):
        params, state = opt.update(params, grads, state)
    for name in params:
        assert params[name].device == dev
        for buffers in buffers_of(state):
            assert buffers[name].device == dev
            assert buffers[name].dtype == strict.float64


@pytest.mark.parametrize("kind", KINDS)
def test_float32_state_stays_float32(backend, kind):
    opt = getattr(xpoptim, kind)()
    params = {"w": backend.asarray(np.ones(4), np.float32)}
    state = opt.init(params)
    for _ in range(3):
        params, state = opt.update(params, {"w": backend.asarray(np.ones(4), np.float32)}, state)
    assert backend.to_numpy(params["w"]).dtype == np.float32
    for buffers in buffers_of(state):
        assert backend.to_numpy(buffers["w"]).dtype == np.float32


@pytest.mark.parametrize("kind", KINDS)
def test_update_under_jax_jit(kind):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 2)).astype(np.float32)
    grads = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(4)]
    opt = getattr(xpoptim, kind)(learning_rate=0.05, weight_decay=0.1)
    update = jax.jit(opt.update)
    params = {"w": jnp.asarray(w)}
    state = opt.init(params)
    for g in grads:
        params, state = update(params, {"w": jnp.asarray(g)}, state)
    assert int(state.step) == 4
    assert params["w"].dtype == jnp.float32
    want, _ = reference.run(kind, opt.get_config(), {"w": w}, [{"w": g} for g in grads])
    np.testing.assert_allclose(np.asarray(params["w"]), want["w"], **tolerance(np.float32))
