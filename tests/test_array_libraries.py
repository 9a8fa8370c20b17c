"""Array API libraries that no one here wrote: every seed optimizer on Cubed and ndonnx
arrays, against the independent float64 reference (``reference.py``).

* **Cubed** (bounded-memory, distributed): ``update`` builds a lazy plan and computes
  nothing (its arrays are made with Cubed's ``raise-if-computes`` executor while stepping),
  the state keeps the parameters' chunks, and a step computes within Cubed's memory bound
  on arrays larger than it.
* **ndonnx** (arrays that are ONNX graphs): on arrays with values, and on symbolic
  arguments (no values at all): the steps become an ONNX model, run by onnxruntime.
* **pydata/sparse** (COO arrays): correct values, and stated plainly: a step densifies
  (the stored entries grow to the union of the parameter's and the gradients' patterns).

The ``array_library`` nox sessions run this file, one library each
(``XPOPTIM_ARRAY_LIBRARIES``); where a library is not installed its tests skip.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest

import xpoptim

import reference

SELECTED = [
    name.strip()
    for name in os.environ.get("XPOPTIM_ARRAY_LIBRARIES", "cubed,ndonnx,sparse").split(",")
    if name.strip()
]

# (class name, constructor kwargs): non-default hyperparameters so that each one matters.
CASES = [
    ("SGD", {"learning_rate": 0.05, "momentum": 0.8}),
    ("RMSprop", {"learning_rate": 0.01, "decay_rate": 0.8, "epsilon": 1e-6}),
    ("Adam", {"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.95, "epsilon": 1e-7}),
    ("AdamW", {"learning_rate": 0.02, "weight_decay": 0.05}),
]
REGULARIZATIONS = ["L1", "L2", None]
STEPS = 3
SHAPES = {"dense.weights": (4, 3), "dense.bias": (3,), "bn.gamma": (1, 3)}


def problem() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def config_of(kind: str, kwargs: dict[str, Any], reg: str | None) -> dict[str, Any]:
    if kind == "AdamW":
        return dict(kwargs)
    return {**kwargs, "regularization": reg, "weight_decay": 0.05}


def cases() -> list[Any]:
    out = []
    for kind, kwargs in CASES:
        for reg in [None] if kind == "AdamW" else REGULARIZATIONS:
            out.append(pytest.param(kind, config_of(kind, kwargs, reg), id=f"{kind}-{reg}"))
    return out


def library(name: str) -> Any:
    if name not in SELECTED:
        pytest.skip(f"{name} is not among XPOPTIM_ARRAY_LIBRARIES={','.join(SELECTED)}")
    with warnings.catch_warnings():
        # ndonnx warns at import when onnxruntime is missing (its session installs it).
        warnings.simplefilter("ignore")
        return pytest.importorskip(name)


def assert_matches_reference(kind: str, config: dict[str, Any], got: Any, state: Any) -> None:
    """``got``/``state`` (NumPy) against the reference after the problem's steps."""
    params, grads = problem()
    want_params, want_state = reference.run(kind, config, params, grads)
    for name, want in want_params.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-12, err_msg=name)
    for field, buffers in want_state.items():
        for name, want in buffers.items():
            np.testing.assert_allclose(
                state[field][name], want, rtol=1e-12, atol=1e-12, err_msg=f"{field}[{name}]"
            )


# -- Cubed ------------------------------------------------------------------------------


def cubed_arrays(cubed: Any, arrays: dict[str, np.ndarray], spec: Any) -> dict[str, Any]:
    """Cubed arrays of two chunks per axis, under ``spec``."""
    return {
        k: cubed.from_array(a, chunks=tuple(max(1, (n + 1) // 2) for n in a.shape), spec=spec)
        for k, a in arrays.items()
    }


def cubed_compute(x: Any) -> np.ndarray:
    from cubed.runtime.create import create_executor

    return np.asarray(x.compute(executor=create_executor("single-threaded")))


@pytest.mark.parametrize(("kind", "config"), cases())
def test_cubed_steps_lazily_and_matches_reference(kind: str, config: dict[str, Any]) -> None:
    cubed = library("cubed")
    # Every array of the step is made with an executor that fails if anything computes.
    spec = cubed.Spec(allowed_mem="100MB", executor_name="raise-if-computes")
    params_np, grads_np = problem()
    opt = getattr(xpoptim, kind)(**config)
    params = cubed_arrays(cubed, params_np, spec)
    chunks = {k: p.chunks for k, p in params.items()}
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(params, cubed_arrays(cubed, grads, spec), state)
    fields = [f for f in type(state)._fields[1:] if isinstance(getattr(state, f), dict)]
    for name, p in params.items():
        assert type(p).__module__.startswith("cubed"), name
        assert p.chunks == chunks[name], name
        for field in fields:
            assert getattr(state, field)[name].chunks == chunks[name], (field, name)
    assert state.step == STEPS
    got = {k: cubed_compute(p) for k, p in params.items()}
    buffers = {f: {k: cubed_compute(v) for k, v in getattr(state, f).items()} for f in fields}
    assert_matches_reference(kind, config, got, buffers)


def test_cubed_step_computes_within_its_memory_bound() -> None:
    """Parameters of 3.2 MB in 100 chunks, an Adam step computed under allowed_mem=2MB:
    Cubed plans every task within the bound (it refuses a plan that would exceed it)."""
    cubed = library("cubed")
    spec = cubed.Spec(allowed_mem="2MB")
    rng = np.random.default_rng(0)
    p_np, g_np = rng.normal(size=(400, 1000)), rng.normal(size=(400, 1000))
    assert p_np.nbytes > 1.5 * 2_000_000
    p = cubed.from_array(p_np, chunks=(40, 100), spec=spec)
    g = cubed.from_array(g_np, chunks=(40, 100), spec=spec)
    opt = xpoptim.Adam(learning_rate=0.01)
    params, _ = opt.update({"w": p}, {"w": g}, opt.init({"w": p}))
    got = cubed_compute(params["w"])
    want, _ = reference.run("Adam", {"learning_rate": 0.01}, {"w": p_np}, [{"w": g_np}])
    np.testing.assert_allclose(got, want["w"], rtol=1e-12, atol=1e-12)


def test_cubed_arrays_are_not_taken_for_writeable() -> None:
    """What the execution layer believes of Cubed arrays, from what their type can do."""
    cubed = library("cubed")
    from xpoptim._compat import is_lazy_array, is_writeable_array

    a = cubed.from_array(np.ones(4), chunks=2, spec=cubed.Spec(executor_name="raise-if-computes"))
    assert is_lazy_array(a)  # decided without computing (the executor would raise)
    assert not is_writeable_array(a)
    with pytest.raises(TypeError, match="in place"):
        xpoptim.SGD().step([type("Layer", (), {"params": {"w": (a, a)}})()])


# -- ndonnx -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "config"), cases())
def test_ndonnx_arrays_with_values_match_reference(kind: str, config: dict[str, Any]) -> None:
    ndx = library("ndonnx")
    params_np, grads_np = problem()
    opt = getattr(xpoptim, kind)(**config)
    params = {k: ndx.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(params, {k: ndx.asarray(v) for k, v in grads.items()}, state)
    fields = [f for f in type(state)._fields[1:] if isinstance(getattr(state, f), dict)]
    got = {k: p.unwrap_numpy() for k, p in params.items()}
    buffers = {f: {k: v.unwrap_numpy() for k, v in getattr(state, f).items()} for f in fields}
    assert_matches_reference(kind, config, got, buffers)


@pytest.mark.parametrize(("kind", "config"), cases()[::2])
def test_ndonnx_symbolic_steps_export_as_an_onnx_model(kind: str, config: dict[str, Any]) -> None:
    """Parameters and gradients as ONNX graph inputs (no values: nothing can be computed
    during update); the three steps built into a model and run by onnxruntime."""
    ndx = library("ndonnx")
    ort = pytest.importorskip("onnxruntime")
    params_np, grads_np = problem()
    opt = getattr(xpoptim, kind)(**config)
    inputs = {
        f"in.{k}": ndx.argument(shape=v.shape, dtype=ndx.float64) for k, v in params_np.items()
    }
    grad_inputs = [
        {f"g{i}.{k}": ndx.argument(shape=v.shape, dtype=ndx.float64) for k, v in g.items()}
        for i, g in enumerate(grads_np)
    ]
    params = {k: inputs[f"in.{k}"] for k in params_np}
    state = opt.init(params)
    for i, grads in enumerate(grad_inputs):
        params, state = opt.update(params, {k: grads[f"g{i}.{k}"] for k in params_np}, state)
    fields = [f for f in type(state)._fields[1:] if isinstance(getattr(state, f), dict)]
    outputs = {f"out.{k}": p for k, p in params.items()}
    for field in fields:
        outputs.update({f"{field}.{k}": v for k, v in getattr(state, field).items()})
    all_inputs = {**inputs, **{k: v for g in grad_inputs for k, v in g.items()}}
    model = ndx.build(all_inputs, outputs)
    session = ort.InferenceSession(model.SerializeToString())
    feed = {f"in.{k}": v for k, v in params_np.items()}
    for i, g in enumerate(grads_np):
        feed.update({f"g{i}.{k}": v for k, v in g.items()})
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(None, feed), strict=True))
    got = {k: results[f"out.{k}"] for k in params_np}
    buffers = {f: {k: results[f"{f}.{k}"] for k in params_np} for f in fields}
    assert_matches_reference(kind, config, got, buffers)


# -- pydata/sparse ------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "config"), cases())
def test_sparse_coo_matches_reference_and_densifies(kind: str, config: dict[str, Any]) -> None:
    sparse = library("sparse")
    params_np, grads_np = problem()
    # Parameters with zeros (a sparse pattern), dense gradients (as backpropagation gives).
    params_np = {k: np.where(np.abs(v) > 0.5, v, 0.0) for k, v in params_np.items()}
    opt = getattr(xpoptim, kind)(**config)
    params = {k: sparse.COO.from_numpy(v) for k, v in params_np.items()}
    assert all(p.nnz < p.size for p in params.values())
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(
            params, {k: sparse.COO.from_numpy(v) for k, v in grads.items()}, state
        )
    assert all(isinstance(p, sparse.COO) and p.nnz == p.size for p in params.values())
    fields = [f for f in type(state)._fields[1:] if isinstance(getattr(state, f), dict)]
    got = {k: p.todense() for k, p in params.items()}
    buffers = {f: {k: v.todense() for k, v in getattr(state, f).items()} for f in fields}
    want_params, want_state = reference.run(kind, config, params_np, grads_np)
    for name, want in want_params.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-12, err_msg=name)
    for field, buffers_want in want_state.items():
        for name, want in buffers_want.items():
            np.testing.assert_allclose(buffers[field][name], want, rtol=1e-12, atol=1e-12)
