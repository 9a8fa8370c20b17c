"""Every optimizer x regularization x decayed/excluded name x dtype, on every backend,
against the independent float64 reference in ``reference.py``."""

from __future__ import annotations

import numpy as np
import pytest

import xpoptim

import reference
from conftest import Backend, tolerance

# (class name, constructor kwargs): non-default hyperparameters so that each one matters.
CASES = [
    ("SGD", {"learning_rate": 0.05, "momentum": 0.8}),
    ("SGD", {}),
    ("RMSprop", {"learning_rate": 0.01, "decay_rate": 0.8, "epsilon": 1e-6}),
    ("RMSprop", {}),
    ("Adam", {"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.95, "epsilon": 1e-7}),
    ("Adam", {}),
]
REGULARIZATIONS = [("L1", 0.05), ("L2", 0.05), (None, 0.05)]
STEPS = 5


def make_problem(seed: int = 0, steps: int = STEPS):
    """Parameters named so that some are regularized and some excluded (bias, beta, gamma)."""
    rng = np.random.default_rng(seed)
    shapes = {"dense.weights": (4, 3), "dense.bias": (3,), "bn.gamma": (3,), "bn.beta": (1, 3)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(steps)]
    return params, grads


def case_id(case):
    kind, kwargs = case
    return kind + ("-defaults" if not kwargs else "-custom")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("reg", REGULARIZATIONS, ids=lambda r: str(r[0]))
def test_update_matches_reference(backend: Backend, dtype, case, reg):
    kind, kwargs = case
    config = {**kwargs, "regularization": reg[0], "weight_decay": reg[1]}
    params_np, grads_np = make_problem()
    # The reference sees the same (rounded) inputs as the optimizer.
    params_np = {k: v.astype(dtype) for k, v in params_np.items()}
    grads_np = [{k: v.astype(dtype) for k, v in g.items()} for g in grads_np]
    want_params, want_state = reference.run(kind, config, params_np, grads_np)

    opt = getattr(xpoptim, kind)(**config)
    params = {k: backend.asarray(v, dtype) for k, v in params_np.items()}
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(
            params, {k: backend.asarray(v, dtype) for k, v in grads.items()}, state
        )
    assert state.step == STEPS
    for name, want in want_params.items():
        got = backend.to_numpy(params[name])
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=name)
    for field, buffers in want_state.items():
        for name, want in buffers.items():
            got = backend.to_numpy(getattr(state, field)[name])
            assert got.dtype == dtype, (field, name)
            np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=f"{field}[{name}]")


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_excluded_names_are_not_regularized(backend: Backend, case):
    """A huge decay changes decayed parameters, not those named bias/beta/gamma."""
    kind, kwargs = case
    params_np, grads_np = make_problem(steps=1)
    results = {}
    for reg in ("L1", "L2", None):
        opt = getattr(xpoptim, kind)(**kwargs, regularization=reg, weight_decay=0.5)
        params = {k: backend.asarray(v) for k, v in params_np.items()}
        state = opt.init(params)
        params, _ = opt.update(
            params, {k: backend.asarray(v) for k, v in grads_np[0].items()}, state
        )
        results[reg] = {k: backend.to_numpy(v) for k, v in params.items()}
    for name in params_np:
        excluded = name != "dense.weights"
        for reg in ("L1", "L2"):
            same = np.array_equal(results[reg][name], results[None][name])
            assert same == excluded, (reg, name)
