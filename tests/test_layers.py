"""The seed's layer protocol: ``optimizer.step(layers)`` updates in place, state keyed by name."""

from __future__ import annotations

import numpy as np
import pytest

import xpoptim

import reference
from conftest import Backend, tolerance


class Layer:
    def __init__(self, backend: Backend, **arrays):
        self.values = {k: backend.asarray(v) for k, v in arrays.items()}
        self.grads = {k: backend.asarray(np.zeros_like(v)) for k, v in arrays.items()}

    @property
    def params(self):
        return {k: (self.values[k], self.grads[k]) for k in self.values}


class Activation:
    pass


@pytest.fixture
def eager(backend: Backend) -> Backend:
    if not backend.eager_writeable:
        pytest.skip(f"{backend.name} arrays cannot be updated in place")
    return backend


@pytest.mark.parametrize("kind", ["SGD", "RMSprop", "Adam"])
def test_step_updates_in_place_and_matches_reference(eager: Backend, kind):
    rng = np.random.default_rng(1)
    w0, b0 = rng.normal(size=(3, 2)), rng.normal(size=(1, 2))
    grads = [(rng.normal(size=(3, 2)), rng.normal(size=(1, 2))) for _ in range(4)]
    layers = [Layer(eager, weights=w0), Activation(), Layer(eager, biases=b0)]
    w_obj, b_obj = layers[0].values["weights"], layers[2].values["biases"]
    opt = getattr(xpoptim, kind)(learning_rate=0.05, weight_decay=0.1)
    for gw, gb in grads:
        layers[0].grads["weights"] = eager.asarray(gw)
        layers[2].grads["biases"] = eager.asarray(gb)
        opt.step(layers)
    # the very same array objects were updated
    assert layers[0].values["weights"] is w_obj
    assert layers[2].values["biases"] is b_obj
    want, want_state = reference.run(
        kind,
        opt.get_config(),
        {"0.weights": w0, "2.biases": b0},
        [{"0.weights": gw, "2.biases": gb} for gw, gb in grads],
    )
    np.testing.assert_allclose(eager.to_numpy(w_obj), want["0.weights"], **tolerance(np.float64))
    np.testing.assert_allclose(eager.to_numpy(b_obj), want["2.biases"], **tolerance(np.float64))
    # state keyed by stable names, in the seed's layout
    seed_layout = opt.params
    for field, buffers in want_state.items():
        assert sorted(seed_layout[field]) == ["0.weights", "2.biases"]
        for name, value in buffers.items():
            got = eager.to_numpy(seed_layout[field][name])
            np.testing.assert_allclose(got, value, **tolerance(np.float64))
    if kind == "Adam":
        assert opt.t == 4
        assert seed_layout["t"] == 4


def test_new_layers_get_state_lazily(eager: Backend):
    opt = xpoptim.SGD(learning_rate=0.1, momentum=0.5, regularization=None)
    first = Layer(eager, weights=np.ones(2))
    first.grads["weights"] = eager.asarray(np.ones(2))
    opt.step([first])
    second = Layer(eager, weights=np.ones(2))
    second.grads["weights"] = eager.asarray(np.ones(2))
    opt.step([first, second])
    # first: v = -0.1, then v = 0.5*-0.1 - 0.1 = -0.15 ; second: fresh v = -0.1
    np.testing.assert_allclose(eager.to_numpy(opt.params["velocities"]["0.weights"]), [-0.15] * 2)
    np.testing.assert_allclose(eager.to_numpy(opt.params["velocities"]["1.weights"]), [-0.1] * 2)
    np.testing.assert_allclose(eager.to_numpy(first.values["weights"]), [0.75] * 2)
    np.testing.assert_allclose(eager.to_numpy(second.values["weights"]), [0.9] * 2)
    assert opt.state.step == 2


def test_state_does_not_depend_on_object_identity():
    """The seed keyed state by id(param): a new array for the same name kept no state
    and a recycled id could inherit another parameter's state. Names fix both."""
    opt = xpoptim.SGD(learning_rate=0.1, momentum=0.5, regularization=None)
    layer = Layer(Backend("numpy", "numpy", eager_writeable=True), weights=np.ones(2))
    layer.grads["weights"] = np.ones(2)
    opt.step([layer])
    layer.values["weights"] = layer.values["weights"].copy()  # a new object, same parameter
    opt.step([layer])
    np.testing.assert_allclose(opt.params["velocities"]["0.weights"], [-0.15, -0.15])


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_step_refuses_arrays_it_cannot_update_in_place(backend: Backend, kind):
    opt = getattr(xpoptim, kind)()
    if backend.eager_writeable:
        w = np.ones(3)
        w.flags.writeable = False
        layer = Layer(Backend("numpy", "numpy", eager_writeable=True), weights=np.ones(3))
        layer.values["weights"] = w
    else:
        layer = Layer(backend, weights=np.ones(3))
    with pytest.raises(
        TypeError, match=r"parameter '0.weights' .* cannot be updated in place.*update\("
    ):
        opt.step([layer])
    assert opt.state is None


def test_update_never_writes_read_only_params():
    opt = xpoptim.Adam(learning_rate=0.1)
    w = np.ones(3)
    w.flags.writeable = False
    params, _ = opt.update({"w": w}, {"w": np.ones(3)}, opt.init({"w": w}))
    np.testing.assert_array_equal(w, np.ones(3))
    assert not np.array_equal(params["w"], w)


def test_torch_parameters_that_require_grad():
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    w.grad = torch.full((3,), 0.5, dtype=torch.float64)

    class TorchLayer:
        params = property(lambda self: {"weights": (w, w.grad)})

    opt = xpoptim.SGD(learning_rate=0.1, momentum=0.0, regularization=None)
    opt.step([TorchLayer()])
    assert w.requires_grad
    np.testing.assert_allclose(w.detach().numpy(), [0.95] * 3)


@pytest.mark.parametrize("kind", ["SGD", "RMSprop", "Adam"])
def test_config_round_trip(kind):
    cls = getattr(xpoptim, kind)
    opt = cls(learning_rate=0.02, regularization="L1", weight_decay=0.3)
    config = opt.get_config()
    assert config["type"] == kind
    rebuilt = cls(**{k: v for k, v in config.items() if k != "type"})
    assert rebuilt.get_config() == config
    assert cls.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="config is for"):
        xpoptim.SGD.from_config({**config, "type": "Other"})
    assert repr(rebuilt).startswith(f"{kind}(learning_rate=0.02")


@pytest.mark.parametrize(
    "layers",
    [{"dense": object()}, np.ones((2, 2)), object(), "layers"],
    ids=["dict", "array", "object", "str"],
)
def test_step_refuses_what_is_not_a_list_of_layers(layers):
    """The seed iterated whatever it was given: a dict of layers or an array silently
    updated nothing."""
    opt = xpoptim.SGD()
    with pytest.raises(TypeError, match=r"layers must be a list .* pass model.layers"):
        opt.step(layers)
    assert opt.state is None
