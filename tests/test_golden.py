"""Golden values from the original library (mpneuralnetwork 1.1.1, float64), on every backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import xpoptim

import reference
from conftest import Backend

VECTORS = json.loads(
    (Path(__file__).parent / "data" / "mpneuralnetwork-1.1.1-vectors.json").read_text()
)
CASES = {case["id"]: case for case in VECTORS["cases"]}
QUIRKS = {case["id"]: case for case in VECTORS["quirk_cases"]}


class FakeLayer:
    """A layer as the seed sees it: ``params`` -> {name: (param, grad)}."""

    def __init__(self, params):
        self.values = params
        self.grads = dict.fromkeys(params)

    @property
    def params(self):
        return {k: (self.values[k], self.grads[k]) for k in self.values}


class NoParams:
    """Activation-like layer without parameters: skipped by step()."""


def run_case(backend: Backend, case):
    opt = getattr(xpoptim, case["optimizer"])(**case["constructor_kwargs"])
    layers = [
        FakeLayer({k: backend.asarray(v, np.float64) for k, v in lp.items()})
        for lp in VECTORS["initial_params"]
    ]
    state = None
    for step, grads in enumerate(VECTORS["grads"][: len(case["steps"])]):
        for layer, layer_grads in zip(layers, grads, strict=True):
            for k, g in layer_grads.items():
                layer.grads[k] = backend.asarray(g, np.float64)
        if backend.eager_writeable:
            opt.step(layers)
            state = opt.state
        else:
            params = {
                f"{i}.{k}": v for i, layer in enumerate(layers) for k, v in layer.values.items()
            }
            grads_ = {
                f"{i}.{k}": v for i, layer in enumerate(layers) for k, v in layer.grads.items()
            }
            if state is None:
                state = opt.init(params)
            params, state = opt.update(params, grads_, state)
            for name, p in params.items():
                i, k = name.split(".", 1)
                layers[int(i)].values[k] = p
        assert state.step == step + 1
    return opt, layers, state


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_golden_values(backend: Backend, case_id):
    case = CASES[case_id]
    opt, layers, state = run_case(backend, case)
    final = case["steps"][-1]
    assert opt.get_config() == case["config"]
    for layer, want in zip(layers, final["params"], strict=True):
        for k, v in want.items():
            np.testing.assert_allclose(
                backend.to_numpy(layer.values[k]), np.array(v), rtol=0, atol=1e-12, err_msg=k
            )
    for field, buffers in final["state"].items():
        for key, v in buffers.items():
            got = backend.to_numpy(getattr(state, field)[key])
            np.testing.assert_allclose(got, np.array(v), rtol=0, atol=1e-12, err_msg=field + key)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_gradients_are_not_modified(case_id):
    """The seed added the penalty into the caller's gradient; xpoptim never writes it."""
    case = CASES[case_id]
    layers = [
        FakeLayer({k: np.array(v) for k, v in lp.items()}) for lp in VECTORS["initial_params"]
    ]
    opt = getattr(xpoptim, case["optimizer"])(**case["constructor_kwargs"])
    for layer, layer_grads in zip(layers, VECTORS["grads"][0], strict=True):
        for k, g in layer_grads.items():
            arr = np.array(g)
            arr.flags.writeable = False  # any write raises
            layer.grads[k] = arr
    opt.step([NoParams(), *layers])
    for layer, layer_grads in zip(layers, VECTORS["grads"][0], strict=True):
        for k, g in layer_grads.items():
            np.testing.assert_array_equal(layer.grads[k], np.array(g))


def test_lowercase_regularization_is_refused():
    """The seed silently took the L1 branch for 'l2'; xpoptim refuses it."""
    quirk = QUIRKS["quirk_rmsprop_regularization_lowercase_l2_takes_L1_branch"]
    with pytest.raises(ValueError, match="regularization must be 'L1', 'L2' or None"):
        xpoptim.RMSprop(**quirk["constructor_kwargs"])


@pytest.mark.parametrize(
    "quirk_id",
    [
        "quirk_sgd_regularization_None_takes_L1_branch",
        "quirk_adam_regularization_None_no_decay_at_all",
    ],
)
def test_regularization_none_means_none(quirk_id):
    """``None`` is no regularization (the seed's SGD applied L1 for it)."""
    quirk = QUIRKS[quirk_id]
    params = {
        f"{i}.{k}": np.array(v)
        for i, lp in enumerate(VECTORS["initial_params"])
        for k, v in lp.items()
    }
    grads = [
        {f"{i}.{k}": np.array(v) for i, lg in enumerate(step) for k, v in lg.items()}
        for step in VECTORS["grads"]
    ]
    want, _ = reference.run(quirk["optimizer"], quirk["constructor_kwargs"], params, grads)
    opt = getattr(xpoptim, quirk["optimizer"])(**quirk["constructor_kwargs"])
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    for name, w in want.items():
        np.testing.assert_allclose(params[name], w, rtol=0, atol=1e-12, err_msg=name)
    if quirk["optimizer"] == "Adam":  # the seed's Adam already did no decay: same numbers
        final = quirk["steps"][-1]["params"]
        for i, lp in enumerate(final):
            for k, v in lp.items():
                np.testing.assert_allclose(params[f"{i}.{k}"], np.array(v), rtol=0, atol=1e-12)
