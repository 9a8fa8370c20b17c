"""State dicts: resume equals uninterrupted, cross-backend and cross-device loads, a table of
refused dicts that change nothing, and the seed's ``t``/``params`` layout."""

from __future__ import annotations

import copy
import re
from itertools import pairwise
from typing import Any

import numpy as np
import pytest

import xpoptim

import reference
from conftest import BACKENDS, Backend, selected_backends, tolerance

CASES = [
    ("SGD", {"learning_rate": 0.05, "momentum": 0.8, "regularization": "L1", "weight_decay": 0.01}),
    ("RMSprop", {"learning_rate": 0.01, "decay_rate": 0.8, "epsilon": 1e-6}),
    ("Adam", {"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.95, "regularization": "L2"}),
]
KINDS = [case[0] for case in CASES]
SHAPES = {"dense.weights": (4, 3), "dense.bias": (3,)}
STEPS, SPLIT = 6, 3


def problem(dtype: Any = np.float64, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def make(kind: str, **extra: Any) -> xpoptim.Optimizer:
    config = dict(CASES[KINDS.index(kind)][1], **extra)
    return getattr(xpoptim, kind)(**config)


class Layer:
    """The seed's layer protocol: ``params`` maps names to ``(param, grad)``."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.weights = params
        self.grads = dict.fromkeys(params)

    @property
    def params(self) -> dict[str, tuple[Any, Any]]:
        return {k: (self.weights[k], self.grads[k]) for k in self.weights}


def layers_for(backend: Backend, params_np: dict[str, np.ndarray]) -> list[Any]:
    # Layer 1 has no params: indices in the state's names must skip over it.
    return [Layer({"weights": backend.asarray(params_np["dense.weights"])}), object(),
            Layer({"bias": backend.asarray(params_np["dense.bias"])})]  # fmt: skip


def set_grads(backend: Backend, layers: list[Any], grads_np: dict[str, np.ndarray]) -> None:
    layers[0].grads["weights"] = backend.asarray(grads_np["dense.weights"])
    layers[2].grads["bias"] = backend.asarray(grads_np["dense.bias"])


def layer_values(backend: Backend, layers: list[Any]) -> dict[str, np.ndarray]:
    return {
        "0.weights": backend.to_numpy(layers[0].weights["weights"]),
        "2.bias": backend.to_numpy(layers[2].weights["bias"]),
    }


def layer_names(name: str) -> str:
    return {"dense.weights": "0.weights", "dense.bias": "2.bias"}[name]


def as_numpy(backend: Backend, arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: backend.to_numpy(v) for k, v in arrays.items()}


def state_numpy(backend: Backend, state: Any) -> dict[str, Any]:
    skipped = None if state.skipped is None else int(state.skipped)
    out: dict[str, Any] = {"step": int(state.step), "skipped": skipped}
    for field in state._fields:
        if field not in ("step", "skipped") and getattr(state, field) is not None:
            out[field] = as_numpy(backend, getattr(state, field))
    return out


def assert_identical(a: Any, b: Any) -> None:
    """Equal structure, dtypes and bytes (NaN-safe)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    else:
        assert a == b


# -- resume == uninterrupted ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_resume_through_update_is_bit_identical(backend: Backend, dtype, kind):
    params_np, grads_np = problem(dtype)

    def run(params, state, opt, steps):
        for g in steps:
            params, state = opt.update(params, {k: backend.asarray(v) for k, v in g.items()}, state)
        return params, state

    opt = make(kind)
    full_params, full_state = run(
        {k: backend.asarray(v) for k, v in params_np.items()},
        opt.init({k: backend.asarray(v) for k, v in params_np.items()}),
        opt,
        grads_np,
    )
    # The uninterrupted run is right: checked against the independent reference.
    want, _ = reference.run(kind, opt.get_config(), params_np, grads_np)
    for k, v in as_numpy(backend, full_params).items():
        np.testing.assert_allclose(v, want[k], **tolerance(dtype))

    first = make(kind)
    params = {k: backend.asarray(v) for k, v in params_np.items()}
    params, state = run(params, first.init(params), first, grads_np[:SPLIT])
    sd = copy.deepcopy(first.state_dict(state))
    saved_params = as_numpy(backend, params)
    del first, state, params  # nothing survives but the dict and the saved params

    second = make(kind)
    params = {k: backend.asarray(v) for k, v in saved_params.items()}
    state = xpoptim.state_from_dict(second, sd, like=params)
    assert state.step == SPLIT
    if backend.lazy:  # placed with the parameters' chunks
        for name, p in params.items():
            assert state[1][name].chunks == p.chunks, name
    params, state = run(params, state, second, grads_np[SPLIT:])
    assert_identical(as_numpy(backend, params), as_numpy(backend, full_params))
    assert_identical(state_numpy(backend, state), state_numpy(backend, full_state))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", ["like-layers", "at-next-step"])
def test_resume_through_step_layers_is_bit_identical(backend: Backend, dtype, kind, placement):
    if not backend.eager_writeable:
        pytest.skip(f"step(layers) updates in place, which {backend.name} arrays cannot")
    params_np, grads_np = problem(dtype)

    def train(opt, layers, steps):
        for g in steps:
            set_grads(backend, layers, g)
            opt.step(layers)

    full, full_layers = make(kind), layers_for(backend, params_np)
    train(full, full_layers, grads_np)

    first, layers = make(kind), layers_for(backend, params_np)
    train(first, layers, grads_np[:SPLIT])
    sd = first.state_dict()
    saved = {
        f"{i}.{n}": backend.to_numpy(layers[i].weights[n]) for i, n in ((0, "weights"), (2, "bias"))
    }
    # The dict is a snapshot: later in-place steps do not reach into it.
    snapshot = copy.deepcopy({f: as_numpy(backend, b) for f, b in sd["buffers"].items()})
    train(first, layers, grads_np[:1])
    assert_identical({f: as_numpy(backend, b) for f, b in sd["buffers"].items()}, snapshot)

    resumed = layers_for(
        backend, {"dense.weights": saved["0.weights"], "dense.bias": saved["2.bias"]}
    )
    second = make(kind)
    second.load_state_dict(sd, like=resumed if placement == "like-layers" else None)
    train(second, resumed, grads_np[SPLIT:])

    for i, n in ((0, "weights"), (2, "bias")):
        assert_identical(
            backend.to_numpy(resumed[i].weights[n]), backend.to_numpy(full_layers[i].weights[n])
        )
    assert_identical(state_numpy(backend, second.state), state_numpy(backend, full.state))
    # ... and the uninterrupted run is right (independent reference).
    want_params, _ = reference.run(kind, full.get_config(), params_np, grads_np)
    for name, want in want_params.items():
        i, n = layer_names(name).split(".")
        got = backend.to_numpy(full_layers[int(i)].weights[n])
        np.testing.assert_allclose(got, want, **tolerance(dtype))


# -- cross-backend and cross-device loads ------------------------------------------------


def _strict_default(a: np.ndarray) -> Any:
    import array_api_strict

    return array_api_strict.asarray(a)  # the default device, not the fixture's device1


def _cupy(a: np.ndarray) -> Any:
    import cupy

    return cupy.asarray(a)


# (source backend, target description, how to make a target array, the target backend
# that reads it back, the backend whose selection runs the test)
CROSS = [
    ("numpy", "torch", lambda a: BACKENDS["torch"].asarray(a), "torch", "torch"),
    ("array_api_strict", "default-device", _strict_default, "array_api_strict", "array_api_strict"),
    ("dask", "numpy", lambda a: np.array(a), "numpy", "dask"),
    ("torch", "numpy", lambda a: np.array(a), "numpy", "torch"),
    ("jax", "numpy", lambda a: np.array(a), "numpy", "jax"),
    ("cupy", "numpy", lambda a: np.array(a), "numpy", "cupy"),
    ("numpy", "cupy", _cupy, "cupy", "cupy"),
]  # fmt: skip


def _runs_with(name: str) -> None:
    if name not in selected_backends():
        pytest.skip(f"runs in the {name} backend's session")
    if reason := BACKENDS[name].skip_reason():
        pytest.skip(reason)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("src", "dst", "make_dst", "reader", "runs_with"), CROSS, ids=[f"{c[0]}->{c[1]}" for c in CROSS]
)
def test_cross_backend_load_places_buffers_like_params(kind, src, dst, make_dst, reader, runs_with):
    _runs_with(runs_with)
    source, target = BACKENDS[src], BACKENDS[reader]
    params_np, grads_np = problem(np.float64)
    opt = make(kind)
    params = {k: source.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    for g in grads_np[:SPLIT]:
        params, state = opt.update(params, {k: source.asarray(v) for k, v in g.items()}, state)
    sd = opt.state_dict(state)
    want_buffers = {f: as_numpy(source, b) for f, b in sd["buffers"].items()}

    from array_api_compat import array_namespace, device

    new_params = {k: make_dst(v) for k, v in as_numpy(source, params).items()}
    other = make(kind)
    loaded = xpoptim.state_from_dict(other, sd, like=new_params)
    for field in want_buffers:
        for name, a in getattr(loaded, field).items():
            p = new_params[name]
            assert array_namespace(a) is array_namespace(p), (field, name)
            assert device(a) == device(p), (field, name)
            assert a.dtype == p.dtype, (field, name)
            assert_identical(target.to_numpy(a), want_buffers[field][name])
    for g in grads_np[SPLIT:]:
        new_params, loaded = other.update(
            new_params, {k: make_dst(v) for k, v in g.items()}, loaded
        )
    want, _ = reference.run(kind, opt.get_config(), params_np, grads_np)
    for name, w in want.items():
        np.testing.assert_allclose(target.to_numpy(new_params[name]), w, **tolerance(np.float64))


def test_strict_device1_to_chosen_namespace_and_device():
    _runs_with("array_api_strict")
    import array_api_strict as xs
    from array_api_compat import device

    source = BACKENDS["array_api_strict"]
    opt = make("Adam")
    params = {k: source.asarray(v) for k, v in problem()[0].items()}
    params, state = opt.update(params, params, opt.init(params))
    sd = opt.state_dict(state)
    assert all(device(a) == xs.Device("device1") for a in sd["buffers"]["momentums"].values())
    for where in (xs.Device("CPU_DEVICE"), xs.Device("device2")):
        got = xpoptim.state_from_dict(opt, sd, xp=xs, device=where)
        for field in ("momentums", "velocities"):
            for name, a in getattr(got, field).items():
                assert device(a) == where
                assert_identical(source.to_numpy(a), source.to_numpy(getattr(state, field)[name]))


def test_load_casts_to_the_parameter_dtype_and_step_layers_places_at_next_step():
    """float64 NumPy state into float32 layers of another backend, placed at step()."""
    name = next((b for b in ("torch", "array_api_strict") if b in selected_backends()), None)
    if name is None or "numpy" not in selected_backends():
        pytest.skip("needs numpy and torch or array_api_strict selected")
    target = BACKENDS[name]
    params_np, grads_np = problem(np.float64)
    src = make("Adam")
    src_layers = layers_for(BACKENDS["numpy"], params_np)
    for g in grads_np[:SPLIT]:
        set_grads(BACKENDS["numpy"], src_layers, g)
        src.step(src_layers)
    sd = src.state_dict()

    opt = make("Adam")
    opt.load_state_dict(sd)  # no parameters known yet
    p32 = {k: v.astype(np.float32) for k, v in params_np.items()}
    layers = layers_for(target, p32)
    set_grads(target, layers, {k: v.astype(np.float32) for k, v in grads_np[SPLIT].items()})
    opt.step(layers)
    for field in ("momentums", "velocities"):
        for key, a in getattr(opt.state, field).items():
            assert a.dtype == layers[0].weights["weights"].dtype, (field, key)
            assert target.to_numpy(a).dtype == np.float32
    assert opt.t == SPLIT + 1


# -- refused state dicts change nothing -----------------------------------------------------


def _bad(edit):
    def apply(sd):
        sd = copy.deepcopy(sd)
        edit(sd)
        return sd

    return apply


def _set(path, value):
    def edit(sd):
        d = sd
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return _bad(edit)


def _delete(path):
    def edit(sd):
        d = sd
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]

    return _bad(edit)


M, V, W, B = "momentums", "velocities", "0.weights", "2.bias"
BAD = {
    "not a mapping": (lambda sd: [sd], "must be a mapping"),
    "no format_version": (_delete(["format_version"]), "no 'format_version'"),
    "newer format_version": (_set(["format_version"], 2), "newer than this xpoptim"),
    "format_version 0": (_set(["format_version"], 0), "start at 1"),
    "format_version as str": (_set(["format_version"], "1"), "must be an int"),
    "wrong optimizer type": (_set(["optimizer"], "SGD"), "for optimizer 'SGD'"),
    "config of another type": (_set(["config", "type"], "SGD"), "get_config() of a Adam"),
    "missing key": (_delete(["skipped"]), "missing ['skipped']"),
    "unexpected key": (_set(["extra"], 1), "unexpected ['extra']"),
    "negative step": (_set(["step"], -1), ">= 0"),
    "float step": (_set(["step"], 3.0), "must be an int"),
    "bool step": (_set(["step"], True), "must be an int"),
    "missing buffer field": (_delete(["buffers", V]), "missing ['velocities']"),
    "extra buffer field": (_set(["buffers", "cache"], {}), "unexpected ['cache']"),
    "name missing in one field": (_delete(["buffers", V, B]), "missing ['2.bias']"),
    "name missing in all fields": (
        _bad(lambda sd: [sd["buffers"][f].pop(B) for f in (M, V)]),
        "missing ['2.bias']",
    ),
    "extra name": (
        _bad(lambda sd: [sd["buffers"][f].__setitem__("9.w", np.zeros(3)) for f in (M, V)]),
        "unexpected ['9.w']",
    ),
    "shape unlike the parameter": (
        _bad(lambda sd: [sd["buffers"][f].__setitem__(B, np.zeros(4)) for f in (M, V)]),
        "has shape (4,), the parameter (3,)",
    ),
    "shapes differ between fields": (_set(["buffers", V, B], np.zeros(4)), "same parameter"),
    "integer dtype": (
        _bad(lambda sd: [sd["buffers"][f].__setitem__(B, np.zeros(3, np.int64)) for f in (M, V)]),
        "not real floating",
    ),
    "complex dtype": (_set(["buffers", M, B], np.zeros(3, np.complex128)), "not real floating"),
    "a list, not an array": (_set(["buffers", M, B], [0.0, 0.0, 0.0]), "not an array"),
    "buffers not a mapping": (_set(["buffers"], [1, 2]), "must be a mapping"),
    "field not a mapping": (_set(["buffers", M], None), "must map names to arrays"),
    "non-str name": (
        _bad(lambda sd: [sd["buffers"][f].__setitem__(3, sd["buffers"][f].pop(B)) for f in (M, V)]),
        "that is not a str",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_refused_state_dict_changes_nothing(backend: Backend, case):
    edit, message = BAD[case]
    params_np, grads_np = problem()
    opt = make("Adam")
    good_sd = None
    if backend.eager_writeable:
        layers = layers_for(backend, params_np)
        for g in grads_np[:2]:
            set_grads(backend, layers, g)
            opt.step(layers)
        good_sd = opt.state_dict()
        like: Any = layers
        before_state = state_numpy(backend, opt.state)
        before_params = layer_values(backend, layers)
    else:
        params = {layer_names(k): backend.asarray(v) for k, v in params_np.items()}
        params, state = opt.update(params, params, opt.init(params))
        good_sd = opt.state_dict(state)
        like = params
        before_state = state_numpy(backend, state)
        before_params = as_numpy(backend, params)
    bad = edit(good_sd)
    if backend.eager_writeable:
        with pytest.raises(xpoptim.StateDictError, match=re.escape(message)):
            opt.load_state_dict(bad, like=like)
    else:
        with pytest.raises(xpoptim.StateDictError, match=re.escape(message)):
            xpoptim.state_from_dict(opt, bad, like=like)
    if backend.eager_writeable:
        assert_identical(state_numpy(backend, opt.state), before_state)
        assert_identical(layer_values(backend, layers), before_params)
        # Also refused without parameters where the dict alone is wrong; the good dict loads.
        opt.load_state_dict(good_sd, like=like)
    else:
        assert_identical(state_numpy(backend, state), before_state)
        assert_identical(as_numpy(backend, params), before_params)


def test_shape_mismatch_found_at_next_step_changes_nothing():
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")
    np_backend = BACKENDS["numpy"]
    params_np, grads_np = problem()
    opt = make("SGD")
    layers = layers_for(np_backend, params_np)
    set_grads(np_backend, layers, grads_np[0])
    opt.step(layers)
    sd = opt.state_dict()
    other = make("SGD")
    other.load_state_dict(sd)  # fine on its own: no parameters to compare with yet
    wrong = [Layer({"weights": np.ones((2, 2))}), object(), Layer({"bias": np.ones(3)})]
    wrong[0].grads["weights"], wrong[2].grads["bias"] = np.ones((2, 2)), np.ones(3)
    held = state_numpy(np_backend, other.state)
    with pytest.raises(xpoptim.StateDictError, match=r"velocities\['0.weights'\] has shape"):
        other.step(wrong)
    assert_identical(state_numpy(np_backend, other.state), held)
    assert np.array_equal(wrong[0].weights["weights"], np.ones((2, 2)))


# -- the seed's attributes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "layout"),
    [("SGD", {"velocities"}), ("RMSprop", {"cache"}), ("Adam", {"t", "momentums", "velocities"})],
)
def test_seed_layout_of_params_and_t(backend: Backend, kind, layout):
    if not backend.eager_writeable:
        pytest.skip(f"step(layers) updates in place, which {backend.name} arrays cannot")
    params_np, grads_np = problem()
    opt = make(kind)
    assert set(opt.params) == layout
    layers = layers_for(backend, params_np)
    for g in grads_np[:SPLIT]:
        set_grads(backend, layers, g)
        opt.step(layers)
    got = opt.params
    assert set(got) == layout
    _, want_state = reference.run(kind, opt.get_config(), params_np, grads_np[:SPLIT])
    for field, buffers in want_state.items():
        assert set(got[field]) == {"0.weights", "2.bias"}  # stable names, not id(param)
        for name, want in buffers.items():
            np.testing.assert_allclose(
                backend.to_numpy(got[field][layer_names(name)]), want, **tolerance(np.float64)
            )
    if kind == "Adam":
        assert got["t"] == opt.t == SPLIT
        fresh = make("Adam")
        fresh.load_state_dict(opt.state_dict())
        assert fresh.t == SPLIT


# -- the migration recipe of docs/state.md ---------------------------------------------------


def test_migration_recipe_from_id_keyed_seed_state():
    """The docs' ``from_seed`` brings an id()-keyed seed state over; training goes on right."""
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")
    import pathlib

    text = (pathlib.Path(__file__).parents[1] / "docs" / "state.md").read_text()
    block = next(b for b in text.split("```python")[1:] if "def from_seed" in b)
    namespace: dict[str, Any] = {"xpoptim": xpoptim}
    exec(block.split("```")[0], namespace)

    params_np, grads_np = problem()
    config = {"learning_rate": 0.01, "regularization": "L2", "weight_decay": 0.001,
              "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}  # fmt: skip
    mid_params, mid_state = reference.run("Adam", config, params_np, grads_np[:SPLIT])
    layers = layers_for(BACKENDS["numpy"], mid_params)
    w, b = layers[0].weights["weights"], layers[2].weights["bias"]

    class Adam:  # what an mpneuralnetwork 1.1.1 Adam holds after SPLIT steps
        params = {  # noqa: RUF012
            "t": SPLIT,
            "momentums": {id(w): mid_state["momentums"]["dense.weights"],
                          id(b): mid_state["momentums"]["dense.bias"]},
            "velocities": {id(w): mid_state["velocities"]["dense.weights"],
                           id(b): mid_state["velocities"]["dense.bias"]},
        }  # fmt: skip

        def get_config(self) -> dict[str, Any]:
            return {"type": "Adam", **config}

    opt = namespace["from_seed"](Adam(), layers)
    assert opt.t == SPLIT
    for g in grads_np[SPLIT:]:
        set_grads(BACKENDS["numpy"], layers, g)
        opt.step(layers)
    want, _ = reference.run("Adam", config, params_np, grads_np)
    np.testing.assert_allclose(w, want["dense.weights"], **tolerance(np.float64))
    np.testing.assert_allclose(b, want["dense.bias"], **tolerance(np.float64))


def test_a_numpy_state_loads_into_the_layout_of_init():
    """Loaded like NumPy parameters, small parameters' buffers lie side by side in one flat
    buffer as init() lays them out (the fast path's layout), and step bit-identically."""
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")
    params_np, grads_np = problem()
    opt = make("Adam")
    fresh = opt.init(params_np)

    def bases(state: Any) -> list[bool]:
        m = state.momentums
        return [m[a].base is not None and m[a].base is m[b].base for a, b in pairwise(m)]

    sd = opt.state_dict(fresh)
    loaded = xpoptim.state_from_dict(opt, sd, like=params_np)
    assert bases(loaded) == bases(fresh)
    assert any(bases(fresh))  # the fast path's flat layout is really there
    p1, s1 = opt.update({k: v.copy() for k, v in params_np.items()}, grads_np[0], fresh)
    p2, s2 = opt.update({k: v.copy() for k, v in params_np.items()}, grads_np[0], loaded)
    assert_identical(p1, p2)
    assert_identical(state_numpy(BACKENDS["numpy"], s1), state_numpy(BACKENDS["numpy"], s2))


def test_step_layers_places_a_loaded_state_in_the_layout_of_init():
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")
    np_backend = BACKENDS["numpy"]
    params_np, grads_np = problem()
    first, layers = make("SGD"), layers_for(np_backend, params_np)
    set_grads(np_backend, layers, grads_np[0])
    first.step(layers)
    second = make("SGD")
    second.load_state_dict(first.state_dict())  # placed at the next step
    set_grads(np_backend, layers, grads_np[1])
    second.step(layers)
    v = second.state.velocities
    assert v["0.weights"].base is not None
    assert v["0.weights"].base is v["2.bias"].base  # one flat buffer, as init() makes


# -- Adam.t is settable, with the seed's meaning ---------------------------------------------


class SeedAdam:
    """mpneuralnetwork 1.1.1's Adam.step, transcribed from its API page (float64; the
    buffers keyed by name instead of id(param)): ``t`` counts the steps, and the next
    step uses ``t + 1``."""

    def __init__(self, lr, regularization, weight_decay, beta1, beta2, epsilon):
        self.lr, self.reg, self.wd = lr, regularization, weight_decay
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.t, self.momentums, self.velocities = 0, {}, {}

    def step(self, params, grads):
        self.t += 1
        for name, param in params.items():
            grad = grads[name].copy()
            decayed = not any(s in name for s in ("bias", "beta", "gamma"))
            if self.reg == "L1" and decayed:
                grad += self.wd * np.sign(param)
            if name not in self.momentums:
                self.momentums[name] = np.zeros_like(param)
                self.velocities[name] = np.zeros_like(param)
            m = self.momentums[name] = self.beta1 * self.momentums[name] + (1 - self.beta1) * grad
            v = self.velocities[name] = (
                self.beta2 * self.velocities[name] + (1 - self.beta2) * grad**2
            )
            step_size = self.lr / (1 - self.beta1**self.t)
            denom = np.sqrt(v) / np.sqrt(1 - self.beta2**self.t) + self.epsilon
            param -= step_size * m / denom
            if self.reg == "L2" and decayed:
                param -= self.lr * self.wd * param


SEED_CONFIG = {"learning_rate": 0.05, "regularization": "L2", "weight_decay": 0.01,
               "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}  # fmt: skip


def _seed_like_training(set_t_first: int | None):
    """Model.train twice, as the seed does it: train, restore the best weights and rewind
    ``t`` to the best epoch (buffers kept), train again. Returns the same sequence run on
    xpoptim's Adam (through step(layers)) and on the seed's."""
    params_np, grads_np = problem()
    seed = SeedAdam(*SEED_CONFIG.values())
    seed_params = {k: v.copy() for k, v in params_np.items()}
    opt = xpoptim.Adam(**SEED_CONFIG)
    layers = layers_for(BACKENDS["numpy"], params_np)
    names = {"dense.weights": (0, "weights"), "dense.bias": (2, "bias")}

    def ours() -> dict[str, np.ndarray]:
        return {k: layers[i].weights[n] for k, (i, n) in names.items()}

    if set_t_first is not None:
        opt.t = set_t_first
        seed.t = set_t_first
    for g in grads_np[:3]:  # first train(): 3 epochs, the best after the first
        set_grads(BACKENDS["numpy"], layers, g)
        opt.step(layers)
        seed.step(seed_params, g)
        if opt.t == (set_t_first or 0) + 1:
            best = {k: v.copy() for k, v in ours().items()}
            best_seed = {k: v.copy() for k, v in seed_params.items()}
    for k, v in ours().items():  # restore the best weights, rewind t
        v[...] = best[k]
    seed_params = best_seed
    opt.t = (set_t_first or 0) + 1
    seed.t = (set_t_first or 0) + 1
    for g in grads_np[3:]:  # second train()
        set_grads(BACKENDS["numpy"], layers, g)
        opt.step(layers)
        seed.step(seed_params, g)
    return opt, ours(), seed, seed_params


@pytest.mark.parametrize("start", [None, 4], ids=["from 0", "t set before the first step"])
def test_setting_t_rewinds_like_the_seeds_model_train(start):
    """main: ``opt.t = k`` raised AttributeError, so the seed's second train() went on
    with the wrong bias correction."""
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")
    opt, got, seed, want = _seed_like_training(start)
    assert opt.t == seed.t == (start or 0) + 1 + STEPS - 3
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-13, atol=1e-15)
        ours = {"dense.weights": "0.weights", "dense.bias": "2.bias"}[k]
        np.testing.assert_allclose(opt.params["momentums"][ours], seed.momentums[k], rtol=1e-13)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1, ValueError, "t must be an int >= 0, got -1"),
        (2.0, TypeError, r"t must be an int >= 0, got 2.0 \(float\)"),
        (True, TypeError, r"got True \(bool\)"),
        ("3", TypeError, r"got '3' \(str\)"),
        (None, TypeError, "got None"),
    ],
)
def test_setting_t_is_validated_and_a_refused_value_changes_nothing(value, error, message):
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")
    opt = xpoptim.Adam()
    with pytest.raises(error, match=message):
        opt.t = value
    assert opt.state is None
    assert opt.t == 0
    params_np, grads_np = problem()
    layers = layers_for(BACKENDS["numpy"], params_np)
    set_grads(BACKENDS["numpy"], layers, grads_np[0])
    opt.step(layers)
    before = opt.state_dict()
    with pytest.raises(error, match=message):
        opt.t = value
    after = opt.state_dict()
    assert after["step"] == before["step"] == 1
    for field, buffers in before["buffers"].items():
        for name, a in buffers.items():
            assert after["buffers"][field][name].tobytes() == a.tobytes()
    opt.t = np.int64(7)  # any integer type
    assert opt.t == 7
    assert type(opt.t) is int


# -- state_dict() of an optimizer that keeps no state ----------------------------------------


def test_state_dict_without_a_state_says_to_pass_the_functional_one():
    """main: after functional update() calls, opt.state_dict() silently returned an empty
    state (the README's snippet saved that)."""
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")
    opt = xpoptim.Adam()
    params, grads = problem()
    state = opt.init(params)
    params, state = opt.update(params, grads[0], state)
    with pytest.raises(ValueError, match=r"never ran step\(layers\).*opt\.state_dict\(state\)"):
        opt.state_dict()
    assert opt.state_dict(state)["step"] == 1


# -- load_state_dict refuses shapes that differ from the state it replaces ------------------


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_refuses_shapes_other_than_the_current_state(kind):
    """main accepted it, and the error came at the next step, the good state gone."""
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")
    params_np, grads_np = problem()
    opt = make(kind)
    layers = layers_for(BACKENDS["numpy"], params_np)
    set_grads(BACKENDS["numpy"], layers, grads_np[0])
    opt.step(layers)
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    field = next(iter(bad["buffers"]))
    for f in bad["buffers"]:
        bad["buffers"][f]["2.bias"] = np.zeros(5)
    before = opt.state_dict()
    with pytest.raises(
        xpoptim.StateDictError,
        match=re.escape(f"state_dict['buffers'][{field!r}]['2.bias'] has shape (5,), but this ")
        + r"optimizer's state for that parameter has \(3,\); nothing was loaded",
    ):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["step"] == before["step"]
    for f, buffers in before["buffers"].items():
        for name, a in buffers.items():
            assert after["buffers"][f][name].tobytes() == a.tobytes()
    opt.load_state_dict(sd)  # the matching dict still loads
    set_grads(BACKENDS["numpy"], layers, grads_np[1])
    opt.step(layers)
