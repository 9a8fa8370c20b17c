"""LAMB, LARS, Adafactor and Muon: on every backend against the float64 reference
(``reference_nonelementwise``), their state (factored, empty buffers) through state dicts
and checkpoints, inside the wrappers, lazily on Dask, under ``jax.jit``, and their
bad-input table. The peers' own trajectories are in ``test_nonelementwise_peers.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest

import reference_nonelementwise as reference
import xpoptim
from xpoptim import transforms

from conftest import Backend, tolerance

STEPS = 5
SHAPES = {
    "dense.weights": (4, 3),
    "wide.weights": (3, 5),
    "dense.bias": (3,),
    "conv.kernel": (2, 2, 3),
    "bn.gamma": (3,),
}

# (class name, constructor kwargs): defaults, then every hyperparameter moved, decay on.
CASES = [
    ("LAMB", {"learning_rate": 0.05}),
    ("LAMB", {"learning_rate": 0.05, "weight_decay": 0.1, "beta1": 0.8, "beta2": 0.95}),
    ("LARS", {"learning_rate": 5.0, "weight_decay": 0.05}),
    (
        "LARS",
        {"learning_rate": 5.0, "nesterov": True, "epsilon": 1e-6, "trust_coefficient": 0.01},
    ),
    ("Adafactor", {}),
    (
        "Adafactor",
        {
            "learning_rate": 0.05,
            "weight_decay": 0.1,
            "beta2_decay": -0.5,
            "clipping_threshold": 0.5,
            "epsilon": 1e-20,
            "min_scale": 0.01,
        },
    ),
    ("Muon", {"learning_rate": 0.02}),
    (
        "Muon",
        {
            "learning_rate": 0.02,
            "weight_decay": 0.1,
            "nesterov": False,
            "adjust_lr": "match_rms_adamw",
            "ns_steps": 3,
            "momentum": 0.9,
            "adam_beta1": 0.8,
        },
    ),
]


def case_id(case):
    kind, kwargs = case
    return "-".join([kind, *[k for k in kwargs if k != "learning_rate"]]) or kind


def make_problem(seed: int = 3, steps: int = STEPS, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    grads = [
        {k: (rng.normal(size=s) * 0.7**t).astype(dtype) for k, s in SHAPES.items()}
        for t in range(steps)
    ]
    return params, grads


def run(backend: Backend, opt, params_np, grads_np, dtype=None):
    params = {k: backend.asarray(v, dtype) for k, v in params_np.items()}
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(
            params, {k: backend.asarray(v, dtype) for k, v in grads.items()}, state
        )
    return params, state


def assert_close(backend, got_params, want_params, dtype=np.float64, **tol):
    tol = tol or tolerance(dtype)
    for name, want in want_params.items():
        got = backend.to_numpy(got_params[name])
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got, want, **tol, err_msg=name)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_the_reference(backend: Backend, dtype, case):
    kind, kwargs = case
    params_np, grads_np = make_problem(dtype=dtype)
    want, want_state = reference.run(kind, kwargs, params_np, grads_np)
    params, state = run(backend, getattr(xpoptim, kind)(**kwargs), params_np, grads_np)
    assert state.step == STEPS
    assert_close(backend, params, want, dtype)
    for field, buffers in want_state.items():
        for name, value in buffers.items():
            got = backend.to_numpy(getattr(state, field)[name])
            np.testing.assert_allclose(got, value, **tolerance(dtype), err_msg=f"{field}[{name}]")


def test_state_shapes_follow_the_parameters():
    params, _ = make_problem()
    ada = xpoptim.Adafactor().init(params)
    assert ada.row_var["conv.kernel"].shape == (2, 2, 1)
    assert ada.col_var["conv.kernel"].shape == (2, 1, 3)
    assert ada.row_var["wide.weights"].shape == (3, 1)
    assert ada.col_var["wide.weights"].shape == (1, 5)
    assert ada.variance["dense.weights"].shape == (0,)
    assert ada.variance["dense.bias"].shape == (3,)
    assert ada.row_var["dense.bias"].shape == ada.col_var["dense.bias"].shape == (0,)
    muon = xpoptim.Muon().init(params)
    assert muon.velocities["dense.weights"].shape == (0,)
    assert muon.velocities["conv.kernel"].shape == (2, 2, 3)
    assert muon.momentums["dense.weights"].shape == (4, 3)


class Layer:
    def __init__(self, params, grads):
        self._params, self._grads = params, grads

    @property
    def params(self):
        return {k: (self._params[k], self._grads[k]) for k in self._params}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_step_layers_matches_the_reference(backend: Backend, case):
    if not backend.eager_writeable:
        pytest.skip(f"{backend.name} arrays cannot be updated in place")
    kind, kwargs = case
    params_np, grads_np = make_problem()
    want, _ = reference.run(kind, kwargs, params_np, grads_np)
    opt = getattr(xpoptim, kind)(**kwargs)
    params = {k: backend.asarray(v) for k, v in params_np.items()}
    for grads in grads_np:
        opt.step([Layer(params, {k: backend.asarray(v) for k, v in grads.items()})])
    assert_close(backend, params, {f"{k}": v for k, v in want.items()})
    assert set(getattr(opt.state, opt.State._fields[1])) == {f"0.{k}" for k in params}


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_explain_says_plain_and_why(case):
    kind, kwargs = case
    params_np, grads_np = make_problem(steps=1)
    run(
        Backend("numpy", "numpy", eager_writeable=True),
        getattr(xpoptim, kind)(**kwargs),
        params_np,
        grads_np,
    )
    paths = xpoptim.explain()
    for name in params_np:
        assert paths[name].path == "plain", (name, paths[name])
        assert "cannot be compiled" in paths[name].reason, paths[name]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("kind", ["LAMB", "LARS", "Adafactor", "Muon"])
def test_empty_and_0d_parameters(kind, fast):
    """Empty matrices and vectors stay empty (no warning from a mean or a norm of nothing);
    a 0-d parameter steps as the reference says."""
    params_np = {"e": np.zeros((0, 3)), "m": np.ones((2, 0)), "v": np.zeros(0), "s": np.array(2.0)}
    grads_np = [{k: np.full(v.shape, 0.5) for k, v in params_np.items()}]
    want, _ = reference.run(kind, {}, {"s": params_np["s"]}, [{"s": grads_np[0]["s"]}])
    with xpoptim.execution_options(fast=fast):
        got, _ = run(
            Backend("numpy", "numpy", eager_writeable=True),
            getattr(xpoptim, kind)(),
            params_np,
            grads_np,
        )
    for k in ("e", "m", "v"):
        assert got[k].shape == params_np[k].shape
    np.testing.assert_allclose(got["s"], want["s"], rtol=1e-12)


# -- state: state dicts, checkpoints, loads that are refused -------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_dict_round_trip_continues_exactly(backend: Backend, case, tmp_path):
    kind, kwargs = case
    params_np, grads_np = make_problem()
    want, _ = reference.run(kind, kwargs, params_np, grads_np)
    opt = getattr(xpoptim, kind)(**kwargs)
    params, state = run(backend, opt, params_np, grads_np[:2])
    sd = json.loads(
        json.dumps(opt.state_dict(state), default=lambda a: backend.to_numpy(a).tolist())
    )
    sd["buffers"] = {
        field: {
            k: np.asarray(v, np.float64).reshape(getattr(state, field)[k].shape)
            for k, v in arrays.items()
        }
        for field, arrays in sd["buffers"].items()
    }
    fresh = type(opt).from_config(sd["config"])
    state = xpoptim.state_from_dict(fresh, sd, like=params)
    xpoptim.save(tmp_path / "ck.safetensors", fresh, params, state=state)
    ck = xpoptim.load(tmp_path / "ck.safetensors", like=params)
    assert ck.optimizer.get_config() == opt.get_config()
    params, state = ck.params, ck.state
    for grads in grads_np[2:]:
        params, state = ck.optimizer.update(
            params, {k: backend.asarray(v) for k, v in grads.items()}, state
        )
    assert_close(backend, params, want)


@pytest.mark.parametrize("kind", ["Adafactor", "Muon"])
def test_load_state_dict_then_step_layers(kind):
    params_np, grads_np = make_problem()
    want, _ = reference.run(kind, {}, params_np, grads_np)
    first = getattr(xpoptim, kind)()
    params = {k: v.copy() for k, v in params_np.items()}
    for grads in grads_np[:3]:
        first.step([Layer(params, grads)])
    second = getattr(xpoptim, kind)()
    second.load_state_dict(first.state_dict())  # placed at the next step
    for grads in grads_np[3:]:
        second.step([Layer(params, grads)])
    for name in params:
        np.testing.assert_allclose(params[name], want[name], rtol=1e-12, atol=1e-12)


def test_a_factor_of_the_wrong_shape_is_refused_and_nothing_changes():
    opt = xpoptim.Adafactor()
    params = {"w": np.ones((4, 3))}
    state = opt.init(params)
    bad = state._replace(row_var={"w": np.zeros((4, 3))})
    with pytest.raises(ValueError, match=r"state.row_var\['w'\] has shape \(4, 3\), not \(4, 1\)"):
        opt.update(params, {"w": np.ones((4, 3))}, bad)
    np.testing.assert_array_equal(params["w"], np.ones((4, 3)))
    sd = opt.state_dict(state)
    sd["buffers"]["col_var"]["w"] = np.zeros((3,))
    with pytest.raises(xpoptim.StateDictError, match=r"'col_var'\]\['w'\] has shape \(3,\), not"):
        xpoptim.state_from_dict(opt, sd, like=params)
    # Loaded without parameters: checked when step() first sees them, nothing changed.
    layer_params = {"w": np.ones((4, 3))}
    first = xpoptim.Adafactor()
    first.step([Layer(layer_params, {"w": np.ones((4, 3))})])
    sd = first.state_dict()
    sd["buffers"]["col_var"]["0.w"] = np.zeros((3,))
    second = xpoptim.Adafactor()
    second.load_state_dict(sd)
    before = layer_params["w"].copy()
    with pytest.raises(xpoptim.StateDictError, match=r"col_var\['0.w'\] has shape \(3,\), not"):
        second.step([Layer(layer_params, {"w": np.ones((4, 3))})])
    np.testing.assert_array_equal(layer_params["w"], before)


def test_muon_velocity_of_a_matrix_must_be_empty():
    opt = xpoptim.Muon()
    params = {"w": np.ones((2, 2))}
    state = opt.init(params)._replace(velocities={"w": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"state.velocities\['w'\] has shape \(2, 2\), not \(0,\)"):
        opt.update(params, {"w": np.ones((2, 2))}, state)


# -- configuration and bad input ----------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_config_round_trip(case):
    kind, kwargs = case
    opt = getattr(xpoptim, kind)(**kwargs)
    config = opt.get_config()
    assert config["type"] == kind
    assert "regularization" not in config
    for key, value in kwargs.items():
        assert config[key] == value, key
    assert type(opt).from_config(json.loads(json.dumps(config))).get_config() == config


def test_decay_is_off_by_default_and_defaults_are_the_peers():
    assert xpoptim.LAMB().get_config() == {
        "type": "LAMB",
        "learning_rate": 0.001,
        "weight_decay": 0.0,
        "beta1": 0.9,
        "beta2": 0.999,
        "epsilon": 1e-6,
    }
    assert xpoptim.Adafactor().get_config() == {
        "type": "Adafactor",
        "learning_rate": 0.01,
        "weight_decay": 0.0,
        "beta2_decay": -0.8,
        "epsilon": None,
        "min_scale": 1e-3,
        "clipping_threshold": 1.0,
    }
    muon = xpoptim.Muon().get_config()
    assert (muon["learning_rate"], muon["weight_decay"], muon["momentum"]) == (0.001, 0.0, 0.95)
    assert (muon["nesterov"], muon["ns_steps"], muon["epsilon"]) == (True, 5, 1e-7)
    assert muon["ns_coefficients"] == [3.4445, -4.775, 2.0315]
    lars = xpoptim.LARS().get_config()
    assert (lars["momentum"], lars["trust_coefficient"], lars["epsilon"]) == (0.9, 0.001, 0.0)


BAD = [
    ("LAMB", {"beta1": 1.0}, ValueError, "beta1 must be in"),
    ("LAMB", {"epsilon": 0.0}, ValueError, "epsilon must be > 0"),
    ("LAMB", {"weight_decay": -0.1}, ValueError, "weight_decay must be >= 0"),
    ("LAMB", {"learning_rate": float("nan")}, ValueError, "learning_rate"),
    ("LARS", {"trust_coefficient": 0.0}, ValueError, "trust_coefficient must be > 0"),
    ("LARS", {"epsilon": -1.0}, ValueError, "epsilon must be >= 0"),
    ("LARS", {"momentum": 1.5}, ValueError, "momentum must be in"),
    ("LARS", {"nesterov": 1}, TypeError, "nesterov must be True or False"),
    ("Adafactor", {"beta2_decay": 0.5}, ValueError, "beta2_decay must be <= 0"),
    ("Adafactor", {"beta2_decay": "x"}, TypeError, "beta2_decay must be a real number"),
    ("Adafactor", {"epsilon": 0.0}, ValueError, "epsilon must be > 0"),
    ("Adafactor", {"min_scale": -1.0}, ValueError, "min_scale must be > 0"),
    ("Adafactor", {"clipping_threshold": 0.0}, ValueError, "clipping_threshold must be > 0"),
    ("Adafactor", {"weight_decay": float("inf")}, ValueError, "weight_decay must be finite"),
    ("Muon", {"momentum": -0.1}, ValueError, "momentum must be in"),
    ("Muon", {"ns_steps": 0}, ValueError, "ns_steps must be >= 1"),
    ("Muon", {"ns_steps": 100}, ValueError, "ns_steps must be < 100"),
    ("Muon", {"ns_steps": 2.0}, TypeError, "ns_steps must be an integer"),
    ("Muon", {"ns_coefficients": (1.0, 2.0)}, ValueError, "ns_coefficients must be three"),
    ("Muon", {"ns_coefficients": "abc"}, ValueError, "ns_coefficients must be three"),
    ("Muon", {"epsilon": 0.0}, ValueError, "epsilon must be > 0"),
    ("Muon", {"adjust_lr": "keller"}, ValueError, "adjust_lr must be 'original' or"),
    ("Muon", {"adam_beta2": 1.0}, ValueError, "adam_beta2 must be in"),
    ("Muon", {"adam_epsilon": -1e-8}, ValueError, "adam_epsilon must be > 0"),
    ("Muon", {"nesterov": "yes"}, TypeError, "nesterov must be True or False"),
]


@pytest.mark.parametrize(
    ("kind", "kwargs", "error", "message"), BAD, ids=[f"{b[0]}-{next(iter(b[1]))}" for b in BAD]
)
def test_bad_hyperparameters_are_named(kind, kwargs, error, message):
    with pytest.raises(error, match=message):
        getattr(xpoptim, kind)(**kwargs)


@pytest.mark.parametrize(
    ("kind", "kwargs", "error", "message"),
    BAD[:3] + BAD[8:9] + BAD[14:15],
    ids=["lamb-beta1", "lamb-eps", "lamb-wd", "adafactor-b2", "muon-mom"],
)
def test_bad_hyperparameters_set_later_change_nothing(kind, kwargs, error, message):
    opt = getattr(xpoptim, kind)()
    params_np, grads_np = make_problem(steps=1)
    params = {k: v.copy() for k, v in params_np.items()}
    state = opt.init(params)
    for key, value in kwargs.items():
        setattr(opt, key, value)
    with pytest.raises(error, match=message):
        opt.update(params, grads_np[0], state)
    for name in params:
        np.testing.assert_array_equal(params[name], params_np[name])
    assert state.step == 0


def test_regularization_cannot_be_switched_on():
    opt = xpoptim.LAMB()
    opt.regularization = "L2"
    params = {"w": np.ones(2)}
    with pytest.raises(ValueError, match="LAMB has only its own weight decay"):
        opt.update(params, {"w": np.ones(2)}, opt.init(params))


# -- inside the wrappers ------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_inside_multisteps_clipped_and_paramgroups(case):
    kind, kwargs = case
    params_np, grads_np = make_problem(steps=4)
    np_backend = Backend("numpy", "numpy", eager_writeable=True)
    # MultiSteps(every_k=2): two updates, on the mean of each pair of gradients.
    means = [
        {k: (a[k] + b[k]) / 2 for k in a}
        for a, b in zip(grads_np[::2], grads_np[1::2], strict=True)
    ]
    want, _ = reference.run(kind, kwargs, params_np, means)
    got, _ = run(
        np_backend, transforms.MultiSteps(getattr(xpoptim, kind)(**kwargs), 2), params_np, grads_np
    )
    assert_close(np_backend, got, want)
    # Clipped(max_norm): each gradient scaled to norm <= max_norm first.
    clipped = [
        {k: g * min(1.0, 0.5 / np.linalg.norm(g.ravel())) for k, g in grads.items()}
        for grads in grads_np
    ]
    want, _ = reference.run(kind, kwargs, params_np, clipped)
    got, _ = run(
        np_backend,
        transforms.Clipped(getattr(xpoptim, kind)(**kwargs), max_norm=0.5),
        params_np,
        grads_np,
    )
    assert_close(np_backend, got, want)
    # ParamGroups: the weights with a larger learning rate and decay, the rest as given.
    group = {"learning_rate": kwargs.get("learning_rate", 0.01) * 2, "weight_decay": 0.1}
    opt = transforms.ParamGroups(
        getattr(xpoptim, kind)(**kwargs), [{"params": ["*.weights"], **group}]
    )
    got, _ = run(np_backend, opt, params_np, grads_np)
    weights = [k for k in params_np if k.endswith(".weights")]
    others = [k for k in params_np if k not in weights]
    want_w, _ = reference.run(
        kind,
        {**kwargs, **group},
        {k: params_np[k] for k in weights},
        [{k: g[k] for k in weights} for g in grads_np],
    )
    want_o, _ = reference.run(
        kind,
        kwargs,
        {k: params_np[k] for k in others},
        [{k: g[k] for k in others} for g in grads_np],
    )
    assert_close(np_backend, got, {**want_w, **want_o})


def test_nonfinite_skip_skips_the_whole_update():
    opt = xpoptim.Adafactor(nonfinite="skip")
    params_np, grads_np = make_problem(steps=3)
    bad = {k: v.copy() for k, v in grads_np[1].items()}
    bad["dense.bias"][0] = np.nan
    got, state = run(
        Backend("numpy", "numpy", eager_writeable=True),
        opt,
        params_np,
        [grads_np[0], bad, grads_np[2]],
    )
    want, _ = reference.run("Adafactor", {}, params_np, [grads_np[0], grads_np[2]])
    assert (state.step, state.skipped) == (2, 1)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["LAMB", "LARS", "Adafactor", "Muon"])
def test_out_of_core_refuses_them_and_writes_nothing(kind, tmp_path):
    pytest.importorskip("zarr")
    pytest.importorskip("dask")
    opt = getattr(xpoptim, kind)()
    assert not opt.elementwise
    assert xpoptim.Adam.elementwise
    with pytest.raises(TypeError, match=f"OutOfCore cannot step {kind}: its update is not elem"):
        xpoptim.OutOfCore.create(tmp_path / "s", opt, {"w": np.ones((4, 4))}, chunks={"w": (2, 2)})
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_through_the_torch_face_with_a_state_dict(case):
    """``faces.torch.Optimizer`` steps them (factored and empty buffers through torch's
    state_dict and back)."""
    torch = pytest.importorskip("torch")
    from xpoptim.faces.torch import Optimizer

    kind, kwargs = case
    params_np, grads_np = make_problem()
    want, _ = reference.run(kind, kwargs, params_np, grads_np)
    tensors = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params_np.items()}
    opt = Optimizer(list(tensors.items()), getattr(xpoptim, kind)(**kwargs))
    for t, grads in enumerate(grads_np):
        if t == 2:  # a new face from the state dict, mid-run
            sd = opt.state_dict()
            opt = Optimizer(list(tensors.items()), getattr(xpoptim, kind)(**kwargs))
            opt.load_state_dict(sd)
        for k, p in tensors.items():
            p.grad = torch.tensor(grads[k])
        opt.step()
    for k, p in tensors.items():
        np.testing.assert_allclose(p.detach().numpy(), want[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES[1::2], ids=case_id)
def test_through_the_optax_face_under_jit(case):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    from xpoptim.faces.optax import transformation

    jnp = jax.numpy
    kind, kwargs = case
    params_np, grads_np = make_problem(dtype=np.float32)
    want, _ = reference.run(kind, kwargs, params_np, grads_np)
    tx = transformation(getattr(xpoptim, kind)(**kwargs))
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in grads_np:
        updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
    for k in want:
        np.testing.assert_allclose(np.asarray(params[k]), want[k], rtol=2e-5, atol=2e-6)


# -- lazily on Dask, under jax.jit --------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_stays_lazy_on_dask(case, assert_no_compute):
    da = pytest.importorskip("dask.array")
    kind, kwargs = case
    params_np, grads_np = make_problem(steps=3)
    opt = getattr(xpoptim, kind)(**kwargs)
    params = {k: da.from_array(v, chunks=2) for k, v in params_np.items()}
    state = opt.init(params)
    with assert_no_compute():
        for grads in grads_np:
            params, state = opt.update(
                params, {k: da.from_array(v, chunks=2) for k, v in grads.items()}, state
            )
    want, _ = reference.run(kind, kwargs, params_np, grads_np)
    for name in want:
        np.testing.assert_allclose(params[name].compute(), want[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_under_jax_jit(case):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    kind, kwargs = case
    params_np, grads_np = make_problem(dtype=np.float32)
    want, _ = reference.run(kind, kwargs, params_np, grads_np)
    opt = getattr(xpoptim, kind)(**kwargs)
    update = jax.jit(opt.update)
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)._replace(step=jnp.asarray(0))
    for grads in grads_np:
        params, state = update(params, {k: jnp.asarray(v) for k, v in grads.items()}, state)
    assert update._cache_size() == 1
    for name in want:
        got = np.asarray(params[name])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want[name], rtol=2e-5, atol=2e-6, err_msg=name)
