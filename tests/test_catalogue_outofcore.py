"""Elementwise optimizers of issue 11 out of core: a step of `OutOfCore` gives the bits of
the in-memory optimizer (each chunk is stepped alone, which an elementwise rule allows)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
pytest.importorskip("zarr", reason="the out-of-core optimizer needs zarr (.[dask])")

import xpoptim

SHAPES = {"dense.weights": (13, 7), "dense.bias": (7,)}
CHUNKS = {"dense.weights": (4, 7), "dense.bias": (3,)}


OPTIMIZERS = {
    "Adagrad": xpoptim.Adagrad(0.1, weight_decay=0.01, initial_accumulator_value=0.1),
    "Adadelta": xpoptim.Adadelta(),
    "Adamax": xpoptim.Adamax(),
    "NAdam": xpoptim.NAdam(),
    "RAdam": xpoptim.RAdam(),
    "Rprop": xpoptim.Rprop(),  # step sizes start at the learning rate
    "Lion": xpoptim.Lion(0.01, weight_decay=0.1),
    "ScheduleFreeAdamW": xpoptim.ScheduleFreeAdamW(),  # z starts at the parameters
}


@pytest.mark.parametrize("engine", ["directory", "icechunk"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_out_of_core_step_equals_the_in_memory_one(tmp_path, optimizer, engine):
    if engine == "icechunk":
        pytest.importorskip("icechunk", reason="the Icechunk engine needs icechunk (.[icechunk])")
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in "ab"]
    store = xpoptim.OutOfCore.create(
        tmp_path / "s", optimizer, params, chunks=CHUNKS, engine=engine
    )
    want = {k: v.copy() for k, v in params.items()}
    state = optimizer.init(want)
    for g in grads:
        store.step(g, num_workers=2)
        want, state = optimizer.update(want, g, state)
    got_params, got_state = store.read()
    for name in params:
        assert np.array_equal(got_params[name], want[name]), name
        for field in optimizer._buffer_fields():
            assert np.array_equal(getattr(got_state, field)[name], getattr(state, field)[name])
