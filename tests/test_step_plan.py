"""``step(layers)`` through its step plan: the same bits and errors as the full path.

After one full step, an optimizer repeats the step through a plan that re-checks only
what can change. Each scenario below is played twice, on fresh copies: with the default
options (plan and compiled kernels) and with ``fast=False`` (the plain path, no plan);
parameters, state and errors must be identical, whatever the user changes between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import xpoptim
from xpoptim._execution.compiled import kernels

from conftest import selected_backends, used_fields

pytestmark = [
    pytest.mark.skipif("numpy" not in selected_backends(), reason="NumPy's step plan"),
    pytest.mark.skipif(kernels.NUMBA_MISSING is not None, reason=str(kernels.NUMBA_MISSING)),
]


class Layer:
    def __init__(self, rng: np.random.Generator, n_in: int, n_out: int, dtype: Any) -> None:
        self.weights = rng.normal(size=(n_in, n_out)).astype(dtype)
        self.biases = rng.normal(size=(1, n_out)).astype(dtype)
        self.grads = {"weights": np.zeros_like(self.weights), "biases": np.zeros_like(self.biases)}

    @property
    def params(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {
            "weights": (self.weights, self.grads["weights"]),
            "biases": (self.biases, self.grads["biases"]),
        }


def model(dtype: Any = np.float32) -> list[Any]:
    rng = np.random.default_rng(0)
    return [Layer(rng, 64, 128, dtype), object(), Layer(rng, 128, 10, dtype)]


def backward(layers: list[Any], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for layer in layers:
        if isinstance(layer, Layer):
            for g in layer.grads.values():
                g[...] = rng.normal(size=g.shape)


Scenario = Callable[[Any, list[Any], int], None]


def play(make: Callable[[], Any], scenario: Scenario, options: dict[str, Any]) -> dict[str, Any]:
    """Six steps with ``scenario(opt, layers, step)`` before each; what came of them."""
    layers = model()
    opt = make()
    errors = []
    with xpoptim.execution_options(**options):
        for step in range(6):
            backward(layers, step)
            scenario(opt, layers, step)
            try:
                opt.step(layers)
            except (TypeError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    out: dict[str, Any] = {"errors": errors, "t": int(opt.state.step)}
    for i, layer in enumerate(layers):
        if isinstance(layer, Layer):
            out[f"{i}.weights"] = layer.weights.tobytes()
            out[f"{i}.biases"] = layer.biases.tobytes()
    for field in used_fields(opt.state):
        for name, buffer in getattr(opt.state, field).items():
            out[f"{field}.{name}"] = np.asarray(buffer).tobytes()
    return out


def nothing(opt: Any, layers: list[Any], step: int) -> None:
    return None


def replace_a_parameter(opt: Any, layers: list[Any], step: int) -> None:
    if step == 3:
        layers[0].weights = layers[0].weights.copy() * 0.5


def replace_a_buffer(opt: Any, layers: list[Any], step: int) -> None:
    if step == 3:
        field = used_fields(opt.state)[0]
        buffers = getattr(opt.state, field)
        buffers["2.weights"] = np.full_like(buffers["2.weights"], 4.0)


def write_a_buffer_in_place(opt: Any, layers: list[Any], step: int) -> None:
    if step == 3:
        getattr(opt.state, used_fields(opt.state)[0])["0.biases"][...] = 1.0


def bad_gradient_shape(opt: Any, layers: list[Any], step: int) -> None:
    if step == 3:
        layers[2].grads["weights"] = np.zeros((3, 3), np.float32)
    if step == 4:
        layers[2].grads["weights"] = np.zeros((128, 10), np.float32)


def bad_gradient_dtype(opt: Any, layers: list[Any], step: int) -> None:
    if step == 3:
        layers[0].grads["biases"] = layers[0].grads["biases"].astype(np.float64)
    if step == 4:
        layers[0].grads["biases"] = layers[0].grads["biases"].astype(np.float32)


def fortran_gradient(opt: Any, layers: list[Any], step: int) -> None:
    if step >= 3:
        layers[0].grads["weights"] = np.asfortranarray(layers[0].grads["weights"])


def read_only_parameter(opt: Any, layers: list[Any], step: int) -> None:
    layers[2].biases.flags.writeable = step != 3


def change_the_learning_rate(opt: Any, layers: list[Any], step: int) -> None:
    if step == 2:
        opt.learning_rate = opt.learning_rate * 3


def rewind_t(opt: Any, layers: list[Any], step: int) -> None:
    if step == 4 and hasattr(type(opt), "t"):
        opt.t = 1


def reload_the_state(opt: Any, layers: list[Any], step: int) -> None:
    if step == 2:
        opt.load_state_dict(opt.state_dict())


def add_a_layer(opt: Any, layers: list[Any], step: int) -> None:
    if step == 3:
        layers.append(Layer(np.random.default_rng(9), 10, 4, np.float32))


def drop_a_layer(opt: Any, layers: list[Any], step: int) -> None:
    if step == 3:
        layers.pop()


SCENARIOS = [
    nothing,
    replace_a_parameter,
    replace_a_buffer,
    write_a_buffer_in_place,
    bad_gradient_shape,
    bad_gradient_dtype,
    fortran_gradient,
    read_only_parameter,
    change_the_learning_rate,
    rewind_t,
    reload_the_state,
    add_a_layer,
    drop_a_layer,
]
OPTIMIZERS = [
    lambda: xpoptim.Adam(),
    lambda: xpoptim.Adam(amsgrad=True, regularization="L1"),
    lambda: xpoptim.SGD(momentum=0.9, nesterov=True),
    lambda: xpoptim.RMSprop(centered=True),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("make", OPTIMIZERS, ids=["adam", "amsgrad-l1", "nesterov", "centered"])
def test_the_plan_gives_the_full_paths_bits_and_errors(make, scenario):
    planned = play(make, scenario, {})
    plain = play(make, scenario, {"fast": False})
    assert planned == plain


def test_the_plan_is_used_after_the_first_step(monkeypatch):
    layers = model()
    opt = xpoptim.Adam()
    full_steps = []
    collect = type(opt)._collect_in_place
    monkeypatch.setattr(
        type(opt),
        "_collect_in_place",
        staticmethod(lambda layers: full_steps.append(1) or collect(layers)),
    )
    for step in range(5):
        backward(layers, step)
        opt.step(layers)
    assert len(full_steps) == 1
    assert opt.t == 5
    layers[0].weights = layers[0].weights.copy()  # a new array: the full path again
    opt.step(layers)
    assert len(full_steps) == 2
