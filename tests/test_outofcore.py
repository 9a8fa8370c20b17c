"""The out-of-core optimizer (Zarr on disk, Dask): results, crash safety, bad input.

Results are compared bit for bit with the in-memory optimizer run on NumPy (the issue's
requirement: same rules, same bits) and, with a tolerance, with the independent float64
reference of ``reference.py``. Crash tests kill real step processes with SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="the out-of-core optimizer needs dask (.[dask])")
zarr = pytest.importorskip("zarr", reason="the out-of-core optimizer needs zarr (.[dask])")

import xpoptim  # noqa: E402
from xpoptim._outofcore.demo import (  # noqa: E402
    run_out_of_core_demo,
    run_synthetic_steps,
    synthetic_arrays,
    verify_samples,
)

import reference  # noqa: E402
from conftest import tolerance  # noqa: E402

SHAPES = {"dense.weights": (13, 7), "dense.bias": (7,), "bn.gamma": (5, 2, 3)}
CHUNKS = {"dense.weights": (4, 7), "dense.bias": (3,), "bn.gamma": (2, 2, 2)}
CASES = [
    ("SGD", {"learning_rate": 0.05, "momentum": 0.8, "regularization": "L2"}),
    ("RMSprop", {"learning_rate": 0.01, "decay_rate": 0.8, "regularization": "L1"}),
    ("Adam", {"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.95, "regularization": "L2"}),
    ("Adam", {"learning_rate": 0.02, "regularization": "L1", "weight_decay": 0.05}),
]


def problem(dtype: Any, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def in_memory(optimizer: xpoptim.Optimizer, params: dict, grads_per_step: list) -> list:
    """(params, state) after each step of the in-memory optimizer on NumPy copies."""
    p = {k: v.copy() for k, v in params.items()}
    state = optimizer.init(p)
    history = []
    for grads in grads_per_step:
        p, state = optimizer.update(p, grads, state)
        buffers = {f: {k: v.copy() for k, v in getattr(state, f).items()} for f in fields(state)}
        history.append(({k: v.copy() for k, v in p.items()}, buffers))
    return history


def fields(state: Any) -> tuple[str, ...]:
    return tuple(f for f in type(state)._fields[1:] if getattr(state, f) is not None)


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``directory``: content hash and modification time."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(directory))] = (digest, path.stat().st_mtime_ns)
    return out


def assert_store_equals(store: xpoptim.OutOfCore, params: dict, buffers: dict) -> None:
    got_params, got_state = store.read()
    for name, want in params.items():
        assert np.array_equal(got_params[name], want), f"params[{name}]"
        assert got_params[name].dtype == want.dtype
    for field, values in buffers.items():
        for name, want in values.items():
            assert np.array_equal(getattr(got_state, field)[name], want), f"{field}[{name}]"


@pytest.fixture
def small_store(tmp_path: Path):
    params, grads = problem(np.float32, steps=2)
    store = xpoptim.OutOfCore.create(tmp_path / "s", xpoptim.Adam(), params, chunks=CHUNKS)
    return store, params, grads


# -- results ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]['regularization']}")
def test_equals_in_memory_optimizer_bit_exactly(tmp_path, case, dtype):
    kind, config = case
    steps = 3
    params, grads = problem(dtype, steps)
    optimizer = getattr(xpoptim, kind)(**config)
    store = xpoptim.OutOfCore.create(tmp_path / "s", optimizer, params, chunks=CHUNKS)
    assert store.step_count == 0
    for t, g in enumerate(grads, start=1):
        summary = store.step(g, num_workers=2)
        assert summary.step == t == store.step_count
        assert not summary.skipped
        assert summary.bytes_written == summary.bytes_read > 0
    want_params, want_buffers = in_memory(optimizer, params, grads)[-1]
    assert_store_equals(store, want_params, want_buffers)
    # ... and the independent float64 reference agrees within rounding.
    ref_params, ref_state = reference.run(kind, config, params, grads)
    got_params, got_state = store.read()
    assert got_state.step == steps
    for name, want in ref_params.items():
        np.testing.assert_allclose(got_params[name], want, **tolerance(np.dtype(dtype)))
    for field, values in ref_state.items():
        for name, want in values.items():
            got = getattr(got_state, field)[name]
            np.testing.assert_allclose(got, want, **tolerance(np.dtype(dtype)))
    # Only the committed version is left, uncompressed, checksummed, with the layout described.
    entries = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert entries == ["v3", "xpoptim.json", "xpoptim.lock", "zarr.json"]
    pointer = json.loads((tmp_path / "s" / "xpoptim.json").read_text())
    assert pointer["step"] == steps
    assert pointer["version"] == "v3"
    assert pointer["optimizer"] == optimizer.get_config()
    array = zarr.open_array(tmp_path / "s", path="v3/params/dense.weights", mode="r")
    assert array.compressors == (zarr.codecs.Crc32cCodec(),)
    assert array.chunks == CHUNKS["dense.weights"]


def test_gradients_as_zarr_dask_or_numpy_give_the_same_bits(tmp_path):
    params, grads = problem(np.float32, steps=2)
    want = in_memory(xpoptim.Adam(), params, grads)[-1]
    kinds = {
        "numpy": lambda name, g: g,
        "dask": lambda name, g: da.from_array(g, chunks=CHUNKS[name]),
        "zarr": lambda name, g: zarr.create_array(
            zarr.storage.MemoryStore(), data=g, chunks=CHUNKS[name]
        ),
    }
    for kind, convert in kinds.items():
        store = xpoptim.OutOfCore.create(tmp_path / kind, xpoptim.Adam(), params, chunks=CHUNKS)
        for g in grads:
            store.step({name: convert(name, x) for name, x in g.items()})
        assert_store_equals(store, *want)


def test_open_resumes_with_the_committed_optimizer(tmp_path, small_store):
    store, params, grads = small_store
    store.step(grads[0])
    reopened = xpoptim.OutOfCore.open(store.directory)
    assert reopened.optimizer.get_config() == xpoptim.Adam().get_config()
    assert reopened.step_count == 1
    reopened.step(grads[1], progress=True)
    assert_store_equals(reopened, *in_memory(xpoptim.Adam(), params, grads)[-1])
    assert reopened.names == list(SHAPES)


def test_rerunning_a_committed_step_changes_nothing(small_store):
    store, _, grads = small_store
    store.step(grads[0], step=1)
    before = snapshot(store.directory)
    summary = store.step(grads[1], step=1)  # step 1 is already committed
    assert summary.skipped
    assert "already committed" in str(summary)
    assert snapshot(store.directory) == before
    with pytest.raises(ValueError, match=r"step=3 but the store has committed 1 steps"):
        store.step(grads[1], step=3)
    assert snapshot(store.directory) == before


def test_demo_verifies_sampled_chunks(tmp_path, capsys):
    figures = run_out_of_core_demo(tmp_path / "demo", "2MB", steps=2, chunk_bytes=64 * 1024)
    assert figures["verified_chunks"] == 8
    assert figures["steps"] == 2
    assert figures["peak_rss_bytes"] > 0
    out = capsys.readouterr().out
    assert "verified 8 sampled chunks" in out
    assert "GB/s" in out
    # The check can fail: corrupt one committed value and it must notice.
    store = xpoptim.OutOfCore.open(tmp_path / "demo")
    params, _ = store.arrays()
    writable = zarr.open_array(
        tmp_path / "demo", path=f"{store.version}/params/layer0.bias", mode="r+"
    )
    writable[0] = writable[0] + 1
    assert params["layer0.bias"][0] == writable[0]
    with pytest.raises(AssertionError, match=r"differs from the in-memory optimizer"):
        verify_samples(store, 0, 64, np.random.default_rng(1))


# -- bad input: clear errors, nothing changed on disk ---------------------------------------


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda g: {**g, "dense.bias": g["dense.bias"][:5]}, ValueError, r"has shape \(5,\)"),
        (
            lambda g: {**g, "dense.bias": g["dense.bias"].astype(np.float64)},
            TypeError,
            r"grads\['dense.bias'\] has dtype float64, the parameter float32",
        ),
        (
            lambda g: {**g, "dense.weights": da.from_array(g["dense.weights"], chunks=(5, 7))},
            ValueError,
            r"grads\['dense.weights'\] has chunks \(5, 7\), the parameter \(4, 7\)",
        ),
        (
            lambda g: {k: v for k, v in g.items() if k != "bn.gamma"},
            ValueError,
            r"missing \['bn.gamma'\]",
        ),
        (lambda g: {**g, "extra": g["dense.bias"]}, ValueError, r"unexpected \['extra'\]"),
        (lambda g: {**g, "dense.bias": [0.0] * 7}, TypeError, r"is not an array"),
    ],
    ids=["shape", "dtype", "chunks", "missing", "extra", "not-array"],
)
def test_bad_gradient_is_refused_and_nothing_changes(small_store, mutate, error, match):
    store, _, grads = small_store
    store.step(grads[0])
    before = snapshot(store.directory)
    with pytest.raises(error, match=match):
        store.step(mutate(grads[1]))
    assert snapshot(store.directory) == before
    assert store.step_count == 1


def test_mismatched_gradient_chunks_are_rechunked_on_request(small_store):
    store, params, grads = small_store
    odd = {k: da.from_array(v, chunks=1) for k, v in grads[0].items()}
    store.step(odd, rechunk=True)
    assert_store_equals(store, *in_memory(xpoptim.Adam(), params, grads[:1])[-1])


def test_missing_array_is_reported_and_nothing_changes(small_store):
    store, _, grads = small_store
    shutil.rmtree(store.directory / "v0" / "momentums" / "dense.bias")
    before = snapshot(store.directory)
    with pytest.raises(xpoptim.StoreError, match=r"v0/momentums/dense.bias is missing"):
        xpoptim.OutOfCore.open(store.directory)
    with pytest.raises(xpoptim.StoreError, match=r"v0/momentums/dense.bias is missing"):
        store.step(grads[0])
    assert snapshot(store.directory) == before


def test_altered_array_is_reported(small_store):
    store, _, _ = small_store
    zarr.create_array(
        zarr.storage.LocalStore(store.directory),
        name="v0/params/dense.bias",
        shape=(7,),
        chunks=(7,),
        dtype="float64",
        overwrite=True,
    )
    with pytest.raises(xpoptim.StoreError, match=r"v0/params/dense.bias is .*float64"):
        xpoptim.OutOfCore.open(store.directory)


def test_store_of_another_optimizer_is_refused(small_store):
    store, _, _ = small_store
    before = snapshot(store.directory)
    with pytest.raises(xpoptim.StoreError, match=r"written by the optimizer Adam, not SGD"):
        xpoptim.OutOfCore.open(store.directory, xpoptim.SGD())
    with pytest.raises(xpoptim.StoreError, match=r"pass reconfigure=True"):
        xpoptim.OutOfCore.open(store.directory, xpoptim.Adam(learning_rate=0.5))
    assert snapshot(store.directory) == before
    # A schedule may change hyperparameters on purpose; the next commit records them.
    store = xpoptim.OutOfCore.open(
        store.directory, xpoptim.Adam(learning_rate=0.5), reconfigure=True
    )
    store.step({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    assert xpoptim.OutOfCore.open(store.directory).optimizer.learning_rate == 0.5


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("format_version", r"format version 99; this xpoptim reads version 2"),
        ("format", r"not an xpoptim out-of-core store"),
        ("pointer", r"no committed step"),
        ("root", r"not an xpoptim out-of-core store \(no zarr.json\)"),
    ],
)
def test_store_of_another_version_or_kind_is_refused(small_store, edit, match):
    store, _, _ = small_store
    root = store.directory / "zarr.json"
    if edit in ("format_version", "format"):
        meta = json.loads(root.read_text())
        meta["attributes"]["xpoptim"][edit] = 99 if edit == "format_version" else "other"
        root.write_text(json.dumps(meta))
    elif edit == "pointer":
        (store.directory / "xpoptim.json").unlink()
    else:
        root.unlink()
    before = snapshot(store.directory)
    with pytest.raises(xpoptim.StoreError, match=match):
        xpoptim.OutOfCore.open(store.directory)
    assert snapshot(store.directory) == before


def test_create_refuses_bad_arguments(tmp_path):
    params, _ = problem(np.float32, 0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(xpoptim.StoreError, match=r"not empty and is not an xpoptim .*'keep.txt'"):
        xpoptim.OutOfCore.create(tmp_path / "full", xpoptim.Adam(), params)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"params name 'a/b' cannot name a Zarr array"):
        xpoptim.OutOfCore.create(tmp_path / "x", xpoptim.Adam(), {"a/b": params["dense.bias"]})
    with pytest.raises(TypeError, match=r"real floating"):
        xpoptim.OutOfCore.create(tmp_path / "y", xpoptim.Adam(), {"w": np.arange(3)})
    with pytest.raises(
        TypeError, match=r"optimizer must be one of xpoptim's elementwise optimizers"
    ):
        xpoptim.OutOfCore.create(tmp_path / "z", object(), params)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"not a directory"):
        xpoptim.OutOfCore.open(tmp_path / "nowhere")


# -- in-memory Dask: no unbounded lazy chains -------------------------------------------------


def test_chained_lazy_steps_warn_and_persist_keeps_the_graph_small():
    params, grads = problem(np.float64, steps=45)
    opt = xpoptim.Adam(learning_rate=0.01)
    lazy = {k: da.from_array(v, chunks=3) for k, v in params.items()}
    state = opt.init(lazy)
    dask_grads = [{k: da.from_array(v, chunks=3) for k, v in g.items()} for g in grads]
    # The plain lazy path adds ~14 graph layers a step (the compiled one 2: see
    # test_compiled.py), so the plain path reaches the warning first.
    with xpoptim.execution_options(compile=False):
        for g in dask_grads[:20]:  # 20 chained steps: still quiet (filterwarnings=error)
            lazy, state = opt.update(lazy, g, state)
        with pytest.warns(xpoptim.LazyGraphWarning, match=r"xpoptim.persist\(params, state\)"):  # noqa: PT031
            for g in dask_grads[20:]:  # by 45 chained steps it must have warned
                lazy, state = opt.update(lazy, g, state)

    p = {k: da.from_array(v, chunks=3) for k, v in params.items()}
    state = opt.init(p)
    grads = grads[:25]
    for g in dask_grads[:25]:  # filterwarnings=error: any warning here fails the test
        p, state = opt.update(p, g, state)
        p, state = xpoptim.persist(p, state)
        assert len(p["dense.weights"].dask.layers) == 1
    want_params, want_state = reference.run("Adam", opt.get_config(), params, grads)
    for name, want in want_params.items():
        np.testing.assert_allclose(p[name].compute(), want, rtol=1e-12, atol=1e-12)
    for field, values in want_state.items():
        for name, want in values.items():
            got = getattr(state, field)[name].compute()
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    eager = {k: v.copy() for k, v in params.items()}
    assert xpoptim.persist(eager, opt.init(eager))[0] is eager


def _max_layers(tree: Any) -> int:
    if isinstance(tree, dict):
        return max((_max_layers(v) for v in tree.values()), default=0)
    if isinstance(tree, tuple):
        return max((_max_layers(v) for v in tree), default=0)
    return len(tree.dask.layers) if hasattr(tree, "dask") else 0


@pytest.mark.parametrize("wrapper", ["MultiSteps", "ParamGroups"])
def test_persist_reaches_the_state_inside_wrappers(wrapper):
    """The wrappers nest the inner optimizer's state: persist must reach it too."""
    params = {"enc.w": np.ones(6), "head.w": np.ones(6)}
    if wrapper == "MultiSteps":
        opt = xpoptim.transforms.MultiSteps(xpoptim.Adam(), every_k=2)
    else:
        opt = xpoptim.transforms.ParamGroups(
            xpoptim.Adam(), [{"params": ["enc.*"], "learning_rate": 0.01}]
        )
    p = {k: da.from_array(v, chunks=3) for k, v in params.items()}
    state = opt.init(p)
    for _ in range(8):
        p, state = opt.update(p, {k: da.ones(6, chunks=3) for k in p}, state)
        p, state = xpoptim.persist(p, state)
        assert _max_layers(p) == 1
        assert _max_layers(state) <= 1


# -- crash safety: SIGKILL of real step processes ------------------------------------------------

KILL_SEED = 7
KILL_STEPS = 12


def step_process(ctx: Any, directory: Path, crash_at: str | None, ready: Any) -> Any:
    """A process that resumes the store and steps it to KILL_STEPS (crashing if asked)."""
    kwargs = {"seed": KILL_SEED, "delay_s": 0.002, "num_workers": 2}
    kwargs.update(crash_at=crash_at, ready=ready)
    return ctx.Process(target=run_synthetic_steps, args=(str(directory), KILL_STEPS), kwargs=kwargs)


def _kill_layout_params() -> dict[str, Any]:
    layout = {
        "a.weights": {"shape": [40, 30], "dtype": "float32", "chunks": [8, 30]},
        "a.bias": {"shape": [30], "dtype": "float32", "chunks": [10]},
        "b.weights": {"shape": [64, 16], "dtype": "float64", "chunks": [16, 8]},
    }
    return {k: v.compute() for k, v in synthetic_arrays(layout, KILL_SEED, 0).items()}, layout


@pytest.mark.slow
def test_sigkill_at_random_moments_never_tears_the_store(tmp_path):
    params, layout = _kill_layout_params()
    grads = [
        {k: v.compute() for k, v in synthetic_arrays(layout, KILL_SEED, t).items()}
        for t in range(1, KILL_STEPS + 1)
    ]
    optimizer = xpoptim.Adam(learning_rate=0.01)
    zeros = {
        f: {k: np.zeros_like(v) for k, v in params.items()} for f in ("momentums", "velocities")
    }
    history = [(params, zeros), *in_memory(optimizer, params, grads)]  # index = step
    directory = tmp_path / "killed"
    chunks = {k: tuple(m["chunks"]) for k, m in layout.items()}
    xpoptim.OutOfCore.create(directory, optimizer, params, chunks=chunks)

    ctx = multiprocessing.get_context("forkserver")
    # Children fork from a server that has imported everything once: they start at once.
    preload = ["xpoptim._outofcore.demo", "dask.array", "zarr", "pytest", "distributed"]
    ctx.set_forkserver_preload(preload)
    rng = random.Random(1234)
    # Deterministic crashes at every phase boundary first, then kills at random times.
    plan: list[str | None] = [
        *(_phase for _phase in ("created", "stored", "flushed", "committed", "collected")),
        *([None] * 20),
    ]
    trials = torn = 0
    seen_steps = []
    for crash_phase in plan:
        ready = ctx.Event()
        child = step_process(ctx, directory, crash_phase, ready)
        child.start()
        assert ready.wait(30), "the step process did not start"
        if crash_phase is None:
            time.sleep(rng.uniform(0.0, 0.5))
            child.kill()
        child.join(30)
        if child.exitcode == 0:  # finished all steps before the kill
            break
        assert child.exitcode == -signal.SIGKILL
        trials += 1
        store = xpoptim.OutOfCore.open(directory)
        k = store.step_count
        seen_steps.append(k)
        try:
            assert_store_equals(store, *history[k])
        except AssertionError:
            torn += 1
    # Resume without interruption to the end; it must equal the uninterrupted run.
    ready = ctx.Event()
    child = step_process(ctx, directory, None, ready)
    child.start()
    child.join(60)
    assert child.exitcode == 0
    print(f"{trials} kills, committed steps seen: {seen_steps}")
    assert torn == 0, f"{torn} torn states in {trials} kills"
    # 5 kills at the phase boundaries, then random ones until the steps ran out (how
    # many depends on the machine's speed).
    assert trials >= 8, seen_steps
    # Crashes before the commit of step 1 leave step 0; after it, step 1; then step 2.
    assert seen_steps[:5] == [0, 0, 0, 1, 2]
    store = xpoptim.OutOfCore.open(directory)
    assert store.step_count == KILL_STEPS
    assert_store_equals(store, *history[-1])
    # Re-running the last step is a no-op that also removes what a kill after the last
    # commit left behind.
    assert store.step(grads[-1], step=KILL_STEPS).skipped
    assert_store_equals(store, *history[-1])
    assert sorted(p.name for p in directory.iterdir()) == [
        f"v{KILL_STEPS}",
        "xpoptim.json",
        "xpoptim.lock",
        "zarr.json",
    ]


# -- dask.distributed ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")
def test_worker_killed_mid_step_on_a_local_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    params, layout = _kill_layout_params()
    layout = {k: {**m, "shape": [m["shape"][0] * 4, *m["shape"][1:]]} for k, m in layout.items()}
    params = {k: v.compute() for k, v in synthetic_arrays(layout, KILL_SEED, 0).items()}
    grads = {k: v.compute() for k, v in synthetic_arrays(layout, KILL_SEED, 1).items()}
    optimizer = xpoptim.Adam(learning_rate=0.01, regularization="L1")
    want = in_memory(optimizer, params, [grads])[-1]
    chunks = {k: tuple(m["chunks"]) for k, m in layout.items()}
    with (
        distributed.LocalCluster(
            host="127.0.0.1",
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # a free port: 8787 may be taken
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        store = xpoptim.OutOfCore.create(
            tmp_path / "d", optimizer, params, chunks=chunks, client=client
        )
        slow = synthetic_arrays(store.layout, KILL_SEED, 1, delay_s=0.05)  # ~3 s of work
        result: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: result.setdefault("summary", store.step(slow, client=client))
        )
        worker.start()
        version = store.directory / "v1"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            written = [p for p in version.rglob("*") if p.is_file() and "c" in p.parts]
            if len(written) >= 6:
                break
            time.sleep(0.02)
        assert "summary" not in result, "the step finished before the worker could be killed"
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        worker.join(60)
        assert "summary" in result, "the step did not complete after the worker was killed"
        assert result["summary"].step == 1
        assert victim not in client.run(os.getpid).values()
    assert_store_equals(store, *want)


def test_a_reduce_on_plateau_schedule_drives_the_steps(tmp_path):
    """The steps use the schedule object the user observes, not a fresh copy of it."""
    schedule = xpoptim.schedules.ReduceOnPlateau(0.1, factor=0.5, patience=0)
    opt = xpoptim.SGD(learning_rate=schedule, momentum=0.0, regularization=None)
    store = xpoptim.OutOfCore.create(tmp_path / "s", opt, {"w": np.ones(4)}, chunks=(2,))
    schedule.observe(1.0)
    schedule.observe(2.0)  # no improvement, patience 0: the rate halves to 0.05
    store.step({"w": np.ones(4)}, step=1)
    np.testing.assert_allclose(store.read()[0]["w"], np.full(4, 1.0 - 0.05), rtol=1e-12)


def test_create_refuses_a_config_it_cannot_store_before_writing(tmp_path):
    opt = xpoptim.SGD(learning_rate=lambda count: 0.1)
    with pytest.raises(TypeError, match="config cannot be stored as JSON"):
        xpoptim.OutOfCore.create(tmp_path / "s", opt, {"w": np.ones(4)}, chunks=(2,))
    assert not (tmp_path / "s").exists()
