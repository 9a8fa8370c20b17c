"""Nesterov, centered RMSprop with momentum, AMSGrad, AdamW and ``no_decay``: on every
backend against the float64 reference, and against torch.optim where it defines the same
update."""

from __future__ import annotations

import json

import numpy as np
import pytest

import xpoptim

import reference
from conftest import Backend, tolerance

STEPS = 4

# (class name, constructor kwargs): each switches on a variant of this issue.
VARIANTS = [
    ("SGD", {"learning_rate": 0.05, "momentum": 0.8, "nesterov": True}),
    ("RMSprop", {"learning_rate": 0.01, "decay_rate": 0.8, "centered": True}),
    ("RMSprop", {"learning_rate": 0.01, "momentum": 0.7}),
    ("RMSprop", {"learning_rate": 0.01, "centered": True, "momentum": 0.7, "epsilon": 1e-6}),
    ("Adam", {"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.95, "amsgrad": True}),
    ("AdamW", {"learning_rate": 0.02, "weight_decay": 0.1}),
    ("AdamW", {"learning_rate": 0.02, "weight_decay": 0.1, "amsgrad": True}),
    ("SGD", {"learning_rate": 0.05, "no_decay": ["bias", "*.gamma"]}),
    ("Adam", {"learning_rate": 0.02, "no_decay": lambda name: name.startswith("bn.")}),
]


def variant_id(case):
    kind, kwargs = case
    flags = [k for k in kwargs if k not in ("learning_rate", "decay_rate", "beta1", "beta2")]
    return "-".join([kind, *flags])


def make_problem(seed: int = 1, steps: int = STEPS):
    rng = np.random.default_rng(seed)
    shapes = {"dense.weights": (4, 3), "dense.bias": (3,), "bn.gamma": (3,), "bn.scale": (1, 3)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    # Shrinking gradients, so that AMSGrad's maximum differs from v.
    grads = [
        {k: rng.normal(size=s) * 0.5**step for k, s in shapes.items()} for step in range(steps)
    ]
    return params, grads


def run_xpoptim(backend: Backend, opt, params_np, grads_np, dtype):
    params = {k: backend.asarray(v, dtype) for k, v in params_np.items()}
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(
            params, {k: backend.asarray(v, dtype) for k, v in grads.items()}, state
        )
    return params, state


# AdamW has only decoupled decay: no L1 case for it.
REFERENCE_CASES = [
    pytest.param(case, reg, id=f"{variant_id(case)}-{reg}")
    for case in VARIANTS
    for reg in ("L1", "L2")
    if not (case[0] == "AdamW" and reg == "L1")
]


@pytest.mark.parametrize(("case", "reg"), REFERENCE_CASES)
def test_variant_matches_reference(backend: Backend, dtype, case, reg):
    kind, kwargs = case
    config = dict(kwargs)
    if kind != "AdamW":
        config.update(regularization=reg, weight_decay=0.05)
    params_np, grads_np = make_problem()
    params_np = {k: v.astype(dtype) for k, v in params_np.items()}
    grads_np = [{k: v.astype(dtype) for k, v in g.items()} for g in grads_np]
    want_params, want_state = reference.run(kind, config, params_np, grads_np)

    params, state = run_xpoptim(
        backend, getattr(xpoptim, kind)(**config), params_np, grads_np, dtype
    )
    assert state.step == STEPS
    for name, want in want_params.items():
        got = backend.to_numpy(params[name])
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=name)
    for field, buffers in want_state.items():
        for name, want in buffers.items():
            got = backend.to_numpy(getattr(state, field)[name])
            np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=f"{field}[{name}]")
    # Fields the options do not use stay None (no memory is spent on them).
    for field in type(state)._fields[1:]:
        if field not in want_state:
            assert getattr(state, field) is None, field


class Layer:
    def __init__(self, params, grads):
        self._params, self._grads = params, grads

    @property
    def params(self):
        return {k: (self._params[k], self._grads[k]) for k in self._params}


@pytest.mark.parametrize("case", VARIANTS[:7], ids=variant_id)
def test_variant_step_layers_matches_reference(backend: Backend, case):
    if not backend.eager_writeable:
        pytest.skip(f"{backend.name} arrays cannot be updated in place")
    kind, kwargs = case
    params_np, grads_np = make_problem()
    want, _ = reference.run(kind, kwargs, params_np, grads_np)
    opt = getattr(xpoptim, kind)(**kwargs)
    params = {k: backend.asarray(v) for k, v in params_np.items()}
    for grads in grads_np:
        opt.step([Layer(params, {k: backend.asarray(v) for k, v in grads.items()})])
    for name in params:
        np.testing.assert_allclose(
            backend.to_numpy(params[name]), want[name], rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("case", VARIANTS, ids=variant_id)
def test_variant_config_round_trip(case):
    kind, kwargs = case
    opt = getattr(xpoptim, kind)(**kwargs)
    config = opt.get_config()
    assert config["type"] == kind
    for key, value in kwargs.items():
        assert config[key] == value, key
    again = type(opt).from_config(config)
    assert again.get_config() == config
    if not callable(kwargs.get("no_decay")):
        assert type(opt).from_config(json.loads(json.dumps(config))).get_config() == config


def test_seed_configs_keep_the_seed_keys():
    """Options left at their defaults do not appear: a seed config stays the seed's."""
    assert set(xpoptim.SGD().get_config()) == {
        "type",
        "learning_rate",
        "regularization",
        "weight_decay",
        "momentum",
    }
    assert "amsgrad" not in xpoptim.Adam().get_config()
    assert "regularization" not in xpoptim.AdamW().get_config()


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        ("SGD", {"nesterov": True, "momentum": 0.0}, "nesterov=True needs momentum > 0"),
        ("SGD", {"nesterov": 1}, "nesterov must be True or False"),
        ("RMSprop", {"momentum": 1.5}, "momentum must be in"),
        ("RMSprop", {"centered": "yes"}, "centered must be True or False"),
        ("Adam", {"amsgrad": None}, "amsgrad must be True or False"),
        ("Adam", {"no_decay": "bias"}, "no_decay must be a sequence of name patterns"),
        ("AdamW", {"weight_decay": -1.0}, "weight_decay must be >= 0"),
    ],
)
def test_bad_options_are_named(kind, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        getattr(xpoptim, kind)(**kwargs)


def test_adamw_refuses_other_regularization():
    opt = xpoptim.AdamW()
    opt.regularization = "L1"
    params = {"w": np.ones(2)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="AdamW always uses decoupled"):
        opt.update(params, {"w": np.ones(2)}, state)
    np.testing.assert_array_equal(params["w"], np.ones(2))


def test_no_decay_selects_by_glob_substring_and_predicate():
    opt = xpoptim.SGD(no_decay=["bias", "layer?.scale", "emb*"])
    assert not opt.is_decayed("0.bias")
    assert not opt.is_decayed("layer1.scale")
    assert opt.is_decayed("layer12.scale")
    assert not opt.is_decayed("embedding")
    assert opt.is_decayed("0.weights")
    everything = xpoptim.SGD(no_decay=())
    assert everything.is_decayed("0.bias")
    assert xpoptim.SGD(no_decay=lambda n: n == "w").is_decayed("v")


# -- against torch.optim ------------------------------------------------------------------


def _torch_run(torch, make_opt, params_np, grads_np):
    tensors = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params_np.items()
    }
    opt = make_opt(list(tensors.values()))
    for grads in grads_np:
        for k, t in tensors.items():
            t.grad = torch.tensor(grads[k], dtype=torch.float64)
        opt.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


def _ours(opt, params_np, grads_np):
    params = {k: v.copy() for k, v in params_np.items()}
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(params, grads, state)
    return params


PEERS = [
    # (ours, torch factory); weight decay off or on names that both decay.
    (
        lambda: xpoptim.SGD(learning_rate=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        lambda torch, ps: torch.optim.SGD(
            ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01
        ),
    ),
    (
        lambda: xpoptim.RMSprop(
            learning_rate=0.01, decay_rate=0.8, centered=True, momentum=0.7, regularization=None
        ),
        lambda torch, ps: torch.optim.RMSprop(
            ps, lr=0.01, alpha=0.8, eps=1e-8, centered=True, momentum=0.7
        ),
    ),
    (
        lambda: xpoptim.RMSprop(learning_rate=0.01, momentum=0.5, weight_decay=0.02),
        lambda torch, ps: torch.optim.RMSprop(
            ps, lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5, weight_decay=0.02
        ),
    ),
    (
        lambda: xpoptim.Adam(learning_rate=0.02, amsgrad=True, regularization=None),
        lambda torch, ps: torch.optim.Adam(ps, lr=0.02, amsgrad=True),
    ),
]


@pytest.mark.parametrize(
    "peer", PEERS, ids=["sgd-nesterov", "rmsprop-centered", "rmsprop-mom", "amsgrad"]
)
def test_variant_matches_torch(peer):
    torch = pytest.importorskip("torch")
    ours_factory, torch_factory = peer
    rng = np.random.default_rng(5)
    params_np = {"w": rng.normal(size=(3, 4)), "v": rng.normal(size=(5,))}
    grads_np = [
        {k: rng.normal(size=v.shape) * 0.6**t for k, v in params_np.items()} for t in range(6)
    ]
    want = _torch_run(torch, lambda ps: torch_factory(torch, ps), params_np, grads_np)
    got = _ours(ours_factory(), params_np, grads_np)
    for name in params_np:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_adamw_decay_ordering_against_torch():
    """The documented difference: xpoptim decays the updated weights, torch the previous ones.

    One step from the same start: ours = adam_step(w) * (1 - lr*wd), torch's
    = w * (1 - lr*wd) - (w - adam_step(w)).
    """
    torch = pytest.importorskip("torch")
    lr, wd = 0.05, 0.2
    rng = np.random.default_rng(7)
    params_np = {"w": rng.normal(size=(6,))}
    grads_np = [{"w": rng.normal(size=(6,))}]
    adam_only = _torch_run(torch, lambda ps: torch.optim.Adam(ps, lr=lr), params_np, grads_np)["w"]
    torch_adamw = _torch_run(
        torch, lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd), params_np, grads_np
    )["w"]
    ours = _ours(xpoptim.AdamW(learning_rate=lr, weight_decay=wd), params_np, grads_np)["w"]
    w0 = params_np["w"]
    np.testing.assert_allclose(ours, adam_only * (1 - lr * wd), rtol=1e-12)
    np.testing.assert_allclose(torch_adamw, w0 * (1 - lr * wd) - (w0 - adam_only), rtol=1e-12)
    # The two orderings differ by lr**2 * wd * (Adam's step / lr): second order, not zero.
    np.testing.assert_allclose(ours - torch_adamw, lr * wd * (w0 - adam_only), rtol=1e-9)
    assert np.max(np.abs(ours - torch_adamw)) > 1e-4


@pytest.mark.parametrize("case", VARIANTS[:7], ids=variant_id)
def test_variant_under_jax_jit(case):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    kind, kwargs = case
    params_np, grads_np = make_problem()
    params_np = {k: v.astype(np.float32) for k, v in params_np.items()}
    grads_np = [{k: v.astype(np.float32) for k, v in g.items()} for g in grads_np]
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


@pytest.mark.parametrize("case", VARIANTS[:7], ids=variant_id)
def test_variant_stays_lazy_on_dask(case, assert_no_compute):
    da = pytest.importorskip("dask.array")
    kind, kwargs = case
    params_np, grads_np = make_problem()
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
