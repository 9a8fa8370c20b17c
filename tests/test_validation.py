"""Bad input: a clear error naming the argument or parameter, and nothing changed."""

from __future__ import annotations

import math

import array_api_compat
import numpy as np
import pytest

import xpoptim

from conftest import Backend, buffers_of

HYPER_CASES = [
    # (class, kwargs, exception, message fragment)
    ("SGD", {"learning_rate": 0.0}, ValueError, "learning_rate must be > 0"),
    ("SGD", {"learning_rate": -0.1}, ValueError, "learning_rate must be > 0"),
    ("Adam", {"learning_rate": math.nan}, ValueError, "learning_rate must be finite"),
    ("Adam", {"learning_rate": math.inf}, ValueError, "learning_rate must be finite"),
    ("SGD", {"learning_rate": "0.1"}, TypeError, "learning_rate must be a real number"),
    ("SGD", {"learning_rate": True}, TypeError, "learning_rate must be a real number"),
    ("SGD", {"momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\)"),
    ("SGD", {"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\)"),
    ("RMSprop", {"decay_rate": 1.0}, ValueError, r"decay_rate must be in \[0, 1\)"),
    ("RMSprop", {"epsilon": 0.0}, ValueError, "epsilon must be > 0"),
    ("Adam", {"beta1": 1.0}, ValueError, r"beta1 must be in \[0, 1\)"),
    ("Adam", {"beta2": -1e-9}, ValueError, r"beta2 must be in \[0, 1\)"),
    ("Adam", {"epsilon": -1e-8}, ValueError, "epsilon must be > 0"),
    ("Adam", {"weight_decay": -0.01}, ValueError, "weight_decay must be >= 0"),
    ("SGD", {"regularization": "l2"}, ValueError, "regularization must be 'L1', 'L2' or None"),
    ("RMSprop", {"regularization": "L3"}, ValueError, "regularization must be"),
    ("Adam", {"regularization": False}, ValueError, "regularization must be"),
]


@pytest.mark.parametrize(("kind", "kwargs", "exc", "match"), HYPER_CASES)
def test_bad_hyperparameters_are_refused(kind, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(xpoptim, kind)(**kwargs)


def test_hyperparameter_set_later_is_checked_before_the_update():
    opt = xpoptim.Adam()
    params = {"w": np.ones(3)}
    state = opt.init(params)
    opt.beta1 = 1.5
    with pytest.raises(ValueError, match="beta1"):
        opt.update(params, {"w": np.ones(3)}, state)
    np.testing.assert_array_equal(params["w"], np.ones(3))


def snapshot(backend, tree):
    return {k: backend.to_numpy(v) for k, v in tree.items()}


def assert_unchanged(backend, before, tree):
    for k, v in before.items():
        got = backend.to_numpy(tree[k])
        assert got.dtype == v.dtype
        np.testing.assert_array_equal(got, v, err_msg=k)


def bad_grads_cases(backend: Backend):
    ok = {"w": np.full((2, 3), 0.5), "bias": np.full(3, 0.5)}
    asx = backend.asarray
    return [
        ("missing", {"w": asx(ok["w"])}, ValueError, r"grads do not match .* missing \['bias'\]"),
        (
            "extra",
            {"w": asx(ok["w"]), "bias": asx(ok["bias"]), "zz": asx(ok["bias"])},
            ValueError,
            r"unexpected \['zz'\]",
        ),
        (
            "shape",
            {"w": asx(ok["w"].T), "bias": asx(ok["bias"])},
            ValueError,
            r"grads\['w'\] has shape \(3, 2\), the parameter \(2, 3\)",
        ),
        (
            "integer dtype",
            {"w": asx(np.ones((2, 3), dtype=np.int64)), "bias": asx(ok["bias"])},
            TypeError,
            r"grads\['w'\] has dtype .*int64.*; a real floating dtype is needed",
        ),
        (
            "float32 for float64",
            {"w": asx(ok["w"], np.float32), "bias": asx(ok["bias"])},
            TypeError,
            r"grads\['w'\] has dtype .*float32.*, the parameter .*float64",
        ),
        (
            "not an array",
            {"w": [[0.5] * 3] * 2, "bias": asx(ok["bias"])},
            TypeError,
            "is not an array",
        ),
        ("not a mapping", [asx(ok["w"])], TypeError, "grads must be a mapping"),
    ]


@pytest.mark.parametrize("kind", ["SGD", "RMSprop", "Adam"])
@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "extra",
        "shape",
        "integer dtype",
        "float32 for float64",
        "not an array",
        "not a mapping",
    ],
)
def test_bad_grads_change_nothing(backend: Backend, kind, case):
    opt = getattr(xpoptim, kind)(weight_decay=0.1)
    params = {
        "w": backend.asarray(np.arange(6.0).reshape(2, 3)),
        "bias": backend.asarray(np.ones(3)),
    }
    state = opt.init(params)
    good = {k: backend.asarray(np.full(p.shape, 0.3)) for k, p in params.items()}
    params, state = opt.update(params, good, state)  # non-zero state to protect
    before_p = snapshot(backend, params)
    before_s = [snapshot(backend, buf) for buf in buffers_of(state)]
    _, grads, exc, match = next(c for c in bad_grads_cases(backend) if c[0] == case)
    with pytest.raises(exc, match=match):
        opt.update(params, grads, state)
    assert state.step == 1
    assert_unchanged(backend, before_p, params)
    for before, buf in zip(before_s, buffers_of(state), strict=True):
        assert_unchanged(backend, before, buf)


def test_grads_from_another_namespace_are_refused(backend: Backend):
    if backend.name == "numpy":
        pytest.skip("needs a second namespace beside NumPy")
    opt = xpoptim.Adam()
    params = {"w": backend.asarray(np.ones(3))}
    state = opt.init(params)
    with pytest.raises(TypeError, match=r"grads\['w'\] belongs to .*numpy"):
        opt.update(params, {"w": np.ones(3)}, state)
    assert_unchanged(backend, {"w": np.ones(3)}, params)


def test_grads_on_another_device_are_refused():
    strict = pytest.importorskip("array_api_strict")
    opt = xpoptim.SGD()
    params = {"w": strict.asarray([1.0, 2.0], device=strict.Device("device1"))}
    state = opt.init(params)
    grads = {"w": strict.asarray([0.1, 0.1], device=strict.Device("CPU_DEVICE"))}
    with pytest.raises(ValueError, match=r"grads\['w'\] is on device .*CPU_DEVICE.*device1"):
        opt.update(params, grads, state)


def test_params_of_mixed_namespaces_are_refused():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="all parameters must share one array namespace"):
        xpoptim.Adam().init({"a": np.ones(2), "b": strict.ones(2)})


def test_integer_params_are_refused():
    with pytest.raises(TypeError, match=r"params\['n'\] has dtype int64"):
        xpoptim.SGD().init({"n": np.arange(3)})


def test_state_from_another_optimizer_is_refused():
    params = {"w": np.ones(3)}
    state = xpoptim.SGD().init(params)
    match = r"state must be AdamState \(from Adam.init\), got SGDState"
    with pytest.raises(TypeError, match=match):
        xpoptim.Adam().update(params, {"w": np.ones(3)}, state)


def test_state_from_other_params_is_refused(backend: Backend):
    opt = xpoptim.Adam()
    params = {"w": backend.asarray(np.ones(3))}
    other = opt.init({"v": backend.asarray(np.ones(3))})
    with pytest.raises(ValueError, match=r"state.momentums do not match the parameter names"):
        opt.update(params, {"w": backend.asarray(np.ones(3))}, other)
    other = opt.init({"w": backend.asarray(np.ones(4))})
    with pytest.raises(
        ValueError, match=r"state.momentums\['w'\] has shape \(4,\), the parameter \(3,\)"
    ):
        opt.update(params, {"w": backend.asarray(np.ones(3))}, other)
    assert_unchanged(backend, {"w": np.ones(3)}, params)


def test_bad_step_count_is_refused():
    opt = xpoptim.Adam()
    params = {"w": np.ones(3)}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"state\.step must be >= 0"):
        opt.update(params, {"w": np.ones(3)}, state._replace(step=-1))
    with pytest.raises(TypeError, match=r"state\.step must be an integer"):
        opt.update(params, {"w": np.ones(3)}, state._replace(step="3"))


def test_bad_layers_are_refused_before_anything_changes():
    class Layer:
        def __init__(self, params):
            self.params = params

    w = np.ones(3)
    good = Layer({"weights": (w, np.ones(3))})
    opt = xpoptim.SGD()
    with pytest.raises(
        TypeError, match=r"layers\[1\].params\['b'\] must be a \(param, grad\) pair"
    ):
        opt.step([good, Layer({"b": np.ones(3)})])
    with pytest.raises(TypeError, match=r"layers\[1\].params must map names"):
        opt.step([good, Layer([w])])
    with pytest.raises(ValueError, match=r"grads\['1.b'\] has shape"):
        opt.step([good, Layer({"b": (np.ones(3), np.ones(4))})])
    np.testing.assert_array_equal(w, np.ones(3))
    assert opt.state is None


@pytest.mark.parametrize(
    ("step", "exc", "match"),
    [
        (np.array(-5), ValueError, r"state\.step must be >= 0, got -5"),
        (np.array(2.7), TypeError, r"state\.step must be an integer, got dtype float64"),
        (np.array([3]), TypeError, r"state\.step must be a 0-d integer array, got shape \(1,\)"),
        (True, TypeError, r"state\.step must be an integer"),
    ],
    ids=["negative 0-d", "float 0-d", "1-d", "bool"],
)
def test_bad_step_arrays_are_refused_before_anything_changes(step, exc, match):
    opt = xpoptim.Adam()
    params = {"w": np.ones(3)}
    state = opt.init(params)
    with pytest.raises(exc, match=match):
        opt.update(params, {"w": np.full(3, 0.5)}, state._replace(step=step))
    np.testing.assert_array_equal(params["w"], np.ones(3))
    np.testing.assert_array_equal(state.momentums["w"], np.zeros(3))
    np.testing.assert_array_equal(state.velocities["w"], np.zeros(3))


def test_a_numpy_step_count_keeps_float32_state_float32():
    """A NumPy integer count would make the bias corrections float64 scalars."""
    opt = xpoptim.Adam()
    params = {"w": np.ones(3, np.float32)}
    state = opt.init(params)._replace(step=np.int64(4))
    xp = array_api_compat.array_namespace(params["w"])
    scalars = opt._step_scalars(opt._check_state(state, params, xp) + 1)
    assert all(type(v) in (float, bool) for v in scalars.values()), scalars


def test_a_failing_no_decay_predicate_changes_nothing(backend: Backend):
    """The predicate is user code: if it fails on one parameter, none is updated."""
    fail = {"on": None}

    def predicate(name):
        if name == fail["on"]:
            raise RuntimeError(f"predicate failed on {name}")
        return False

    opt = xpoptim.SGD(learning_rate=0.1, no_decay=predicate)
    params = {"a": backend.asarray(np.ones(2)), "b": backend.asarray(np.ones(2))}
    state = opt.init(params)
    fail["on"] = "b"
    with pytest.raises(RuntimeError, match="predicate failed on b"):
        opt.update(params, {k: backend.asarray(np.ones(2)) for k in params}, state)
    assert_unchanged(backend, {"a": np.ones(2), "b": np.ones(2)}, params)
    for buffers in buffers_of(state):
        assert_unchanged(backend, {"a": np.zeros(2), "b": np.zeros(2)}, buffers)
