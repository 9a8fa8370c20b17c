"""The elementwise optimizers of issue 11 on every backend: against the float64 reference
of their formulas (``reference_elementwise.py``), through ``step(layers)``, the wrappers,
state dicts and checkpoints, the compiled path, and the bad-input table."""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import json
import math
import shutil

import numpy as np
import pytest

import xpoptim
from xpoptim import _rules, schedules, transforms

import reference
import reference_elementwise as ref
from conftest import Backend, exact_snapshot, tolerance

# (class name, constructor kwargs): the defaults, then values under which each
# hyperparameter matters (weight decay on, with the seed's no_decay names excluded).
CASES = [
    ("Adagrad", {}),
    (
        "Adagrad",
        {
            "learning_rate": 0.1,
            "weight_decay": 0.05,
            "learning_rate_decay": 0.1,
            "initial_accumulator_value": 0.3,
            "epsilon": 1e-6,
        },
    ),
    ("Adadelta", {}),
    ("Adadelta", {"learning_rate": 0.5, "weight_decay": 0.05, "decay_rate": 0.7, "epsilon": 1e-4}),
    ("Adamax", {}),
    (
        "Adamax",
        {"learning_rate": 0.05, "weight_decay": 0.05, "beta1": 0.8, "beta2": 0.9, "epsilon": 1e-3},
    ),
    ("NAdam", {}),
    ("NAdam", {"learning_rate": 0.05, "weight_decay": 0.05, "beta1": 0.8, "momentum_decay": 0.1}),
    ("NAdam", {"learning_rate": 0.05, "weight_decay": 0.1, "decoupled": True, "beta2": 0.9}),
    ("RAdam", {}),
    # beta2 = 0.6: rho_inf = 4, never rectified; 0.9: rectified from step 6 on.
    ("RAdam", {"learning_rate": 0.05, "weight_decay": 0.05, "beta1": 0.7, "beta2": 0.9}),
    ("RAdam", {"learning_rate": 0.05, "weight_decay": 0.1, "decoupled": True, "beta2": 0.6}),
    ("Rprop", {}),
    (
        "Rprop",
        {
            "learning_rate": 0.2,
            "weight_decay": 0.05,
            "eta_minus": 0.3,
            "eta_plus": 1.5,
            "step_size_min": 0.05,
            "step_size_max": 0.4,
        },
    ),
    ("Lion", {}),
    ("Lion", {"learning_rate": 0.05, "weight_decay": 0.3, "beta1": 0.5, "beta2": 0.8}),
    ("ScheduleFreeAdamW", {}),
    (
        "ScheduleFreeAdamW",
        {
            "learning_rate": 0.05,
            "weight_decay": 0.1,
            "beta1": 0.7,
            "beta2": 0.9,
            "epsilon": 1e-4,
            "weight_lr_power": 1.0,
        },
    ),
]
KINDS = sorted({kind for kind, _ in CASES})
STEPS = 8


def case_id(case):
    kind, kwargs = case
    return f"{kind}-{'defaults' if not kwargs else 'custom' + str(CASES.index(case))}"


def make_problem(seed: int = 0, steps: int = STEPS):
    """Decayed and excluded names (bias, gamma); gradients that flip sign now and then."""
    rng = np.random.default_rng(seed)
    shapes = {"dense.weights": (4, 3), "dense.bias": (3,), "bn.gamma": (3,), "out.weights": (7,)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s) + 0.3 for k, s in shapes.items()} for _ in range(steps)]
    return params, grads


def run_ours(backend: Backend, opt, params_np, grads_np, dtype=None):
    params = {k: backend.asarray(v, dtype) for k, v in params_np.items()}
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(
            params, {k: backend.asarray(v, dtype) for k, v in grads.items()}, state
        )
    return params, state


def assert_close(backend, got_params, got_state, want_params, want_state, dtype):
    for name, want in want_params.items():
        got = backend.to_numpy(got_params[name])
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=name)
    for field, buffers in want_state.items():
        for name, want in buffers.items():
            got = backend.to_numpy(getattr(got_state, field)[name])
            assert got.dtype == dtype, (field, name)
            np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=f"{field}[{name}]")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_update_matches_the_reference(backend: Backend, dtype, case):
    kind, kwargs = case
    params_np, grads_np = make_problem()
    params_np = {k: v.astype(dtype) for k, v in params_np.items()}
    grads_np = [{k: v.astype(dtype) for k, v in g.items()} for g in grads_np]
    want_params, want_state = ref.run(kind, kwargs, params_np, grads_np)
    params, state = run_ours(backend, getattr(xpoptim, kind)(**kwargs), params_np, grads_np, dtype)
    assert state.step == STEPS
    assert_close(backend, params, state, want_params, want_state, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_excluded_names_are_not_decayed(backend: Backend, kind):
    """With a huge weight decay, the names no_decay selects move as without decay."""
    params_np, grads_np = make_problem(steps=3)
    lr = {"Rprop": 0.01}.get(kind, 0.05)
    free, _ = run_ours(backend, getattr(xpoptim, kind)(lr), params_np, grads_np)
    # Rprop sees only signs: a decay large enough to flip some of them.
    decay = 5.0 if kind == "Rprop" else 0.9
    opt = getattr(xpoptim, kind)(lr, weight_decay=decay, no_decay=["bias", "gamma"])
    decayed, _ = run_ours(backend, opt, params_np, grads_np)
    for name in ("dense.bias", "bn.gamma"):
        assert np.array_equal(backend.to_numpy(decayed[name]), backend.to_numpy(free[name]))
    for name in ("dense.weights", "out.weights"):
        assert not np.allclose(backend.to_numpy(decayed[name]), backend.to_numpy(free[name]))


def test_a_schedule_is_a_learning_rate():
    """A schedule gives update t its value after t - 1 updates (the library's rule)."""
    params_np, grads_np = make_problem()
    for kind in ("Adagrad", "NAdam", "Lion", "ScheduleFreeAdamW"):
        sched = schedules.WarmupCosineDecay(
            init_value=0.0, peak_value=0.1, warmup_steps=3, decay_steps=STEPS
        )
        want_sched = reference.warmup_cosine_decay(0.0, 0.1, 3, STEPS)
        want, _ = ref.run(kind, {"learning_rate": want_sched}, params_np, grads_np)
        got, _ = run_ours(BackendNumpy, getattr(xpoptim, kind)(sched), params_np, grads_np)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12)


class _Numpy:
    """The NumPy backend outside the backend matrix (tests that need only one)."""

    @staticmethod
    def asarray(a, dtype=None):
        return np.array(a, dtype=dtype, copy=True)

    @staticmethod
    def to_numpy(x):
        return np.array(x, copy=True)


BackendNumpy = _Numpy()


# -- step(layers), the compiled path, explain() ------------------------------------------


class Layer:
    def __init__(self, params):
        self.params = params


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_step_layers_matches_the_reference(backend: Backend, case):
    if not backend.eager_writeable:
        pytest.skip(f"{backend.name} arrays cannot be updated in place (step needs that)")
    kind, kwargs = case
    params_np, grads_np = make_problem()
    opt = getattr(xpoptim, kind)(**kwargs)
    names = list(params_np)
    arrays = {k: backend.asarray(v) for k, v in params_np.items()}
    for grads in grads_np:
        layers = [Layer({n: (arrays[n], backend.asarray(grads[n])) for n in names})]
        opt.step(layers)
    want, want_state = ref.run(kind, kwargs, params_np, grads_np)
    for name in names:
        got = backend.to_numpy(arrays[name])
        np.testing.assert_allclose(got, want[name], rtol=1e-12, atol=1e-12, err_msg=name)
    for field, buffers in want_state.items():
        for name, value in buffers.items():
            got = backend.to_numpy(getattr(opt.state, field)[f"0.{name}"])
            np.testing.assert_allclose(got, value, rtol=1e-12, atol=1e-12, err_msg=field)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_path_is_bit_identical_to_the_plain_path(case, dtype):
    kind, kwargs = case
    rng = np.random.default_rng(3)
    # One large parameter (its own kernel call) and small ones (the flat state).
    shapes = {"big.weights": (300, 70), "dense.bias": (5,), "out.weights": (3, 4)}
    params_np = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    grads_np = [
        {k: (rng.normal(size=s) + 0.2).astype(dtype) for k, s in shapes.items()} for _ in range(6)
    ]
    runs = {}
    for fast in (True, False):
        with xpoptim.execution_options(fast=fast):
            params, state = run_ours(
                BackendNumpy, getattr(xpoptim, kind)(**kwargs), params_np, grads_np
            )
            if fast:
                # Without numba (nox -s tests_without_numba) the blocked path steps them.
                want = "compiled" if importlib.util.find_spec("numba") else "blocked"
                paths = {name: xpoptim.explain()[name].path for name in shapes}
                assert set(paths.values()) == {want}, (kind, paths)
        runs[fast] = exact_snapshot(BackendNumpy, params, state)
    assert runs[True] == runs[False]


# -- wrappers ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_inside_clipped_multisteps_and_param_groups(backend: Backend, kind):
    params_np, grads_np = make_problem(steps=6)
    lr = {"Adadelta": 1.0, "Rprop": 0.01}.get(kind, 0.05)
    # Clipped by global norm: the reference sees the clipped gradients.
    opt = transforms.Clipped(getattr(xpoptim, kind)(lr, weight_decay=0.1), max_global_norm=1.0)
    got, _ = run_ours(backend, opt, params_np, grads_np)
    clipped = [reference.clip_global_norm(g, 1.0) for g in grads_np]
    want, _ = ref.run(kind, {"learning_rate": lr, "weight_decay": 0.1}, params_np, clipped)
    for name in want:
        np.testing.assert_allclose(backend.to_numpy(got[name]), want[name], rtol=1e-11, atol=1e-12)
    # MultiSteps: one update per 3 micro-batches, on their mean.
    opt = transforms.MultiSteps(getattr(xpoptim, kind)(lr), every_k=3)
    got, _ = run_ours(backend, opt, params_np, grads_np)
    want, _ = ref.run(kind, {"learning_rate": lr}, params_np, reference.mean_every(grads_np, 3))
    for name in want:
        np.testing.assert_allclose(backend.to_numpy(got[name]), want[name], rtol=1e-11, atol=1e-12)
    # ParamGroups: "dense.*" with its own learning rate and weight decay.
    opt = transforms.ParamGroups(
        getattr(xpoptim, kind)(lr),
        [{"params": ["dense.*"], "learning_rate": lr / 2, "weight_decay": 0.2}],
    )
    got, _ = run_ours(backend, opt, params_np, grads_np)
    dense = {k: v for k, v in params_np.items() if k.startswith("dense.")}
    rest = {k: v for k, v in params_np.items() if k not in dense}
    config = {"learning_rate": lr / 2, "weight_decay": 0.2}
    want, _ = ref.run(kind, config, dense, [{k: g[k] for k in dense} for g in grads_np])
    want_rest, _ = ref.run(
        kind, {"learning_rate": lr}, rest, [{k: g[k] for k in rest} for g in grads_np]
    )
    for name, value in {**want, **want_rest}.items():
        np.testing.assert_allclose(backend.to_numpy(got[name]), value, rtol=1e-11, atol=1e-12)
    # Their configs rebuild them.
    assert transforms.from_config(json.loads(json.dumps(opt.get_config()))).get_config() == (
        opt.get_config()
    )


# -- configs, state dicts, checkpoints ---------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_config_round_trip(case):
    kind, kwargs = case
    opt = getattr(xpoptim, kind)(**kwargs)
    config = json.loads(json.dumps(opt.get_config()))
    assert config["type"] == kind
    assert "regularization" not in config
    for key, value in kwargs.items():
        assert config[key] == value, key
    rebuilt = getattr(xpoptim, kind).from_config(config)
    assert rebuilt.get_config() == opt.get_config()
    assert transforms.from_config(config).get_config() == opt.get_config()
    assert repr(rebuilt) == repr(opt)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_dict_round_trip_resumes_exactly(backend: Backend, case):
    kind, kwargs = case
    params_np, grads_np = make_problem()
    opt = getattr(xpoptim, kind)(**kwargs)
    full_params, full_state = run_ours(backend, opt, params_np, grads_np)

    half = STEPS // 2
    first = getattr(xpoptim, kind)(**kwargs)
    params, state = run_ours(backend, first, params_np, grads_np[:half])
    sd = copy.deepcopy(
        {**first.state_dict(state), "buffers": _numpy_buffers(backend, first.state_dict(state))}
    )
    second = getattr(xpoptim, kind).from_config(sd["config"])  # a new object: no memo
    state = xpoptim.state_from_dict(second, sd, params)
    assert state.step == half
    for grads in grads_np[half:]:
        params, state = second.update(
            params, {k: backend.asarray(v) for k, v in grads.items()}, state
        )
    assert exact_snapshot(backend, params, state) == exact_snapshot(
        backend, full_params, full_state
    )


def _numpy_buffers(backend, sd):
    return {f: {k: backend.to_numpy(a) for k, a in b.items()} for f, b in sd["buffers"].items()}


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_file_round_trip(tmp_path, kind):
    kwargs = next(kw for k, kw in CASES if k == kind and kw)
    params_np, grads_np = make_problem()
    opt = getattr(xpoptim, kind)(**kwargs)
    arrays = {k: v.copy() for k, v in params_np.items()}
    for grads in grads_np[:3]:
        opt.step([Layer({n: (arrays[n], grads[n]) for n in arrays})])
    xpoptim.save(tmp_path / "ckpt.safetensors", opt)
    loaded = xpoptim.load(tmp_path / "ckpt.safetensors").optimizer
    assert type(loaded) is type(opt)
    assert loaded.get_config() == opt.get_config()
    other = {k: v.copy() for k, v in arrays.items()}
    for grads in grads_np[3:]:
        opt.step([Layer({n: (arrays[n], grads[n]) for n in arrays})])
        loaded.step([Layer({n: (other[n], grads[n]) for n in other})])
    for name in arrays:
        assert np.array_equal(arrays[name], other[name]), name


# -- bad input: each new hyperparameter refused, by name, nothing changed ----------------

BAD = [
    ("Adagrad", {"learning_rate_decay": -0.1}, ValueError, "learning_rate_decay must be >= 0"),
    ("Adagrad", {"initial_accumulator_value": -1.0}, ValueError, "initial_accumulator_value"),
    ("Adagrad", {"epsilon": 0.0}, ValueError, "epsilon must be > 0"),
    ("Adagrad", {"weight_decay": -0.1}, ValueError, "weight_decay must be >= 0"),
    ("Adagrad", {"learning_rate": math.nan}, ValueError, "learning_rate"),
    ("Adadelta", {"decay_rate": 1.0}, ValueError, "decay_rate must be in [0, 1)"),
    ("Adadelta", {"epsilon": -1e-6}, ValueError, "epsilon must be > 0"),
    ("Adamax", {"beta1": 1.0}, ValueError, "beta1 must be in [0, 1)"),
    ("Adamax", {"beta2": -0.1}, ValueError, "beta2 must be in [0, 1)"),
    ("Adamax", {"epsilon": "1e-8"}, TypeError, "epsilon must be a real number"),
    ("NAdam", {"momentum_decay": -0.004}, ValueError, "momentum_decay must be >= 0"),
    ("NAdam", {"decoupled": 1}, TypeError, "decoupled must be True or False"),
    ("NAdam", {"beta2": 1.5}, ValueError, "beta2 must be in [0, 1)"),
    ("RAdam", {"decoupled": "yes"}, TypeError, "decoupled must be True or False"),
    ("RAdam", {"epsilon": math.inf}, ValueError, "epsilon must be finite"),
    ("Rprop", {"eta_minus": 1.0}, ValueError, "eta_minus must be in (0, 1)"),
    ("Rprop", {"eta_minus": 0.0}, ValueError, "eta_minus must be > 0"),
    ("Rprop", {"eta_plus": 1.0}, ValueError, "eta_plus must be > 1"),
    ("Rprop", {"step_size_min": -1.0}, ValueError, "step_size_min must be >= 0"),
    ("Rprop", {"step_size_max": 0.0}, ValueError, "step_size_max must be > 0"),
    (
        "Rprop",
        {"step_size_min": 2.0, "step_size_max": 1.0},
        ValueError,
        "step_size_min must be <= step_size_max",
    ),
    ("Rprop", {"learning_rate": lambda count: 0.1}, TypeError, "Rprop's learning_rate"),
    ("Lion", {"beta1": 1.0}, ValueError, "beta1 must be in [0, 1)"),
    ("Lion", {"beta2": math.nan}, ValueError, "beta2 must be finite"),
    ("Lion", {"weight_decay": -1e-3}, ValueError, "weight_decay must be >= 0"),
    ("ScheduleFreeAdamW", {"beta1": 0.0}, ValueError, "beta1 must be > 0"),
    ("ScheduleFreeAdamW", {"beta1": 1.0}, ValueError, "beta1 must be in (0, 1)"),
    ("ScheduleFreeAdamW", {"beta2": 1.0}, ValueError, "beta2 must be in [0, 1)"),
    ("ScheduleFreeAdamW", {"weight_lr_power": -2.0}, ValueError, "weight_lr_power must be >= 0"),
    ("ScheduleFreeAdamW", {"epsilon": 0.0}, ValueError, "epsilon must be > 0"),
]


@pytest.mark.parametrize(
    "bad", BAD, ids=[f"{k}-{'-'.join(kw)}-{i}" for i, (k, kw, _, _) in enumerate(BAD)]
)
def test_bad_hyperparameters_are_refused_by_name(bad):
    kind, kwargs, error, message = bad
    with pytest.raises(error, match=_escaped(message)):
        getattr(xpoptim, kind)(**kwargs)
    # Set later on a working optimizer: the next update refuses, nothing changes.
    good = getattr(xpoptim, kind)()
    params_np, grads_np = make_problem(steps=2)
    params, state = run_ours(BackendNumpy, good, params_np, grads_np[:1])
    before = exact_snapshot(BackendNumpy, params, state)
    for key, value in kwargs.items():
        setattr(good, key, value)
    with pytest.raises(error, match=_escaped(message)):
        good.update(params, grads_np[1], state)
    assert exact_snapshot(BackendNumpy, params, state) == before


def _escaped(message):
    import re

    return re.escape(message)


def test_the_new_classes_take_their_hyperparameters_by_keyword():
    with pytest.raises(TypeError):
        xpoptim.Adagrad(0.1, 0.5)
    assert xpoptim.Lion(0.3).learning_rate == 0.3


@pytest.mark.parametrize(
    ("kind", "defaults"),
    [
        # torch.optim 2.13's defaults where torch has the optimizer, else optax 0.2's.
        ("Adagrad", {"learning_rate": 0.01, "learning_rate_decay": 0.0, "epsilon": 1e-10}),
        ("Adadelta", {"learning_rate": 1.0, "decay_rate": 0.9, "epsilon": 1e-6}),
        ("Adamax", {"learning_rate": 0.002, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
        ("NAdam", {"learning_rate": 0.002, "momentum_decay": 0.004, "decoupled": False}),
        ("RAdam", {"learning_rate": 0.001, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
        ("Rprop", {"learning_rate": 0.01, "eta_minus": 0.5, "eta_plus": 1.2}),
        ("Lion", {"beta1": 0.9, "beta2": 0.99}),
        ("ScheduleFreeAdamW", {"learning_rate": 0.0025, "beta1": 0.9, "weight_lr_power": 2.0}),
    ],
)
def test_defaults_are_the_peers_with_decay_off(kind, defaults):
    opt = getattr(xpoptim, kind)()
    assert opt.weight_decay == 0.0
    for key, value in defaults.items():
        assert getattr(opt, key) == value, key


# -- what needs a concrete step, and the schedule-free average ----------------------------


def test_schedule_free_average_is_the_reference_x(backend: Backend):
    params_np, grads_np = make_problem()
    kwargs = {"learning_rate": 0.05, "beta1": 0.8}
    opt = xpoptim.ScheduleFreeAdamW(**kwargs)
    params, state = run_ours(backend, opt, params_np, grads_np)
    want_params, want_state = ref.run("ScheduleFreeAdamW", kwargs, params_np, grads_np)
    want = ref.average(kwargs, want_params, want_state)
    got = opt.average(params, state)
    for name in want:
        np.testing.assert_allclose(backend.to_numpy(got[name]), want[name], rtol=1e-11, atol=1e-12)
    with pytest.raises(ValueError, match="has no state"):
        xpoptim.ScheduleFreeAdamW().average(params)


def test_a_rewound_step_count_recomputes_the_step_series():
    """NAdam's product and schedule-free's weights follow state.step, not call order."""
    params_np, grads_np = make_problem()
    for kind in ("NAdam", "ScheduleFreeAdamW"):
        opt = getattr(xpoptim, kind)(0.05)
        run_ours(BackendNumpy, opt, params_np, grads_np[:5])
        # The same optimizer object now runs a fresh state: from step 0 again.
        again, _ = run_ours(BackendNumpy, opt, params_np, grads_np)
        want, _ = ref.run(kind, {"learning_rate": 0.05}, params_np, grads_np)
        for name in want:
            np.testing.assert_allclose(again[name], want[name], rtol=1e-12, atol=1e-12)


def test_under_jax_jit_or_refused_with_the_reason():
    """The rules whose scalars are arithmetic on the step count run under ``jax.jit``;
    those that need Python control flow on it say so instead of failing obscurely."""
    jax = pytest.importorskip("jax")
    params_np, grads_np = make_problem(steps=3)
    for kind in ("Adagrad", "Adadelta", "Adamax", "Rprop", "Lion"):
        opt = getattr(xpoptim, kind)(0.05)
        params = {k: jax.numpy.asarray(v) for k, v in params_np.items()}
        eager, jitted = (params, opt.init(params)), (params, opt.init(params))
        update = jax.jit(opt.update)
        for grads in grads_np:
            g = {k: jax.numpy.asarray(v) for k, v in grads.items()}
            eager = opt.update(*eager[:1], g, eager[1])
            jitted = update(jitted[0], g, jitted[1])
        for name in params_np:
            np.testing.assert_allclose(
                np.asarray(jitted[0][name]), np.asarray(eager[0][name]), rtol=1e-12, atol=1e-12
            )
    for kind in ("NAdam", "RAdam", "ScheduleFreeAdamW"):
        opt = getattr(xpoptim, kind)()
        params = {k: jax.numpy.asarray(v) for k, v in params_np.items()}
        grads = {k: jax.numpy.asarray(v) for k, v in grads_np[0].items()}
        with pytest.raises(TypeError, match=f"{kind} computes .* needs a concrete state.step"):
            jax.jit(opt.update)(params, grads, opt.init(params))


# -- the CUDA kernel body (no GPU needed: built for the host by g++) ---------------------

CUDA_CASES = [
    (
        "adagrad",
        3,
        {"learning_rate": 0.1, "epsilon": 1e-10, "l2": 0.01},
    ),
    ("adadelta", 4, {"learning_rate": 1.0, "decay_rate": 0.9, "epsilon": 1e-6, "l2": 0.01}),
    ("adamax", 4, {"beta1": 0.9, "beta2": 0.99, "epsilon": 1e-8, "step_size": 0.01, "l2": 0.0}),
    (
        "nadam",
        4,
        {
            "learning_rate": 0.01,
            "beta1": 0.9,
            "beta2": 0.99,
            "epsilon": 1e-8,
            "bias_correction2": 0.3,
            "gradient_step": 0.002,
            "momentum_step": 0.009,
            "l2": 0.0,
            "decoupled_decay": 0.1,
        },
    ),
    (
        "radam",
        4,
        {
            "learning_rate": 0.01,
            "beta1": 0.9,
            "beta2": 0.99,
            "epsilon": 1e-8,
            "step_size": 0.02,
            "rectified": True,
            "sqrt_bias_correction2": 0.5,
            "l2": 0.01,
            "decoupled_decay": 0.0,
        },
    ),
    (
        "rprop",
        4,
        {"eta_minus": 0.5, "eta_plus": 1.2, "step_size_min": 1e-3, "step_size_max": 2.0, "l2": 0.0},
    ),
    ("lion", 3, {"learning_rate": 0.01, "beta1": 0.9, "beta2": 0.99, "decoupled_decay": 0.1}),
    (
        "schedule_free_adamw",
        4,
        {
            "learning_rate": 0.01,
            "beta1": 0.9,
            "beta2": 0.999,
            "epsilon": 1e-8,
            "bias_correction2": 0.01,
            "average_weight": 0.25,
            "decoupled_decay": 0.1,
        },
    ),
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++) on PATH")
@pytest.mark.parametrize(("name", "roles", "scalars"), CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_the_cuda_kernel_body_gives_numpys_bits_on_the_host(name, roles, scalars, dtype, tmp_path):
    """What CuPy would run, compiled for the CPU with FMA contraction off, against the
    rule on NumPy arrays: the same bits."""
    from test_compiled import host_kernel

    rule = getattr(_rules, name)
    ctype = {"float32": "float", "float64": "double"}[dtype.name]
    graph, library = host_kernel(rule, roles, scalars, ctype, tmp_path)
    rng = np.random.default_rng(6)
    arrays = [rng.normal(size=1000).astype(dtype) for _ in range(roles)]
    arrays[2:] = [np.abs(a) + 0.01 for a in arrays[2:]]  # accumulators, norms, step sizes > 0
    want = rule(*[a.copy() for a in arrays], xp=np, **scalars)
    got = [a.copy() for a in arrays]
    pointers = (ctypes.c_void_p * roles)(*[a.ctypes.data for a in got])
    scalar_values = np.array(graph.kernel_arguments(scalars), dtype=dtype)
    library.run(ctypes.c_long(1000), pointers, ctypes.c_void_p(scalar_values.ctypes.data))
    for role, expected in zip((0, *range(2, roles)), want, strict=True):
        assert got[role].tobytes() == np.asarray(expected, dtype=dtype).tobytes(), (name, role)
    assert got[1].tobytes() == arrays[1].tobytes()  # the gradient is an input only


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_policies(kind):
    """Under "skip" a NaN leaves everything as it was and is counted; "raise" names the
    parameter and changes nothing."""
    params_np, grads_np = make_problem(steps=2)
    bad = {k: v.copy() for k, v in grads_np[1].items()}
    bad["out.weights"][3] = np.nan
    opt = getattr(xpoptim, kind)(nonfinite="skip")
    params, state = run_ours(BackendNumpy, opt, params_np, grads_np[:1])
    before = exact_snapshot(BackendNumpy, params, state)
    new_params, new_state = opt.update(params, bad, state)
    assert new_state.skipped == 1
    assert new_state.step == state.step == 1
    assert exact_snapshot(BackendNumpy, new_params, new_state._replace(skipped=0)) == before
    opt = getattr(xpoptim, kind)(nonfinite="raise")
    params, state = run_ours(BackendNumpy, opt, params_np, grads_np[:1])
    before = exact_snapshot(BackendNumpy, params, state)
    with pytest.raises(xpoptim.NonFiniteGradientError, match=r"out\.weights"):
        opt.update(params, bad, state)
    assert exact_snapshot(BackendNumpy, params, state) == before


@pytest.mark.parametrize("kind", KINDS)
def test_dask_steps_stay_lazy(backend: Backend, kind, assert_no_compute):
    if not backend.lazy:
        pytest.skip("Dask only: init and update build a graph, computing nothing")
    params_np, grads_np = make_problem(steps=2)
    opt = getattr(xpoptim, kind)()
    with assert_no_compute():
        params = {k: backend.asarray(v) for k, v in params_np.items()}
        state = opt.init(params)
        for grads in grads_np:
            params, state = opt.update(
                params, {k: backend.asarray(v) for k, v in grads.items()}, state
            )
    want, _ = ref.run(kind, {}, params_np, grads_np)
    for name in want:
        np.testing.assert_allclose(backend.to_numpy(params[name]), want[name], rtol=1e-12)
