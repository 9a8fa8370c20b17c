"""The fast path is NumPy's alone: every other backend runs exactly as before."""

from __future__ import annotations

import numpy as np

import xpoptim

from conftest import Backend


def test_every_backend_gives_the_same_result_with_fast_on_or_off(backend: Backend):
    rng = np.random.default_rng(3)
    shapes = {"conv.weights": (13, 97), "conv.bias": (1000,)}
    params_np = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads_np = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(3)]
    results = []
    for options in ({"fast": False}, {"fast": True, "num_threads": 2, "block_size": 256}):
        with xpoptim.execution_options(**options):
            opt = xpoptim.Adam()
            params = {k: backend.asarray(v) for k, v in params_np.items()}
            state = opt.init(params)
            for g in grads_np:
                params, state = opt.update(
                    params, {k: backend.asarray(v) for k, v in g.items()}, state
                )
        results.append({k: backend.to_numpy(v) for k, v in params.items()})
    for name, want in results[0].items():
        assert results[1][name].tobytes() == want.tobytes(), name
    assert not np.array_equal(results[0]["conv.bias"], params_np["conv.bias"])  # it stepped
