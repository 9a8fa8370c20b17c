"""Learning-rate schedules: their values against the reference formulas and optax/torch,
and optimizers driven by them on every backend, in ``step(layers)``, under ``jax.jit`` and
lazily on Dask."""

from __future__ import annotations

import json

import numpy as np
import pytest

import xpoptim
from xpoptim import schedules

import reference
from conftest import Backend, tolerance

COUNTS = range(40)

# (xpoptim schedule, reference schedule)
SCHEDULES = {
    "constant": (schedules.Constant(0.3), reference.constant(0.3)),
    "step": (schedules.StepDecay(0.5, step_size=7, gamma=0.3), reference.step_decay(0.5, 7, 0.3)),
    "exponential": (
        schedules.ExponentialDecay(0.2, transition_steps=6, decay_rate=0.5),
        reference.exponential_decay(0.2, 6, 0.5),
    ),
    "exponential-staircase": (
        schedules.ExponentialDecay(0.2, transition_steps=6, decay_rate=0.5, staircase=True),
        reference.exponential_decay(0.2, 6, 0.5, staircase=True),
    ),
    "warmup-cosine": (
        schedules.WarmupCosineDecay(0.01, 0.4, warmup_steps=5, decay_steps=30, end_value=0.02),
        reference.warmup_cosine_decay(0.01, 0.4, 5, 30, 0.02),
    ),
    "cosine-no-warmup": (
        schedules.WarmupCosineDecay(0.0, 0.4, warmup_steps=0, decay_steps=25),
        reference.warmup_cosine_decay(0.0, 0.4, 0, 25),
    ),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_values_match_reference(name):
    ours, ref = SCHEDULES[name]
    for count in COUNTS:
        got = ours(count)
        assert isinstance(got, float), (count, type(got))
        assert got == pytest.approx(ref(count), rel=1e-12, abs=1e-15), count


def test_schedules_match_optax():
    optax = pytest.importorskip("optax")
    pairs = [
        (
            SCHEDULES["warmup-cosine"][0],
            optax.warmup_cosine_decay_schedule(0.01, 0.4, 5, 30, end_value=0.02),
        ),
        (SCHEDULES["exponential"][0], optax.exponential_decay(0.2, 6, 0.5)),
        (
            SCHEDULES["exponential-staircase"][0],
            optax.exponential_decay(0.2, 6, 0.5, staircase=True),
        ),
    ]
    for ours, theirs in pairs:
        for count in COUNTS:
            # optax computes in float32 unless x64 is on.
            assert ours(count) == pytest.approx(float(theirs(count)), rel=1e-5), (ours, count)


def test_step_decay_and_plateau_match_torch():
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.3)
    ours = schedules.StepDecay(0.5, step_size=7, gamma=0.3)
    for count in COUNTS:
        assert ours(count) == pytest.approx(step_lr.get_last_lr()[0], rel=1e-12), count
        opt.step()
        step_lr.step()

    metrics = [5, 4, 4, 4, 4.1, 3.9, 3.9, 3.9, 3.9, 3.9, 2, 2, 2, 2, 2, 2, 2, 2]
    opt = torch.optim.SGD([param], lr=0.5)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=2, cooldown=1, min_lr=0.1
    )
    ours = schedules.ReduceOnPlateau(0.5, factor=0.5, patience=2, cooldown=1, min_value=0.1)
    want = reference.plateau_values(metrics, 0.5, 0.5, 2, cooldown=1, min_value=0.1)
    for metric, expected in zip(metrics, want, strict=True):
        plateau.step(metric)
        assert ours.observe(metric) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        assert ours(123) == pytest.approx(expected, rel=1e-12)


def test_plateau_matches_reference_and_modes():
    metrics = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.5, 0.6, 0.6, 0.6]
    ours = schedules.ReduceOnPlateau(1.0, factor=0.1, patience=2)
    want = reference.plateau_values(metrics, 1.0, 0.1, 2)
    assert [ours.observe(m) for m in metrics] == pytest.approx(want)
    maximize = schedules.ReduceOnPlateau(1.0, factor=0.1, patience=0, mode="max")
    # Rising metrics are improvements in "max" mode; a fall is not.
    assert [maximize.observe(m) for m in (1, 2, 3, 2)] == pytest.approx([1.0, 1.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="metric must be finite"):
        ours.observe(float("nan"))


# -- optimizers driven by schedules -----------------------------------------------------

OPTIMIZER_CASES = [
    ("SGD", {"momentum": 0.8}, "step"),
    ("RMSprop", {"centered": True}, "exponential"),
    ("Adam", {}, "warmup-cosine"),
    ("AdamW", {"weight_decay": 0.1}, "exponential-staircase"),
]
STEPS = 12


def make_problem(seed: int = 3, steps: int = STEPS):
    rng = np.random.default_rng(seed)
    shapes = {"dense.weights": (3, 2), "dense.bias": (2,)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize(("kind", "kwargs", "schedule"), OPTIMIZER_CASES)
def test_update_with_schedule_matches_reference(backend: Backend, dtype, kind, kwargs, schedule):
    ours, ref = SCHEDULES[schedule]
    params_np, grads_np = make_problem()
    params_np = {k: v.astype(dtype) for k, v in params_np.items()}
    grads_np = [{k: v.astype(dtype) for k, v in g.items()} for g in grads_np]
    want, _ = reference.run(kind, {**kwargs, "learning_rate": ref}, params_np, grads_np)
    opt = getattr(xpoptim, kind)(learning_rate=ours, **kwargs)
    params = {k: backend.asarray(v, dtype) for k, v in params_np.items()}
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(
            params, {k: backend.asarray(v, dtype) for k, v in grads.items()}, state
        )
    for name in want:
        got = backend.to_numpy(params[name])
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want[name], **tolerance(dtype), err_msg=name)


def test_a_plain_callable_is_a_schedule(backend: Backend):
    params_np, grads_np = make_problem(steps=4)
    rate = lambda count: 0.1 / (1 + count)  # noqa: E731
    want, _ = reference.run("SGD", {"learning_rate": rate}, params_np, grads_np)
    opt = xpoptim.SGD(learning_rate=rate)
    params = {k: backend.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(params, {k: backend.asarray(v) for k, v in grads.items()}, state)
    for name in want:
        np.testing.assert_allclose(backend.to_numpy(params[name]), want[name], rtol=1e-12)


class Layer:
    def __init__(self, params, grads):
        self.params = {k: (params[k], grads[k]) for k in params}


def test_step_layers_with_schedule(backend: Backend):
    if not backend.eager_writeable:
        pytest.skip(f"{backend.name} arrays cannot be updated in place")
    ours, ref = SCHEDULES["warmup-cosine"]
    params_np, grads_np = make_problem()
    want, _ = reference.run("Adam", {"learning_rate": ref}, params_np, grads_np)
    opt = xpoptim.Adam(learning_rate=ours)
    params = {k: backend.asarray(v) for k, v in params_np.items()}
    for grads in grads_np:
        opt.step([Layer(params, {k: backend.asarray(v) for k, v in grads.items()})])
    assert opt.t == STEPS
    for name in want:
        np.testing.assert_allclose(backend.to_numpy(params[name]), want[name], rtol=1e-12)


def test_plateau_drives_the_next_updates():
    sched = schedules.ReduceOnPlateau(0.1, factor=0.5, patience=0)
    opt = xpoptim.SGD(learning_rate=sched, momentum=0.0, regularization=None)
    params = {"w": np.array([1.0])}
    state = opt.init(params)
    params, state = opt.update(params, {"w": np.array([1.0])}, state)
    np.testing.assert_allclose(params["w"], [0.9])
    sched.observe(1.0)
    sched.observe(1.0)  # no improvement: the rate halves
    params, state = opt.update(params, {"w": np.array([1.0])}, state)
    np.testing.assert_allclose(params["w"], [0.85])


def test_schedule_under_jax_jit_with_traced_step():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    ours, ref = SCHEDULES["warmup-cosine"]
    params_np, grads_np = make_problem()
    params_np = {k: v.astype(np.float32) for k, v in params_np.items()}
    grads_np = [{k: v.astype(np.float32) for k, v in g.items()} for g in grads_np]
    want, _ = reference.run("Adam", {"learning_rate": ref}, params_np, grads_np)
    opt = xpoptim.Adam(learning_rate=ours)
    update = jax.jit(opt.update)
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    state = state._replace(step=jnp.asarray(0))  # a traced count inside jit
    for grads in grads_np:
        params, state = update(params, {k: jnp.asarray(v) for k, v in grads.items()}, state)
    assert int(state.step) == STEPS
    for name in want:
        got = np.asarray(params[name])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want[name], rtol=2e-5, atol=2e-6)
    # The count is traced: every schedule value comes from one compiled function.
    assert update._cache_size() == 1


def test_schedule_stays_lazy_on_dask(assert_no_compute):
    da = pytest.importorskip("dask.array")
    ours, ref = SCHEDULES["step"]
    params_np, grads_np = make_problem(steps=3)
    want, _ = reference.run("SGD", {"learning_rate": ref}, params_np, grads_np)
    opt = xpoptim.SGD(learning_rate=ours)
    params = {k: da.from_array(v, chunks=1) for k, v in params_np.items()}
    state = opt.init(params)
    with assert_no_compute():
        for grads in grads_np:
            params, state = opt.update(
                params, {k: da.from_array(v, chunks=1) for k, v in grads.items()}, state
            )
    for name in want:
        np.testing.assert_allclose(params[name].compute(), want[name], rtol=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_config_round_trip_with_schedule(name):
    schedule = SCHEDULES[name][0]
    opt = xpoptim.Adam(learning_rate=schedule)
    config = opt.get_config()
    assert config["learning_rate"]["schedule"] == type(schedule).__name__
    json.dumps(config)  # plain data
    again = xpoptim.Adam.from_config(json.loads(json.dumps(config)))
    assert again.learning_rate == schedule
    assert again.get_config() == config
    plateau = schedules.ReduceOnPlateau(0.1, patience=3)
    assert schedules.deserialize(plateau.get_config()) == plateau


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: schedules.StepDecay(0.1, step_size=0), "step_size must be >= 1"),
        (lambda: schedules.StepDecay(0.1, step_size=2.5), "step_size must be an integer"),
        (lambda: schedules.StepDecay(0.1, 2, gamma=2.0), r"gamma must be in \(0, 1\]"),
        (lambda: schedules.ExponentialDecay(-0.1, 3, 0.5), "init_value must be > 0"),
        (lambda: schedules.WarmupCosineDecay(0, 0.1, 10, 10), "decay_steps .* must be >"),
        (lambda: schedules.ReduceOnPlateau(0.1, factor=1.0), r"factor must be in \(0, 1\)"),
        (lambda: schedules.ReduceOnPlateau(0.1, mode="up"), "mode must be 'min' or 'max'"),
        (lambda: xpoptim.SGD(learning_rate={"schedule": "Nope"}), "names schedule 'Nope'"),
        (lambda: xpoptim.SGD(learning_rate="fast"), "learning_rate must be a real number"),
    ],
)
def test_bad_schedules_are_named(factory, message):
    with pytest.raises((TypeError, ValueError), match=message):
        factory()


def test_a_negative_scheduled_rate_changes_nothing():
    opt = xpoptim.SGD(learning_rate=lambda count: 0.1 - count)
    params = {"w": np.array([1.0, 2.0])}
    state = opt.init(params)
    params, state = opt.update(params, {"w": np.ones(2)}, state)
    before = params["w"].copy()
    with pytest.raises(ValueError, match=r"learning_rate schedule gave -0\.9 at count 1"):
        opt.update(params, {"w": np.ones(2)}, state)
    np.testing.assert_array_equal(params["w"], before)
    assert state.step == 1


# -- overflow and step counts that no training run reaches -----------------------------

GROWING = schedules.ExponentialDecay(0.1, transition_steps=1, decay_rate=2.0)
GROWING_STAIRS = schedules.ExponentialDecay(0.1, transition_steps=1, decay_rate=2.0, staircase=True)
HUGE = 10**400  # what a hand-edited or corrupted file can hold


@pytest.mark.parametrize("schedule", [GROWING, GROWING_STAIRS], ids=["smooth", "staircase"])
def test_an_overflowing_schedule_names_itself_and_the_count(schedule):
    # 0.1 * 2**1020 is a float; 0.1 * 2**1030 is not (main raised a bare OverflowError).
    assert schedule(1020) == pytest.approx(0.1 * 2.0**1020, rel=1e-12)
    with pytest.raises(
        schedules.LearningRateError, match=r"ExponentialDecay\(.*decay_rate=2\.0"
    ) as info:
        schedule(1030)
    assert "at count 1030" in str(info.value)
    assert "decay_rate <= 1" in str(info.value)
    # It is both kinds of error callers could already be catching.
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, OverflowError)


def test_a_value_that_overflows_to_inf_without_an_exception_is_refused():
    # init_value * decay_rate**x can be inf while decay_rate**x itself is finite.
    schedule = schedules.ExponentialDecay(1e300, transition_steps=1, decay_rate=10.0)
    assert schedule(8) == pytest.approx(1e308)
    with pytest.raises(schedules.LearningRateError, match=r"gives inf at count 9"):
        schedule(9)


def test_an_underflowing_decay_ends_at_zero():
    # The documented choice: the limit of the decay, 0.0, is a learning rate (as in optax).
    schedule = schedules.ExponentialDecay(0.1, transition_steps=1, decay_rate=0.5)
    assert schedule(1000) == pytest.approx(0.1 * 0.5**1000, rel=1e-12)
    assert schedule(1100) == 0.0
    assert schedules.learning_rate_at(schedule, 1100) == 0.0


@pytest.mark.parametrize("name", [*SCHEDULES, "plateau"])
def test_a_count_beyond_64_bits_is_refused_by_every_schedule(name):
    schedule = schedules.ReduceOnPlateau(0.1) if name == "plateau" else SCHEDULES[name][0]
    # The largest count is accepted and gives a finite rate (main: OverflowError for some).
    assert np.isfinite(schedule(schedules.MAX_COUNT))
    assert np.isfinite(schedule(np.int64(schedules.MAX_COUNT)))
    for count in (schedules.MAX_COUNT + 1, HUGE):
        with pytest.raises(
            schedules.StepCountError, match="above the largest step count, 2"
        ) as info:
            schedule(count)
        assert type(schedule).__name__ in str(info.value)
        assert isinstance(info.value, OverflowError)
    # A giant count is described by its size, never printed digit by digit (or str()
    # itself would fail above 4300 digits).
    with pytest.raises(schedules.StepCountError, match=r"a 16610-bit integer"):
        schedule(10**5000)
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        schedule(-1)


OPTIMIZERS = {
    "SGD": lambda lr: xpoptim.SGD(learning_rate=lr, momentum=0.9),
    "RMSprop": lambda lr: xpoptim.RMSprop(learning_rate=lr, centered=True),
    "Adam": lambda lr: xpoptim.Adam(learning_rate=lr),
    "AdamW": lambda lr: xpoptim.AdamW(learning_rate=lr, amsgrad=True),
}


def _problem(backend: Backend):
    rng = np.random.default_rng(7)
    params = {"dense.weights": backend.asarray(rng.normal(size=(3, 2)))}
    grads = {"dense.weights": backend.asarray(rng.normal(size=(3, 2)))}
    return params, grads


def _warm_state(opt, backend, params, grads):
    """A state with non-zero buffers, so 'unchanged' is a real check."""
    state = opt.init(params)
    params, state = opt.update(params, grads, state)
    return params, state


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize(
    ("step", "learning_rate", "error", "message"),
    [
        (HUGE, 1e-3, schedules.StepCountError, r"next step number \(state\.step \+ 1.*1329-bit"),
        (schedules.MAX_COUNT, 1e-3, schedules.StepCountError, "above the largest step count"),
        (
            1030,
            GROWING,
            schedules.LearningRateError,
            r"learning_rate at step 1031: ExponentialDecay\(.*\) overflows a float at count 1030",
        ),
        (
            1030,
            lambda count: 2.0**count,
            schedules.LearningRateError,
            r"learning_rate schedule <function .*lambda.*> overflows at step 1031",
        ),
    ],
    ids=["huge-step", "step-past-int64", "overflowing-schedule", "overflowing-callable"],
)
def test_update_refuses_before_anything_changes(backend, kind, step, learning_rate, error, message):
    from conftest import exact_snapshot

    opt = OPTIMIZERS[kind](learning_rate if callable(learning_rate) else 1e-3)
    params, grads = _problem(backend)
    params, state = _warm_state(opt, backend, params, grads)
    state = state._replace(step=step)
    opt.learning_rate = learning_rate
    before = exact_snapshot(backend, params, state)
    grads_before = {k: backend.to_numpy(v).tobytes() for k, v in grads.items()}
    with pytest.raises(error, match=message):
        opt.update(params, grads, state)
    assert exact_snapshot(backend, params, state) == before
    assert {k: backend.to_numpy(v).tobytes() for k, v in grads.items()} == grads_before


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_the_last_64_bit_step_is_still_a_step(kind):
    # The bound is exact: state.step = 2**63 - 2 makes update number 2**63 - 1, and
    # (the bias corrections being 1.0 in float64 from a few thousand steps on) it gives
    # what the same update gives at step 10**6.
    opt = OPTIMIZERS[kind](1e-3)
    params = {"w": np.array([0.5, -1.5, 2.0])}
    grads = {"w": np.array([0.25, 1.0, -3.0])}
    results = []
    for start in (10**6, schedules.MAX_COUNT - 1):
        state = opt.init(params)._replace(step=start)
        new_params, new_state = opt.update({"w": params["w"].copy()}, grads, state)
        assert new_state.step == start + 1
        results.append(new_params["w"])
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[0], params["w"])


class _Layer:
    def __init__(self, w, g):
        self.w, self.g = w, g

    @property
    def params(self):
        return {"w": (self.w, self.g)}


def _as_json(sd):
    buffers = {
        k: {n: np.asarray(a).tolist() for n, a in v.items()} for k, v in sd["buffers"].items()
    }
    return json.dumps({**sd, "buffers": buffers}, sort_keys=True)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_step_layers_with_a_huge_loaded_step_changes_nothing(kind, tmp_path):
    # A state dict saved as JSON, hand-edited to a step no run reaches, then loaded
    # (main: "OverflowError: int too large to convert to float" from Adam; SGD and
    # RMSprop went on counting past what any checkpoint can store).
    opt = OPTIMIZERS[kind](1e-3)
    layer = _Layer(np.array([0.5, -1.5, 2.0]), np.array([0.25, 1.0, -3.0]))
    opt.step([layer])
    path = tmp_path / "state.json"
    path.write_text(_as_json({**opt.state_dict(), "step": HUGE}))  # the hand edit
    loaded = json.loads(path.read_text())
    assert loaded["step"] == HUGE
    loaded["buffers"] = {
        k: {n: np.array(a) for n, a in v.items()} for k, v in loaded["buffers"].items()
    }
    before = _as_json(opt.state_dict())
    refused = None
    try:
        opt.load_state_dict(loaded)
    except ValueError as exc:  # refusing it at load time is as good, if nothing changed
        refused = str(exc)
    if refused is not None:
        assert "step" in refused
        assert _as_json(opt.state_dict()) == before
        return
    file_before, w_before = path.read_bytes(), layer.w.tobytes()
    state_before = _as_json(opt.state_dict())
    with pytest.raises(schedules.StepCountError, match="above the largest step count"):
        opt.step([layer])
    assert layer.w.tobytes() == w_before
    assert path.read_bytes() == file_before
    assert _as_json(opt.state_dict()) == state_before
