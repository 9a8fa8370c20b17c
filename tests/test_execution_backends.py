"""Every backend gives the same result with the fast paths on or off.

The fast paths are the compiled kernels (NumPy, Dask chunks, CuPy, PyTorch CPU tensors)
and NumPy's blocked path; every other backend runs exactly as before. PyTorch is the one
backend whose own operators do not give the standard's IEEE results bit for bit (its
vectorized CPU kernels round some operations differently, division by a scalar among
them): its compiled step gives NumPy's bits instead, and its plain path agrees with them
to rounding.
"""

from __future__ import annotations

import numpy as np

import xpoptim

from conftest import Backend


def run(backend: Backend, options: dict[str, object]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    shapes = {"conv.weights": (13, 97), "conv.bias": (1000,)}
    params_np = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads_np = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(3)]
    with xpoptim.execution_options(**options):
        opt = xpoptim.Adam()
        params = {k: backend.asarray(v) for k, v in params_np.items()}
        state = opt.init(params)
        for g in grads_np:
            params, state = opt.update(params, {k: backend.asarray(v) for k, v in g.items()}, state)
    out = {k: backend.to_numpy(v) for k, v in params.items()}
    assert not np.array_equal(out["conv.bias"], params_np["conv.bias"])  # it stepped
    return out


def test_every_backend_gives_the_same_result_with_fast_on_or_off(backend: Backend):
    plain = run(backend, {"fast": False})
    fast = run(backend, {"fast": True, "num_threads": 2, "block_size": 256})
    if backend.name == "torch":
        numpy_plain = run(Backend("numpy", "numpy", eager_writeable=True), {"fast": False})
        for name, want in numpy_plain.items():
            assert fast[name].tobytes() == want.tobytes(), name
            np.testing.assert_allclose(plain[name], want, rtol=1e-12, atol=1e-14)
        return
    for name, want in plain.items():
        assert fast[name].tobytes() == want.tobytes(), name
