"""Gradient clipping, accumulation (MultiSteps) and parameter groups: on every backend
against the float64 reference, against torch/optax where they define the same thing, lazily
on Dask and under ``jax.jit``."""

from __future__ import annotations

import json

import numpy as np
import pytest

import xpoptim
from xpoptim import transforms

import reference
from conftest import Backend, tolerance


def make_grads(seed: int = 11):
    rng = np.random.default_rng(seed)
    # One large gradient and two small ones: per-parameter clipping touches only the first.
    return {
        "a.weights": rng.normal(size=(4, 3)) * 3.0,
        "a.bias": rng.normal(size=(3,)) * 0.1,
        "b.weights": rng.normal(size=(2, 2)) * 0.1,
    }


def to_backend(backend: Backend, arrays, dtype=None):
    return {k: backend.asarray(v, dtype) for k, v in arrays.items()}


CLIPS = [
    ("value", lambda g: transforms.clip_by_value(g, 0.5), lambda g: reference.clip_value(g, 0.5)),
    ("norm", lambda g: transforms.clip_by_norm(g, 1.0), lambda g: reference.clip_norm(g, 1.0)),
    (
        "global-norm",
        lambda g: transforms.clip_by_global_norm(g, 2.0),
        lambda g: reference.clip_global_norm(g, 2.0),
    ),
    (
        "global-norm-inactive",
        lambda g: transforms.clip_by_global_norm(g, 1e3),
        lambda g: reference.clip_global_norm(g, 1e3),
    ),
]


@pytest.mark.parametrize("clip", CLIPS, ids=[c[0] for c in CLIPS])
def test_clipping_matches_reference(backend: Backend, dtype, clip):
    _, ours, ref = clip
    grads_np = {k: v.astype(dtype) for k, v in make_grads().items()}
    want = ref(grads_np)
    grads = to_backend(backend, grads_np, dtype)
    got = ours(grads)
    for name in want:
        out = backend.to_numpy(got[name])
        assert out.dtype == dtype
        np.testing.assert_allclose(out, want[name], **tolerance(dtype), err_msg=name)
        # The input is never modified.
        np.testing.assert_array_equal(backend.to_numpy(grads[name]), grads_np[name])
    if ref is not CLIPS[3][2]:
        assert any(not np.allclose(want[k], grads_np[k]) for k in want), "clip did nothing"


def test_global_norm_matches_reference(backend: Backend):
    grads_np = make_grads()
    want = np.sqrt(sum(np.sum(g**2) for g in grads_np.values()))
    got = transforms.global_norm(to_backend(backend, grads_np))
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-12)


def test_global_norm_keeps_each_dtype():
    grads = {"a": np.ones(4, dtype=np.float32) * 3, "b": np.ones(1, dtype=np.float64) * 4}
    out = transforms.clip_by_global_norm(grads, 1.0)
    assert out["a"].dtype == np.float32
    assert out["b"].dtype == np.float64
    np.testing.assert_allclose(out["a"], 3 / np.sqrt(4 * 9 + 16), rtol=1e-6)


def test_global_norm_clipping_is_one_lazy_reduction_on_dask(assert_no_compute):
    da = pytest.importorskip("dask.array")
    grads_np = make_grads()
    grads = {k: da.from_array(v, chunks=2) for k, v in grads_np.items()}
    with assert_no_compute():
        per_param = transforms.clip_by_norm(grads, 1.0)
        clipped = transforms.clip_by_global_norm(grads, 2.0)
    # Every clipped gradient hangs off one and the same global norm: one sqrt in the
    # merged graph (one per parameter for per-parameter clipping).
    import dask

    def sqrt_layers(arrays):
        names = set()
        for a in arrays.values():
            names |= {k[0] if isinstance(k, tuple) else k for k in dict(a.__dask_graph__())}
        return {name for name in names if str(name).startswith("sqrt-")}

    assert len(sqrt_layers(clipped)) == 1
    assert len(sqrt_layers(per_param)) == len(grads)
    want = reference.clip_global_norm(grads_np, 2.0)
    (computed,) = dask.compute(clipped)
    for name in want:
        np.testing.assert_allclose(computed[name], want[name], rtol=1e-12)


def test_clipping_matches_torch_and_optax():
    grads_np = make_grads()
    torch = pytest.importorskip("torch")
    tensors = [
        torch.zeros(v.shape, dtype=torch.float64, requires_grad=True) for v in grads_np.values()
    ]
    for t, g in zip(tensors, grads_np.values(), strict=True):
        t.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_(tensors, max_norm=2.0)
    ours = transforms.clip_by_global_norm(grads_np, 2.0)
    for t, name in zip(tensors, grads_np, strict=True):
        # torch divides by (norm + 1e-6): equal up to that.
        np.testing.assert_allclose(ours[name], t.grad.numpy(), rtol=1e-6)
    for t, g in zip(tensors, grads_np.values(), strict=True):
        t.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_value_(tensors, clip_value=0.5)
    ours = transforms.clip_by_value(grads_np, 0.5)
    for t, name in zip(tensors, grads_np, strict=True):
        np.testing.assert_array_equal(ours[name], t.grad.numpy())


def test_clip_by_global_norm_matches_optax():
    optax = pytest.importorskip("optax")
    grads_np = {k: v.astype(np.float32) for k, v in make_grads().items()}
    transform = optax.clip_by_global_norm(2.0)
    theirs, _ = transform.update(grads_np, transform.init(grads_np))
    ours = transforms.clip_by_global_norm(grads_np, 2.0)
    for name in grads_np:
        np.testing.assert_allclose(ours[name], np.asarray(theirs[name]), rtol=2e-6)


# -- the Clipped wrapper --------------------------------------------------------------------


def make_problem(seed: int = 13, steps: int = 6):
    rng = np.random.default_rng(seed)
    shapes = {"encoder.weights": (3, 3), "encoder.bias": (3,), "head.weights": (3, 2)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s) * 2.0 for k, s in shapes.items()} for _ in range(steps)]
    return params, grads


def run(backend: Backend, opt, params_np, grads_np, dtype=None):
    params = to_backend(backend, params_np, dtype)
    state = opt.init(params)
    for grads in grads_np:
        params, state = opt.update(params, to_backend(backend, grads, dtype), state)
    return {k: backend.to_numpy(v) for k, v in params.items()}, state


def test_clipped_optimizer_matches_reference(backend: Backend, dtype):
    params_np, grads_np = make_problem()
    params_np = {k: v.astype(dtype) for k, v in params_np.items()}
    grads_np = [{k: v.astype(dtype) for k, v in g.items()} for g in grads_np]
    clipped = [reference.clip_global_norm(reference.clip_value(g, 1.5), 3.0) for g in grads_np]
    want, _ = reference.run("Adam", {"learning_rate": 0.05}, params_np, clipped)
    opt = transforms.Clipped(xpoptim.Adam(learning_rate=0.05), max_value=1.5, max_global_norm=3.0)
    got, state = run(backend, opt, params_np, grads_np, dtype)
    assert isinstance(state, xpoptim.AdamState)
    for name in want:
        assert got[name].dtype == dtype
        np.testing.assert_allclose(got[name], want[name], **tolerance(dtype), err_msg=name)


# -- gradient accumulation ------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "kwargs"), [("SGD", {"momentum": 0.9}), ("Adam", {})])
def test_multisteps_is_one_step_on_the_mean_gradient(backend: Backend, dtype, kind, kwargs):
    k = 3
    params_np, grads_np = make_problem(steps=2 * k)
    params_np = {n: v.astype(dtype) for n, v in params_np.items()}
    grads_np = [{n: v.astype(dtype) for n, v in g.items()} for g in grads_np]
    want_first, _ = reference.run(kind, kwargs, params_np, reference.mean_every(grads_np[:k], k))
    want, _ = reference.run(kind, kwargs, params_np, reference.mean_every(grads_np, k))
    opt = transforms.MultiSteps(getattr(xpoptim, kind)(**kwargs), every_k=k)
    params = to_backend(backend, params_np, dtype)
    state = opt.init(params)
    for i, grads in enumerate(grads_np, start=1):
        params, state = opt.update(params, to_backend(backend, grads, dtype), state)
        assert state.mini_step == i % k
        if i % k:  # accumulating: the parameters do not move
            expected = params_np if i < k else want_first
            for name in expected:
                np.testing.assert_allclose(
                    backend.to_numpy(params[name]), expected[name], **tolerance(dtype)
                )
    assert state.inner.step == 2
    for name in want:
        got = backend.to_numpy(params[name])
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want[name], **tolerance(dtype), err_msg=name)


def test_multisteps_matches_optax():
    optax = pytest.importorskip("optax")
    params_np, grads_np = make_problem(steps=4)
    params_np = {k: v.astype(np.float32) for k, v in params_np.items()}
    grads_np = [{k: v.astype(np.float32) for k, v in g.items()} for g in grads_np]
    theirs = optax.MultiSteps(optax.adam(0.05), every_k_schedule=2)
    their_params, their_state = dict(params_np), theirs.init(params_np)
    for grads in grads_np:
        updates, their_state = theirs.update(grads, their_state, their_params)
        their_params = optax.apply_updates(their_params, updates)
    ours = transforms.MultiSteps(xpoptim.Adam(0.05, regularization=None), every_k=2)
    got, _ = run(Backend("numpy", "numpy", eager_writeable=True), ours, params_np, grads_np)
    for name in params_np:
        np.testing.assert_allclose(got[name], np.asarray(their_params[name]), rtol=2e-5, atol=2e-6)


def test_multisteps_under_jax_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    k = 2
    params_np, grads_np = make_problem(steps=2 * k)
    params_np = {n: v.astype(np.float32) for n, v in params_np.items()}
    grads_np = [{n: v.astype(np.float32) for n, v in g.items()} for g in grads_np]
    want, _ = reference.run("Adam", {}, params_np, reference.mean_every(grads_np, k))
    opt = transforms.MultiSteps(transforms.Clipped(xpoptim.Adam(), max_global_norm=1e6), every_k=k)
    update = jax.jit(opt.update)
    params = {n: jnp.asarray(v) for n, v in params_np.items()}
    state = opt.init(params)
    state = state._replace(
        mini_step=jnp.asarray(0), inner=state.inner._replace(step=jnp.asarray(0))
    )
    for grads in grads_np:
        params, state = update(params, {n: jnp.asarray(v) for n, v in grads.items()}, state)
    assert int(state.inner.step) == 2
    assert int(state.mini_step) == 0
    for name in want:
        got = np.asarray(params[name])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want[name], rtol=2e-5, atol=2e-6)


def test_multisteps_stays_lazy_on_dask(assert_no_compute):
    da = pytest.importorskip("dask.array")
    params_np, grads_np = make_problem(steps=4)
    want, _ = reference.run("SGD", {}, params_np, reference.mean_every(grads_np, 2))
    opt = transforms.MultiSteps(transforms.Clipped(xpoptim.SGD(), max_norm=100.0), every_k=2)
    params = {k: da.from_array(v, chunks=2) for k, v in params_np.items()}
    state = opt.init(params)
    with assert_no_compute():
        for grads in grads_np:
            params, state = opt.update(
                params, {k: da.from_array(v, chunks=2) for k, v in grads.items()}, state
            )
    for name in want:
        np.testing.assert_allclose(params[name].compute(), want[name], rtol=1e-12)


class Layer:
    def __init__(self, params, grads):
        self.params = {k: (params[k], grads[k]) for k in params}


def test_wrappers_step_layers(backend: Backend):
    if not backend.eager_writeable:
        pytest.skip(f"{backend.name} arrays cannot be updated in place")
    params_np, grads_np = make_problem(steps=4)
    # MultiSteps outside Clipped: the mean of the micro-batches is what gets clipped.
    clipped = [reference.clip_norm(g, 1.0) for g in reference.mean_every(grads_np, 2)]
    want, _ = reference.run("RMSprop", {}, params_np, clipped)
    opt = transforms.MultiSteps(transforms.Clipped(xpoptim.RMSprop(), max_norm=1.0), every_k=2)
    params = to_backend(backend, params_np)
    for grads in grads_np:
        opt.step([Layer(params, to_backend(backend, grads))])
    for name in want:
        np.testing.assert_allclose(backend.to_numpy(params[name]), want[name], rtol=1e-12)
    with pytest.raises(ValueError, match="was started with"):
        opt.step(
            [
                Layer(
                    {"x": params["head.weights"]},
                    {"x": to_backend(backend, grads_np[0])["head.weights"]},
                )
            ]
        )


# -- parameter groups --------------------------------------------------------------------------


def test_param_groups_match_reference(backend: Backend, dtype):
    params_np, grads_np = make_problem()
    params_np = {k: v.astype(dtype) for k, v in params_np.items()}
    grads_np = [{k: v.astype(dtype) for k, v in g.items()} for g in grads_np]
    base = {"learning_rate": 0.05, "momentum": 0.5, "weight_decay": 0.01}
    encoder = ["encoder.weights", "encoder.bias"]
    # The encoder group: a smaller rate and a larger decay; bias decayed too there.
    enc_config = {**base, "learning_rate": 0.01, "weight_decay": 0.2, "no_decay": ()}
    want_enc, _ = reference.run(
        "SGD",
        enc_config,
        {k: params_np[k] for k in encoder},
        [{k: g[k] for k in encoder} for g in grads_np],
    )
    want_head, _ = reference.run(
        "SGD",
        base,
        {"head.weights": params_np["head.weights"]},
        [{"head.weights": g["head.weights"]} for g in grads_np],
    )
    opt = transforms.ParamGroups(
        xpoptim.SGD(**base),
        [{"params": ["encoder.*"], "learning_rate": 0.01, "weight_decay": 0.2, "no_decay": []}],
    )
    assert opt.group_of("encoder.bias") == 0
    assert opt.group_of("head.weights") == 1
    got, state = run(backend, opt, params_np, grads_np, dtype)
    assert [s.step for s in state.groups] == [len(grads_np)] * 2
    for name, want in {**want_enc, **want_head}.items():
        assert got[name].dtype == dtype
        np.testing.assert_allclose(got[name], want, **tolerance(dtype), err_msg=name)


def test_param_groups_match_torch():
    torch = pytest.importorskip("torch")
    params_np, grads_np = make_problem()
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params_np.items()}
    theirs = torch.optim.SGD(
        [
            {"params": [tensors["encoder.weights"], tensors["encoder.bias"]], "lr": 0.01},
            {"params": [tensors["head.weights"]], "weight_decay": 0.2},
        ],
        lr=0.05,
        momentum=0.5,
        weight_decay=0.0,
    )
    for grads in grads_np:
        for k, t in tensors.items():
            t.grad = torch.tensor(grads[k])
        theirs.step()
    ours = transforms.ParamGroups(
        xpoptim.SGD(learning_rate=0.05, momentum=0.5, regularization=None),
        [
            {"params": lambda name: name.startswith("encoder."), "learning_rate": 0.01},
            {"params": ["head.*"], "regularization": "L2", "weight_decay": 0.2},
        ],
    )
    got, _ = run(Backend("numpy", "numpy", eager_writeable=True), ours, params_np, grads_np)
    for name, t in tensors.items():
        np.testing.assert_allclose(got[name], t.detach().numpy(), rtol=1e-10, err_msg=name)


def test_wrapper_configs_round_trip():
    opt = transforms.MultiSteps(
        transforms.Clipped(
            transforms.ParamGroups(
                xpoptim.AdamW(learning_rate=xpoptim.schedules.StepDecay(0.1, 5)),
                [{"params": ["emb*"], "weight_decay": 0.0}],
            ),
            max_norm=1.0,
        ),
        every_k=4,
    )
    config = json.loads(json.dumps(opt.get_config()))
    again = transforms.from_config(config)
    assert again.get_config() == config
    assert isinstance(again.optimizer.optimizer, transforms.ParamGroups)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: transforms.Clipped(xpoptim.SGD()), "needs max_value, max_norm or max_global_norm"),
        (lambda: transforms.Clipped(xpoptim.SGD(), max_norm=-1), "max_norm must be > 0"),
        (lambda: transforms.Clipped(object(), max_norm=1), "optimizer must be an xpoptim"),
        (lambda: transforms.MultiSteps(xpoptim.SGD(), every_k=0), "every_k must be >= 1"),
        (
            lambda: transforms.ParamGroups(xpoptim.SGD(), [{"params": ["a"], "lr": 0.1}]),
            "groups\\[0\\]: .*lr",
        ),
        (lambda: transforms.ParamGroups(xpoptim.SGD(), [{"lr": 0.1}]), "'params' entry"),
        (
            lambda: transforms.ParamGroups(xpoptim.SGD(), [{"params": ["a"], "momentum": 2.0}]),
            "groups\\[0\\]: momentum must be in",
        ),
        (lambda: transforms.clip_by_value({"w": np.ones(2)}, 0), "max_value must be > 0"),
        (lambda: transforms.global_norm({}), "grads is empty"),
        (lambda: transforms.from_config({"type": "Nope"}), "'Nope' is not an xpoptim"),
    ],
)
def test_bad_transform_arguments_are_named(factory, message):
    with pytest.raises((TypeError, ValueError), match=message):
        factory()


def test_bad_grads_change_nothing():
    opt = transforms.MultiSteps(xpoptim.SGD(), every_k=2)
    params = {"w": np.ones(3)}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape"):
        opt.update(params, {"w": np.ones(4)}, state)
    np.testing.assert_array_equal(state.accumulated["w"], np.zeros(3))
    with pytest.raises(TypeError, match="state must be a MultiStepsState"):
        opt.update(params, {"w": np.ones(3)}, xpoptim.SGD().init(params))


def test_multisteps_reads_an_array_mini_step_on_eager_backends(backend: Backend):
    """A 0-d array count on an eager backend must not trigger the in-place update early."""
    if not backend.eager_writeable:
        pytest.skip(f"{backend.name}: covered by the jax.jit and Dask tests")
    params_np, grads_np = make_problem(steps=2)
    want, _ = reference.run("SGD", {}, params_np, reference.mean_every(grads_np, 2))
    opt = transforms.MultiSteps(xpoptim.SGD(), every_k=2)
    params = to_backend(backend, params_np)
    state = opt.init(params)
    state = state._replace(mini_step=backend.xp.asarray(0))
    params, state = opt.update(params, to_backend(backend, grads_np[0]), state)
    for name in params_np:
        np.testing.assert_array_equal(backend.to_numpy(params[name]), params_np[name])
    params, state = opt.update(params, to_backend(backend, grads_np[1]), state)
    for name in want:
        np.testing.assert_allclose(backend.to_numpy(params[name]), want[name], rtol=1e-12)


def test_clipping_and_groups_under_jax_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    params_np, grads_np = make_problem(steps=3)
    params_np = {n: v.astype(np.float32) for n, v in params_np.items()}
    grads_np = [{n: v.astype(np.float32) for n, v in g.items()} for g in grads_np]
    clipped = [reference.clip_global_norm(reference.clip_norm(g, 1.0), 1.5) for g in grads_np]
    head = ["head.weights"]
    want_head, _ = reference.run(
        "Adam",
        {"learning_rate": 0.01},
        {k: params_np[k] for k in head},
        [{k: g[k] for k in head} for g in clipped],
    )
    encoder = ["encoder.weights", "encoder.bias"]
    want_enc, _ = reference.run(
        "Adam",
        {"learning_rate": 0.05},
        {k: params_np[k] for k in encoder},
        [{k: g[k] for k in encoder} for g in clipped],
    )
    opt = transforms.Clipped(
        transforms.ParamGroups(
            xpoptim.Adam(learning_rate=0.05), [{"params": ["head.*"], "learning_rate": 0.01}]
        ),
        max_norm=1.0,
        max_global_norm=1.5,
    )
    update = jax.jit(opt.update)
    params = {n: jnp.asarray(v) for n, v in params_np.items()}
    state = opt.init(params)
    state = state._replace(groups=tuple(s._replace(step=jnp.asarray(0)) for s in state.groups))
    for grads in grads_np:
        params, state = update(params, {n: jnp.asarray(v) for n, v in grads.items()}, state)
    assert update._cache_size() == 1
    for name, want in {**want_head, **want_enc}.items():
        got = np.asarray(params[name])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=name)


def test_multisteps_k_th_call_with_a_bad_inner_state_changes_nothing():
    opt = transforms.MultiSteps(xpoptim.SGD(), every_k=2)
    params = {"w": np.ones(3)}
    state = opt.init(params)
    _, state = opt.update(params, {"w": np.ones(3)}, state)
    bad = state._replace(inner=xpoptim.Adam().init(params))
    with pytest.raises(TypeError, match="state must be SGDState"):
        opt.update(params, {"w": np.ones(3)}, bad)
    np.testing.assert_array_equal(state.accumulated["w"], np.ones(3))
    np.testing.assert_array_equal(params["w"], np.ones(3))


def test_param_groups_share_a_plateau_schedule():
    plateau = xpoptim.schedules.ReduceOnPlateau(0.1, factor=0.5, patience=0)
    opt = transforms.ParamGroups(
        xpoptim.SGD(learning_rate=plateau, momentum=0.0, regularization=None),
        [{"params": ["a"], "weight_decay": 0.0}, {"params": ["b"], "learning_rate": 0.2}],
    )
    params = {"a": np.ones(1), "b": np.ones(1), "c": np.ones(1)}
    state = opt.init(params)
    plateau.observe(1.0)
    plateau.observe(1.0)  # the rate halves for every group that did not set its own
    params, state = opt.update(params, {k: np.ones(1) for k in params}, state)
    np.testing.assert_allclose([params["a"][0], params["b"][0], params["c"][0]], [0.95, 0.8, 0.95])


def test_param_groups_check_every_group_before_any_changes():
    opt = transforms.ParamGroups(xpoptim.SGD(), [{"params": ["a"], "learning_rate": 0.2}])
    params = {"a": np.ones(2), "b": np.ones(2)}
    state = opt.init(params)
    opt.optimizer.momentum = 5.0  # the default group, updated last, is now invalid
    with pytest.raises(ValueError, match="momentum must be in"):
        opt.update(params, {k: np.ones(2) for k in params}, state)
    np.testing.assert_array_equal(params["a"], np.ones(2))
