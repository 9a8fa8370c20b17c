"""The optax face: any xpoptim optimizer as an ``optax.GradientTransformation``.

``transformation(xpoptim.Adam(...))`` composes like any optax transformation:
``optax.chain(optax.clip_by_global_norm(1.0), transformation(opt))``,
``optax.MultiSteps``, ``optax.masked``, under ``jax.jit``, over any pytree of parameters
(nested dicts, lists, tuples, dataclasses registered with JAX).

The pytree is flattened with ``jax.tree_util`` and each leaf named by its path
(``{"encoder": {"w": ...}, "layers": [{"bias": ...}]}`` gives ``"encoder.w"`` and
``"layers.0.bias"``): the names are stable from one call to the next, and the optimizer's
``no_decay`` rule (by default: names containing bias, beta or gamma are not regularized)
sees them. The state is the xpoptim optimizer's own (a pytree of NamedTuples and dicts),
with its counters as int32 arrays so that ``jax.lax.cond`` (``optax.MultiSteps``) and
``jax.jit`` see the same types on every call.

Importing this module imports jax and optax; ``import xpoptim`` does not.
"""

from __future__ import annotations

import importlib
import numbers
from typing import Any

import jax

from .._compat import array_namespace
from .._execution import updates_in_place

__all__ = ["transformation"]


def _part(key: Any) -> str:
    """One step of a pytree path as a name part."""
    for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _names(paths: list[Any]) -> list[str]:
    """Stable names of the leaves: their paths joined by dots (``"layers.0.bias"``), or
    ``jax.tree_util.keystr`` where two dotted names would collide."""
    names = [".".join(_part(k) for k in path) or "params" for path in paths]
    if len(set(names)) != len(names):
        names = [jax.tree_util.keystr(path) for path in paths]
    return names


def _flatten(tree: Any, what: str) -> tuple[dict[str, Any], Any]:
    """``({name: leaf}, treedef)`` of a pytree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = _names([path for path, _ in leaves])
    if not leaves:
        raise ValueError(f"{what} has no arrays: nothing to optimize")
    return dict(zip(names, (leaf for _, leaf in leaves), strict=True)), treedef


def _counters_as_arrays(state: Any) -> Any:
    """The state with its Python-int counters (step, skipped, ...) as int32 arrays."""
    import jax.numpy as jnp

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, bool) or not isinstance(leaf, numbers.Integral):
            return leaf
        return jnp.asarray(leaf, dtype=jnp.int32)

    return jax.tree_util.tree_map(convert, state)


def transformation(optimizer: Any) -> Any:
    """An ``optax.GradientTransformation`` that runs ``optimizer``.

    ``init(params)`` is ``optimizer.init`` on the named leaves of ``params``;
    ``update(updates, state, params)`` runs::

        new_params, state = optimizer.update(params, updates, state)

    with ``updates`` as the gradients, and returns ``new_params - params`` as the updates
    (``optax.apply_updates`` adds them back). So the transformation is the whole
    optimizer, learning rate included (as ``optax.adam``), not a scaling step: put
    gradient transformations (clipping, masking) before it in a chain.

    Args:
        optimizer: any xpoptim optimizer or wrapper (``init``/``update``/``get_config``).

    Returns:
        ``optax.GradientTransformation(init, update)``; ``update`` needs ``params``.

    Raises:
        TypeError: ``optimizer`` is not an xpoptim optimizer or wrapper.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import xpoptim
        >>> from xpoptim.faces.optax import transformation
        >>> tx = optax.chain(
        ...     optax.clip_by_global_norm(1.0),
        ...     transformation(xpoptim.Adam(learning_rate=0.1, regularization=None)),
        ... )
        >>> params = {"w": jnp.array([1.0, -1.0]), "b": [jnp.array(0.5)]}
        >>> state = tx.init(params)
        >>> grads = {"w": jnp.array([3.0, 4.0]), "b": [jnp.array(0.0)]}
        >>> updates, state = tx.update(grads, state, params)
        >>> optax.apply_updates(params, updates)["w"].round(4)
        Array([ 0.9, -1.1], dtype=float32)
    """
    if not all(callable(getattr(optimizer, m, None)) for m in ("init", "update", "get_config")):
        raise TypeError(
            "optimizer must be an xpoptim optimizer or wrapper (with init, update and "
            f"get_config), got {type(optimizer).__name__}"
        )
    optax: Any = importlib.import_module("optax")

    def init(params: Any) -> Any:
        named, _ = _flatten(params, "params")
        return _counters_as_arrays(optimizer.init(named))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError(
                f"the xpoptim face of {type(optimizer).__name__} needs params: call "
                "update(updates, state, params), as for optax.adamw"
            )
        named, treedef = _flatten(params, "params")
        grads, grads_def = _flatten(updates, "updates")
        if grads_def != treedef:
            raise ValueError(
                f"updates must have the structure of params: got {grads_def}, expected {treedef}"
            )
        # optax's update is pure: where xpoptim would update a leaf in place (a NumPy
        # or torch leaf; never a JAX array), it updates a copy.
        mine = {
            k: array_namespace(p).asarray(p, copy=True) if updates_in_place(p) else p
            for k, p in named.items()
        }
        new_params, new_state = optimizer.update(mine, grads, state)
        deltas = [new_params[name] - p for name, p in named.items()]
        return jax.tree_util.tree_unflatten(treedef, deltas), _counters_as_arrays(new_state)

    return optax.GradientTransformation(init, update)
