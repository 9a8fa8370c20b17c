"""The NumPy fast paths (compiled and blocked) against the plain per-parameter path and
the float64 reference.

Each fast path must give bit-identical results to the plain path (every element goes
through the same operations in the same order), for one big parameter split into many
blocks or thread parts, many small parameters packed into groups, mixed dtypes,
non-contiguous and read-only inputs, through ``update`` and ``step(layers)``. Blocks are
made small here (``block_size=256``), and so is the size from which the compiled path
splits a step across threads, so that small arrays exercise every branch quickly.
"""

from __future__ import annotations

import threading
import tracemalloc
from typing import Any

import array_api_compat
import numpy as np
import pytest

import xpoptim
from xpoptim._execution import blocked
from xpoptim._execution import options as execution
from xpoptim._execution import threads as pool
from xpoptim._execution.compiled import numpy_path

import reference
from conftest import selected_backends, tolerance, used_fields

OPTIMIZERS = [
    ("SGD", {"learning_rate": 0.05, "momentum": 0.8}),
    ("RMSprop", {"learning_rate": 0.01, "decay_rate": 0.8, "epsilon": 1e-6}),
    ("Adam", {"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.95, "epsilon": 1e-7}),
]
REGULARIZATIONS = ["L1", "L2", None]
STEPS = 3
SMALL_BLOCK = 256

# NumPy's own fast path: run once, in the NumPy session (or when all backends run).
pytestmark = pytest.mark.skipif(
    "numpy" not in selected_backends(), reason="NumPy fast path: tested in the numpy session"
)
PATHS = {
    "blocked": {"fast": True, "compile": False, "num_threads": 2, "block_size": SMALL_BLOCK},
    "compiled": {"fast": True, "num_threads": 2},
}


@pytest.fixture(params=list(PATHS))
def fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The options of one NumPy fast path (compiled: split across threads from 256
    elements on, so that small arrays are cut into thread parts too)."""
    if request.param == "compiled":
        pytest.importorskip("numba", reason="the compiled path needs numba")
        monkeypatch.setattr(numpy_path, "PARALLEL_MIN_ELEMENTS", 256)
    return PATHS[request.param]


def opt_id(case: tuple[str, dict[str, Any]]) -> str:
    return case[0]


def bits(a: np.ndarray) -> bytes:
    """The exact bytes of ``a`` in C order (so -0.0 != 0.0 and NaN payloads count)."""
    return np.ascontiguousarray(a).tobytes()


def problem(kind: str, seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Parameters of one layout kind and ``STEPS`` gradients for them."""
    rng = np.random.default_rng(seed)
    if kind == "big":
        # 7.3 blocks, not a multiple of the block size or of 64.
        shapes = {"dense.weights": (1873,)}
    elif kind == "big-2d":
        shapes = {"conv.weights": (13, 97), "conv.bias": (1000,)}
    elif kind == "many-small":
        # Sizes 1..~120, weights and biases interleaved (two scalar groups), a 0-d one.
        shapes = {}
        for i in range(40):
            shapes[f"{i}.weights"] = (1 + (i * 7) % 11, 1 + i % 9)
            shapes[f"{i}.bias"] = (1 + i % 5,)
        shapes["scale"] = ()
    else:
        raise AssertionError(kind)
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(STEPS)]
    return params, grads


def run_update(
    kind: str,
    config: dict[str, Any],
    params: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    **options: Any,
) -> tuple[dict[str, np.ndarray], Any]:
    with xpoptim.execution_options(**options):
        opt = getattr(xpoptim, kind)(**config)
        state = opt.init(params)
        for g in grads:
            params, state = opt.update(params, g, state)
    return params, state


def assert_bit_identical(fast: tuple[Any, Any], plain: tuple[Any, Any]) -> None:
    (p_fast, s_fast), (p_plain, s_plain) = fast, plain
    assert s_fast.step == s_plain.step
    for name, want in p_plain.items():
        assert p_fast[name].dtype == want.dtype, name
        assert p_fast[name].shape == want.shape, name
        assert bits(p_fast[name]) == bits(want), name
    for field in used_fields(s_plain):
        for name, want in getattr(s_plain, field).items():
            got = getattr(s_fast, field)[name]
            assert bits(got) == bits(want), (field, name)


def copies(arrays: dict[str, np.ndarray], dtype: Any) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=dtype) for k, v in arrays.items()}


@pytest.mark.parametrize("case", OPTIMIZERS, ids=opt_id)
@pytest.mark.parametrize("reg", REGULARIZATIONS, ids=str)
@pytest.mark.parametrize("layout", ["big", "big-2d", "many-small"])
def test_fast_path_is_bit_identical_to_plain_and_matches_reference(fast, case, reg, layout, dtype):
    kind, kwargs = case
    config = {**kwargs, "regularization": reg, "weight_decay": 0.05}
    params_np, grads_np = problem(layout)
    params_np = copies(params_np, dtype)
    grads_np = [copies(g, dtype) for g in grads_np]

    plain = run_update(kind, config, copies(params_np, dtype), grads_np, fast=False)
    fast = run_update(kind, config, copies(params_np, dtype), grads_np, **fast)
    assert_bit_identical(fast, plain)

    want_params, want_state = reference.run(kind, config, params_np, grads_np)
    for name, want in want_params.items():
        np.testing.assert_allclose(fast[0][name], want, **tolerance(dtype), err_msg=name)
    for field, buffers in want_state.items():
        for name, want in buffers.items():
            got = getattr(fast[1], field)[name]
            np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=name)


def test_fast_path_updates_in_place_and_state_is_flat(fast):
    params_np, grads_np = problem("many-small")
    params = copies(params_np, np.float32)
    with xpoptim.execution_options(**fast):
        opt = xpoptim.Adam()
        state = opt.init(params)
        new_params, new_state = opt.update(params, copies(grads_np[0], np.float32), state)
    for name, p in params.items():
        assert new_params[name] is p, name
        assert new_state.momentums[name] is state.momentums[name], name
    # The state of parameters smaller than a block lives in one flat buffer per field.
    bases = {id(m.base) for m in state.momentums.values()}
    assert len(bases) == 1
    assert not any(np.shares_memory(state.momentums[k], state.velocities[k]) for k in params)


@pytest.mark.parametrize("case", OPTIMIZERS, ids=opt_id)
def test_mixed_dtypes_and_foreign_state(fast, case):
    """float32 and float64 parameters in one step, and a state the user replaced in part
    (not side by side in the flat buffer any more): still bit-identical."""
    kind, kwargs = case
    params_np, grads_np = problem("many-small")
    dtypes = {k: (np.float32 if i % 3 else np.float64) for i, k in enumerate(params_np)}

    def cast(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.array(v, dtype=dtypes[k]) for k, v in arrays.items()}

    results = []
    for options in ({"fast": False}, fast):
        with xpoptim.execution_options(**options):
            opt = getattr(xpoptim, kind)(**kwargs)
            params = cast(params_np)
            state = opt.init(params)
            params, state = opt.update(params, cast(grads_np[0]), state)
            for field in used_fields(state):
                buffers = getattr(state, field)
                buffers["3.weights"] = buffers["3.weights"].copy()
            for g in grads_np[1:]:
                params, state = opt.update(params, cast(g), state)
        results.append((params, state))
    assert_bit_identical(results[1], results[0])


def non_contiguous(a: np.ndarray, how: str) -> np.ndarray:
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "strided":
        big = np.zeros((a.shape[0], 2 * a.shape[1]), dtype=a.dtype)
        big[:, ::2] = a
        return big[:, ::2]
    if how == "transposed":
        return np.ascontiguousarray(a.T).T
    raise AssertionError(how)


@pytest.mark.parametrize("case", OPTIMIZERS, ids=opt_id)
@pytest.mark.parametrize("layout", ["fortran", "strided", "transposed", "mixed"])
@pytest.mark.parametrize("shape", [(37, 61), (3, 700)], ids=["rows", "long-rows"])
def test_non_contiguous_inputs(fast, case, layout, shape):
    kind, kwargs = case
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(STEPS)]
    p_how = "strided" if layout == "mixed" else layout
    g_how = "fortran" if layout == "mixed" else layout

    results = []
    for options in ({"fast": False}, fast):
        params = {"w": non_contiguous(p0, p_how)}
        assert not params["w"].flags.c_contiguous
        steps = [{"w": non_contiguous(g, g_how)} for g in grads]
        results.append(run_update(kind, kwargs, params, steps, **options))
    assert_bit_identical(results[1], results[0])
    want, _ = reference.run(kind, kwargs, {"w": p0}, [{"w": g} for g in grads])
    np.testing.assert_allclose(results[1][0]["w"], want["w"], **tolerance(np.dtype("float32")))


@pytest.mark.parametrize("case", OPTIMIZERS, ids=opt_id)
@pytest.mark.parametrize("layout", ["big", "many-small"])
def test_read_only_inputs_are_never_written(fast, case, layout):
    kind, kwargs = case
    params_np, grads_np = problem(layout)
    results = []
    for options in ({"fast": False}, fast):
        params = copies(params_np, np.float64)
        for p in params.values():
            p.flags.writeable = False
        grads = [copies(g, np.float64) for g in grads_np]
        for g in grads:
            for a in g.values():
                a.flags.writeable = False
        results.append(run_update(kind, kwargs, params, grads, **options))
        for name, p in params.items():
            assert bits(p) == bits(params_np[name]), name  # the caller's arrays are unchanged
            assert results[-1][0][name] is not p
    assert_bit_identical(results[1], results[0])


class Layer:
    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.weights = params["weights"]
        self.bias = params["bias"]
        self.grads = {k: np.zeros_like(v) for k, v in params.items()}

    @property
    def params(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {
            "weights": (self.weights, self.grads["weights"]),
            "bias": (self.bias, self.grads["bias"]),
        }


@pytest.mark.parametrize("case", OPTIMIZERS, ids=opt_id)
@pytest.mark.parametrize("sizes", [[(40, 50)], [(3, 4)] * 30], ids=["big", "many-small"])
def test_step_layers_fast_equals_plain_and_reference(fast, case, sizes):
    kind, kwargs = case
    rng = np.random.default_rng(2)
    init = [{"weights": rng.normal(size=s), "bias": rng.normal(size=s[1:])} for s in sizes]
    grads = [
        [{k: rng.normal(size=v.shape) for k, v in layer.items()} for layer in init]
        for _ in range(STEPS)
    ]
    finals = []
    for options in ({"fast": False}, fast):
        layers = [Layer({k: v.astype(np.float32) for k, v in p.items()}) for p in init]
        with xpoptim.execution_options(**options):
            opt = getattr(xpoptim, kind)(**kwargs)
            for step_grads in grads:
                for layer, g in zip(layers, step_grads, strict=True):
                    for k, v in g.items():
                        layer.grads[k][...] = v
                opt.step([*layers, object()])
        finals.append(
            {
                f"{i}.{k}": getattr(layer, k)
                for i, layer in enumerate(layers)
                for k in ("weights", "bias")
            }
        )
    for name, want in finals[0].items():
        assert bits(finals[1][name]) == bits(want), name
    flat_init = {f"{i}.{k}": v.astype(np.float32) for i, p in enumerate(init) for k, v in p.items()}
    flat_grads = [
        {f"{i}.{k}": v.astype(np.float32) for i, g in enumerate(step) for k, v in g.items()}
        for step in grads
    ]
    want_params, _ = reference.run(kind, kwargs, flat_init, flat_grads)
    for name, want in want_params.items():
        np.testing.assert_allclose(
            finals[1][name], want, **tolerance(np.dtype("float32")), err_msg=name
        )


# -- memory ----------------------------------------------------------------------------


def peak_extra_bytes(step: Any) -> int:
    """Peak memory allocated during ``step()`` above what was allocated before it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


@pytest.mark.parametrize("kind", ["SGD", "RMSprop", "Adam"])
@pytest.mark.parametrize("layout", ["big", "many-small"])
def test_peak_extra_memory_is_bounded_by_the_block_size(kind, layout):
    block = 4096
    threads = 2
    itemsize = 4
    if layout == "big":
        params = {"w": np.ones(300_000, np.float32)}  # 1.2 MB, ~73 blocks
    else:
        params = {f"{i}.w": np.ones(600, np.float32) for i in range(500)}  # 1.2 MB in all
    grads = {k: np.full_like(v, 0.01) for k, v in params.items()}
    param_bytes = sum(p.nbytes for p in params.values())

    def measure(**options: Any) -> int:
        with xpoptim.execution_options(**options):
            opt = getattr(xpoptim, kind)(regularization="L1")
            state = opt.init(params)
            state = opt.update(params, grads, state)[1]  # warm up (scratch buffers, pool)
            return peak_extra_bytes(lambda: opt.update(params, grads, state))

    fast = measure(fast=True, num_threads=threads, block_size=block)
    plain = measure(fast=False)
    print(f"{kind} {layout}: peak extra bytes fast {fast}, plain {plain}, params {param_bytes}")
    # The plain path makes parameter-sized temporaries (and tracemalloc sees them), the
    # fast path only block-sized ones: a few per thread, whatever the parameters' size.
    if layout == "big":
        assert plain > param_bytes
    assert fast < 12 * threads * block * itemsize + 64 * 1024, (fast, plain)
    assert fast < param_bytes / 2


# -- options and threads ------------------------------------------------------------------


def test_options_are_checked_and_scoped():
    before = execution.current_options()
    with xpoptim.execution_options(num_threads=1, block_size=1024, fast=False) as options:
        assert options == execution.ExecutionOptions(False, 1, 1024)
        assert options.threads() == 1
        with xpoptim.execution_options(block_size=2048) as inner:
            assert inner.num_threads == 1
            assert inner.block_size == 2048
    assert execution.current_options() == before
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        xpoptim.execution_options(num_threads=0).__enter__()
    with pytest.raises(ValueError, match="block_size must be an integer >= 64"):
        xpoptim.execution_options(block_size=8).__enter__()
    with pytest.raises(TypeError, match="fast must be True or False"):
        xpoptim.execution_options(fast=1).__enter__()  # type: ignore[arg-type]


def test_set_execution_options_changes_the_process_default():
    old = execution.current_options()
    try:
        assert xpoptim.set_execution_options(block_size=4096).block_size == 4096
        assert execution.current_options().block_size == 4096
    finally:
        xpoptim.set_execution_options(
            fast=old.fast, block_size=old.block_size, num_threads=old.num_threads
        )


def test_thread_count_follows_the_environment_and_never_exceeds_the_cpus(monkeypatch):
    cpus = pool.available_cpus()
    monkeypatch.delenv("XPOPTIM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert pool.default_num_threads() == cpus
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert pool.default_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")  # not ours to police: ignored
    assert pool.default_num_threads() == cpus
    monkeypatch.setenv("XPOPTIM_NUM_THREADS", str(cpus + 7))
    assert pool.default_num_threads() == cpus
    assert execution.ExecutionOptions(num_threads=cpus + 7).threads() == cpus
    monkeypatch.setenv("XPOPTIM_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="XPOPTIM_NUM_THREADS must be a positive integer"):
        pool.default_num_threads()


def test_pool_runs_every_task_once_and_reraises():
    seen: list[int] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        with lock:
            seen.append(i)

    pool.POOL.run([lambda i=i: task(i) for i in range(100)], 2)
    assert sorted(seen) == list(range(100))

    def boom() -> None:
        raise RuntimeError("task failed")

    with pytest.raises(RuntimeError, match="task failed"):
        pool.POOL.run([boom] * 5, 2)


def test_no_nested_pools_and_concurrent_optimizers_agree(fast):
    """Optimizers stepped from several threads at once (each may use the pool; pool
    threads never start a nested pool) give the same bits as one after another."""
    params_np, grads_np = problem("big")

    def train(out: list[Any]) -> None:
        grads = [copies(g, np.float32) for g in grads_np]
        out.append(run_update("Adam", {}, copies(params_np, np.float32), grads, **fast))

    serial: list[Any] = []
    train(serial)
    concurrent: list[Any] = []
    threads = [threading.Thread(target=train, args=(concurrent,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(concurrent) == 3
    for result in concurrent:
        assert_bit_identical(result, serial[0])
    nested: list[bool] = []
    pool.POOL.run([lambda: nested.append(pool.in_pool_thread())] * 4, 2)
    assert all(nested)


def test_thread_tuner_tries_both_then_keeps_the_faster_and_re_explores():
    tuner = pool.ThreadTuner(history=3, explore_every=4)
    key = ("rule", 20)
    assert tuner.choose(key, 1) == 1  # nothing to choose
    first = tuner.choose(key, 4)
    tuner.record(key, first, 2.0)
    second = tuner.choose(key, 4)
    tuner.record(key, second, 1.0)
    assert {first, second} == {1, 4}
    picks = [tuner.choose(key, 4) for _ in range(8)]
    assert picks.count(second) == 6  # the faster one, except when exploring
    assert picks.count(first) == 2
    tuner.explore_every = 10**6  # no more exploring steps: only the timings decide
    # One outlier does not flip the choice (median of the last runs) ...
    tuner.record(key, second, 1.0)
    tuner.record(key, second, 1.0)
    tuner.record(key, second, 100.0)
    assert tuner.choose(key, 4) == second
    # ... a lasting change does.
    tuner.record(key, second, 100.0)
    assert tuner.choose(key, 4) == first


def test_untuned_and_tuned_steps_give_the_same_bits(fast, monkeypatch):
    """Left to xpoptim, the blocked path's thread count is tuned by timing (both counts
    get tried); results do not depend on it. (The compiled path uses every thread it may:
    its pieces are taken in turn, so a busy core costs it little; it is never tuned.)"""
    if fast.get("compile", True):
        pytest.skip("the compiled path is not tuned")
    monkeypatch.delenv("XPOPTIM_NUM_THREADS", raising=False)
    monkeypatch.setattr(execution, "default_num_threads", lambda: 2)
    monkeypatch.setattr(blocked, "TUNER", tuner := pool.ThreadTuner())
    params_np, grads_np = problem("big")
    grads = [copies(g, np.float32) for g in grads_np]
    steps = grads * 2
    plain = run_update("Adam", {}, copies(params_np, np.float32), steps, fast=False)
    untuned_options = {k: v for k, v in fast.items() if k != "num_threads"}
    tuned = run_update("Adam", {}, copies(params_np, np.float32), steps, **untuned_options)
    assert_bit_identical(tuned, plain)
    (times,) = tuner._times.values()
    assert set(times) == {1, 2}
    assert sum(len(t) for t in times.values()) == len(steps)
    # A count that someone set is used as it is, never tuned.
    monkeypatch.setattr(blocked, "TUNER", untouched := pool.ThreadTuner())
    run_update("Adam", {}, copies(params_np, np.float32), grads, **fast)
    monkeypatch.setenv("XPOPTIM_NUM_THREADS", "2")
    run_update("Adam", {}, copies(params_np, np.float32), grads, **untuned_options)
    assert not untouched._times


def test_state_after_a_pickle_round_trip_steps_on_bit_identically(fast):
    """A state restored from a checkpoint is no longer one flat buffer: the fast path
    gathers it instead, with the same bits."""
    import pickle

    params_np, grads_np = problem("many-small")
    grads = [copies(g, np.float32) for g in grads_np]
    results = []
    for options in ({"fast": False}, fast):
        with xpoptim.execution_options(**options):
            opt = xpoptim.Adam(learning_rate=0.01)
            params = copies(params_np, np.float32)
            state = opt.init(params)
            params, state = opt.update(params, grads[0], state)
            params, state = pickle.loads(pickle.dumps((params, state)))
            for g in grads[1:]:
                params, state = opt.update(params, g, state)
        results.append((params, state))
    assert_bit_identical(results[1], results[0])


def _rebinding_rule(p, g, buf, *, xp):
    """A rule that returns new arrays instead of writing (as ``xp.maximum`` forces)."""
    buf = xp.maximum(buf, g)
    p = p - buf
    return p, buf


@pytest.mark.parametrize("layout", ["big", "many-small"])
def test_results_a_rule_rebinds_are_written_back_in_place(fast, layout):
    from xpoptim._execution import run_rule

    params_np, grads_np = problem(layout)
    params = copies(params_np, np.float64)
    buffers = {k: np.full_like(v, 0.25) for k, v in params.items()}
    grads = copies(grads_np[0], np.float64)
    xp = array_api_compat.array_namespace(*params.values())
    with xpoptim.execution_options(**fast):
        new_params, (new_buffers,) = run_rule(
            _rebinding_rule, params, grads, [buffers], shared={}, per_param=lambda name: {}, xp=xp
        )
    for name, p0 in params_np.items():
        want_buf = np.maximum(0.25, grads_np[0][name])
        assert new_params[name] is params[name]
        assert new_buffers[name] is buffers[name]
        np.testing.assert_array_equal(buffers[name], want_buf)
        np.testing.assert_array_equal(params[name], p0 - want_buf)
