"""The optax face: under ``jax.jit``, in ``optax.chain``, ``optax.MultiSteps`` and
``optax.masked``, over nested pytrees, against optax's own optimizers and against
xpoptim's ``update`` called directly.

Where optax has the optimizer: ``Adam(regularization=None)`` is ``optax.adam``;
``RMSprop(regularization=None)`` is ``optax.rmsprop(eps_in_sqrt=False)`` (xpoptim adds
epsilon outside the square root, as the seed and torch do); ``SGD(regularization=None,
momentum=mu)`` is ``optax.sgd(momentum=mu)`` at a constant learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import xpoptim  # noqa: E402
from xpoptim.faces.optax import transformation  # noqa: E402

STEPS = 12


@pytest.fixture(autouse=True)
def float64() -> Any:
    """float64 throughout (the jax session turns x64 on for the whole run; elsewhere too)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def params_tree() -> dict[str, Any]:
    """Nested dicts, a list and a tuple, with leaves named like a model's."""
    rng = np.random.default_rng(0)

    def a(*shape: int) -> Any:
        return jnp.asarray(rng.normal(size=shape))

    return {
        "encoder": {"kernel": a(4, 3), "bias": a(3)},
        "layers": [{"kernel": a(3, 3), "bias": a(3)}, {"kernel": a(3, 2), "bias": a(2)}],
        "scale": (a(2), a()),
    }


def loss(params: dict[str, Any], x: Any) -> Any:
    h = jnp.tanh(x @ params["encoder"]["kernel"] + params["encoder"]["bias"])
    for layer in params["layers"]:
        h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
    return jnp.sum((h * params["scale"][0] + params["scale"][1]) ** 2) * 10.0


def run(tx: Any, steps: int = STEPS) -> Any:
    """``steps`` jitted steps of ``tx`` from the same start, on fixed batches."""
    params = params_tree()
    state = tx.init(params)
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(steps, 5, 4)))

    @jax.jit
    def step(params: Any, state: Any, x: Any) -> Any:
        grads = jax.grad(loss)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for x in xs:
        params, state = step(params, state, x)
    return params


def max_diff(a: Any, b: Any) -> float:
    """The largest difference, relative to the size of ``b``'s value (absolute below 1)."""
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y) / (1.0 + jnp.abs(y)))) for x, y in pairs)


PEERS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "adam": (
        lambda: xpoptim.Adam(0.05, regularization=None, beta1=0.8, beta2=0.99, epsilon=1e-7),
        lambda: optax.adam(0.05, b1=0.8, b2=0.99, eps=1e-7),
    ),
    "rmsprop": (
        lambda: xpoptim.RMSprop(0.01, regularization=None, decay_rate=0.8),
        lambda: optax.rmsprop(0.01, decay=0.8, eps=1e-8, eps_in_sqrt=False),
    ),
    "sgd": (
        lambda: xpoptim.SGD(0.02, regularization=None, momentum=0.9),
        lambda: optax.sgd(0.02, momentum=0.9),
    ),
}


@pytest.mark.parametrize("name", list(PEERS))
def test_chain_with_clipping_under_jit_equals_optax(name: str) -> None:
    ours, theirs = PEERS[name]
    a = run(optax.chain(optax.clip_by_global_norm(1.0), transformation(ours())))
    b = run(optax.chain(optax.clip_by_global_norm(1.0), theirs()))
    assert max_diff(a, b) < 1e-12
    assert max_diff(a, params_tree()) > 1e-2  # it moved


def test_an_xpoptim_schedule_under_jit_equals_optax_schedule() -> None:
    """The traced step count reaches xpoptim's schedule as optax's count reaches its own."""
    schedule = xpoptim.schedules.ExponentialDecay(0.05, transition_steps=3, decay_rate=0.5)
    a = run(transformation(xpoptim.Adam(schedule, regularization=None)))
    b = run(optax.adam(optax.exponential_decay(0.05, transition_steps=3, decay_rate=0.5)))
    assert max_diff(a, b) < 1e-12


def test_multisteps_equals_optax_multisteps() -> None:
    ours, theirs = PEERS["adam"]
    a = run(optax.MultiSteps(transformation(ours()), every_k_schedule=3))
    b = run(optax.MultiSteps(theirs(), every_k_schedule=3))
    assert max_diff(a, b) < 1e-12


def test_masked_steps_only_the_selected_leaves_as_optax() -> None:
    mask = jax.tree_util.tree_map(lambda _: True, params_tree())
    mask["encoder"]["bias"] = False
    mask["layers"][1] = {"kernel": False, "bias": True}
    ours, theirs = PEERS["sgd"]
    a = run(optax.masked(transformation(ours()), mask))
    b = run(optax.masked(theirs(), mask))
    assert max_diff(a, b) < 1e-12
    # the masked-out leaves take the raw gradient (optax.masked passes their updates through)
    assert float(jnp.max(jnp.abs(a["encoder"]["bias"] - params_tree()["encoder"]["bias"]))) > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: xpoptim.Adam(0.05),  # L2: decoupled, and not on the "bias" leaves
        lambda: xpoptim.transforms.MultiSteps(xpoptim.RMSprop(0.01, "L1", 0.01), every_k=2),
        lambda: xpoptim.transforms.Clipped(xpoptim.AdamW(0.05, amsgrad=True), max_norm=0.5),
    ],
    ids=["adam-l2", "multisteps-rmsprop-l1", "clipped-adamw-amsgrad"],
)
def test_equals_xpoptim_called_directly_on_named_leaves(make: Callable[[], Any]) -> None:
    """The face under jit against ``update`` on the dotted names, eagerly."""
    a = run(transformation(make()))
    opt = make()
    leaves, treedef = jax.tree_util.tree_flatten(params_tree())
    names = [
        "encoder.bias",
        "encoder.kernel",
        "layers.0.bias",
        "layers.0.kernel",
        "layers.1.bias",
        "layers.1.kernel",
        "scale.0",
        "scale.1",
    ]
    params = dict(zip(names, leaves, strict=True))
    state = opt.init(params)
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(STEPS, 5, 4)))
    for x in xs:
        grads_tree = jax.grad(loss)(jax.tree_util.tree_unflatten(treedef, list(params.values())), x)
        grads = dict(zip(names, jax.tree_util.tree_leaves(grads_tree), strict=True))
        params, state = opt.update(params, grads, state)
    b = jax.tree_util.tree_unflatten(treedef, list(params.values()))
    assert max_diff(a, b) < 1e-12


def test_names_are_the_dotted_paths() -> None:
    """Seen through no_decay: with a predicate that records the names it is asked about."""
    seen: list[str] = []
    opt = xpoptim.SGD(0.1, no_decay=lambda name: seen.append(name) or False)
    tx = transformation(opt)
    params = params_tree()
    tx.update(params, tx.init(params), params)
    assert sorted(set(seen)) == [
        "encoder.bias",
        "encoder.kernel",
        "layers.0.bias",
        "layers.0.kernel",
        "layers.1.bias",
        "layers.1.kernel",
        "scale.0",
        "scale.1",
    ]


def test_counters_are_int32_arrays_of_the_same_type_each_call() -> None:
    tx = transformation(xpoptim.Adam(0.01))
    params = params_tree()
    state = tx.init(params)
    assert state.step.dtype == jnp.int32
    _, new = jax.jit(tx.update)(params, state, params)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
    assert new.step.dtype == jnp.int32
    assert int(new.step) == 1


def test_bad_use_is_refused_with_a_clear_error() -> None:
    with pytest.raises(TypeError, match="xpoptim optimizer or wrapper"):
        transformation(optax.adam(0.1))
    tx = transformation(xpoptim.Adam(0.01))
    params = params_tree()
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="structure of params"):
        tx.update({"other": jnp.zeros(3)}, state, params)


def test_numpy_leaves_are_not_written() -> None:
    """optax's update is pure: leaves that xpoptim would update in place are copied."""
    tx = transformation(xpoptim.SGD(0.1, momentum=0.5))
    params = {"w": np.array([1.0, 2.0])}
    state = tx.init(params)
    updates, state = tx.update({"w": np.array([1.0, 1.0])}, state, params)
    np.testing.assert_array_equal(params["w"], [1.0, 2.0])
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.1 - 0.1 * 0.001, -0.1 - 0.2 * 0.001])


def test_import_xpoptim_does_not_import_jax_or_optax() -> None:
    import subprocess
    import sys

    code = (
        "import sys, xpoptim, xpoptim.faces; "
        "assert 'jax' not in sys.modules and 'optax' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
