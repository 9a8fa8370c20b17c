"""Property-based tests (hypothesis): random shapes, dtypes, hyperparameters, step counts and
non-finite gradients, on every backend, against the independent float64 reference."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

import xpoptim

import reference
from conftest import Backend, tolerance

# Modest, so that the suite stays fast on every backend. The backend fixture holds no
# per-example state, so sharing it between examples is safe.
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# A decay factor is 0 or >= 1e-3: a tiny one (hypothesis likes 1e-234) rounds to 0 in
# float32 but not in float64, and 0 * inf = NaN where float64 keeps inf.
DECAY = st.one_of(st.just(0.0), st.floats(1e-3, 0.95))
KIND_HYPER = {
    "SGD": {"momentum": DECAY},
    "RMSprop": {"decay_rate": DECAY, "epsilon": st.floats(1e-8, 1e-3)},
    "Adam": {
        "beta1": DECAY,
        "beta2": st.floats(0.5, 0.9999),
        "epsilon": st.floats(1e-8, 1e-3),
    },
}


@st.composite
def problems(draw: Any, min_weight_decay: float = 0.0) -> dict[str, Any]:
    """An optimizer config, float32/float64 parameters of random shapes, and gradients.

    Parameters have magnitudes in [1, 3] and updates stay well under 1 in total, so no
    parameter crosses zero, where L1's ``sign`` would make float32 and float64 differ
    by a whole penalty step.
    """
    kind = draw(st.sampled_from(sorted(KIND_HYPER)))
    regularization = draw(st.sampled_from(["L1", "L2", None]))
    config = {
        "learning_rate": draw(st.floats(1e-4, 0.02)),
        "regularization": regularization,
        "weight_decay": draw(st.floats(min_weight_decay, 0.1)),
        **{name: draw(strategy) for name, strategy in KIND_HYPER[kind].items()},
    }
    dtype = np.dtype(draw(st.sampled_from(["float32", "float64"])))
    shapes = draw(
        st.lists(
            array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5), min_size=1, max_size=3
        )
    )
    # Some names are regularized, some (bias/beta/gamma) are not.
    names = [f"{draw(st.sampled_from(['w', 'bias', 'gamma']))}{i}" for i in range(len(shapes))]
    steps = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = {
        n: (rng.choice([-1.0, 1.0], size=s) * rng.uniform(1.0, 3.0, size=s)).astype(dtype)
        for n, s in zip(names, shapes, strict=True)
    }
    grads = [
        {
            n: rng.uniform(-1.0, 1.0, size=s).astype(dtype)
            for n, s in zip(names, shapes, strict=True)
        }
        for _ in range(steps)
    ]
    return {"kind": kind, "config": config, "dtype": dtype, "params": params, "grads": grads}


def run(backend: Backend, opt: xpoptim.Optimizer, problem: dict[str, Any], grads_list) -> Any:
    params = {k: backend.asarray(v) for k, v in problem["params"].items()}
    state = opt.init(params)
    for grads in grads_list:
        params, state = opt.update(params, {k: backend.asarray(v) for k, v in grads.items()}, state)
    return params, state


def assert_matches(backend: Backend, got_params, got_state, want_params, want_state, dtype):
    for name, want in want_params.items():
        got = backend.to_numpy(got_params[name])
        assert got.dtype == dtype
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, equal_nan=True, **tolerance(dtype), err_msg=name)
    for field, buffers in want_state.items():
        for name, want in buffers.items():
            got = backend.to_numpy(getattr(got_state, field)[name])
            assert got.dtype == dtype
            np.testing.assert_allclose(got, want, equal_nan=True, **tolerance(dtype))


@SETTINGS
@given(problem=problems())
def test_every_backend_agrees_with_the_reference(backend: Backend, problem):
    opt = getattr(xpoptim, problem["kind"])(**problem["config"])
    params, state = run(backend, opt, problem, problem["grads"])
    assert int(state.step) == len(problem["grads"])
    want_params, want_state = reference.run(
        problem["kind"], problem["config"], problem["params"], problem["grads"]
    )
    assert_matches(backend, params, state, want_params, want_state, problem["dtype"])


@contextlib.contextmanager
def quiet_floating_point():
    """NumPy warns on inf - inf in whichever thread computes (Dask's too)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@SETTINGS
@given(
    # A zero decay would differ on purpose: xpoptim adds no penalty at all, the reference
    # adds 0 * p, which is NaN for an infinite parameter.
    problem=problems(min_weight_decay=1e-4),
    policy=st.sampled_from(["propagate", "skip", "raise"]),
    bad_value=st.sampled_from([np.nan, np.inf, -np.inf]),
    data=st.data(),
)
def test_nonfinite_gradients_under_each_policy(backend: Backend, problem, policy, bad_value, data):
    grads = [{k: v.copy() for k, v in g.items()} for g in problem["grads"]]
    bad_step = data.draw(st.integers(0, len(grads) - 1), label="bad_step")
    name = data.draw(st.sampled_from(sorted(grads[bad_step])), label="bad_param")
    flat = grads[bad_step][name].reshape(-1)
    flat[data.draw(st.integers(0, flat.size - 1), label="bad_index")] = bad_value
    opt = getattr(xpoptim, problem["kind"])(**problem["config"], nonfinite=policy)
    kind, config, dtype = problem["kind"], problem["config"], problem["dtype"]

    if policy == "raise":
        if backend.lazy or not backend.eager_writeable:
            # Lazy or traced arrays cannot be read: refused up front, on any update.
            bad_step = 0
        params, state = run(backend, opt, problem, grads[:bad_step])
        before = {k: backend.to_numpy(v).tobytes() for k, v in params.items()}
        bad = {k: backend.asarray(v) for k, v in grads[bad_step].items()}
        if backend.lazy or not backend.eager_writeable:
            with pytest.raises(TypeError, match="nonfinite='raise'"):
                opt.update(params, bad, state)
        else:
            with pytest.raises(xpoptim.NonFiniteGradientError, match=repr(name)):
                opt.update(params, bad, state)
        assert {k: backend.to_numpy(v).tobytes() for k, v in params.items()} == before
        assert int(state.step) == bad_step
        return

    with quiet_floating_point():
        params, state = run(backend, opt, problem, grads)
        seen = grads if policy == "propagate" else grads[:bad_step] + grads[bad_step + 1 :]
        want_params, want_state = reference.run(kind, config, problem["params"], seen)
        assert int(state.step) == len(seen)
        assert (int(state.skipped) if policy == "skip" else state.skipped) == (
            1 if policy == "skip" else None
        )
        if policy == "propagate":
            assert not np.isfinite(backend.to_numpy(params[name])).all()
        assert_matches(backend, params, state, want_params, want_state, dtype)
