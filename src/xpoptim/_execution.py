"""How an update rule is executed on a given backend: the one backend-aware module.

The rules in :mod:`xpoptim._rules` are pure math. This module decides, per array, how
they run, using only capabilities that array-api-compat reports (never the backend's
name):

* **in place** -- eager, writeable arrays (NumPy, CuPy, PyTorch, array-api-strict): the
  rule's in-place operators update the parameter and state buffers where they are;
* **rebinding** -- arrays whose type has no in-place operators (JAX, Dask): the same
  statements build new arrays (for Dask, a lazy graph: nothing is computed here);
* **on a copy** -- eager arrays that have in-place operators but are read-only (a NumPy
  view of a read-only buffer): the rule runs on a private copy, so the caller's array is
  never written.

Gradients are inputs only: no rule writes to them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from ._compat import Array, Namespace, is_lazy_array, is_torch_array, is_writeable_array


def updates_in_place(x: Array) -> bool:
    """Whether a rule run on ``x`` changes ``x`` itself (eager and writeable)."""
    return bool(is_writeable_array(x)) and not bool(is_lazy_array(x))


def _has_inplace_operators(x: Array) -> bool:
    return hasattr(type(x), "__iadd__")


def owned(x: Array, xp: Namespace) -> Array:
    """``x`` in a form the rule may update: itself, or a private copy if it is read-only.

    PyTorch tensors that require grad are updated through ``detach()`` (same storage).
    Lazy arrays (checked first: Dask arrays also report themselves writeable) and arrays
    without in-place operators are returned as they are, since the rule's augmented
    assignments rebind them instead of writing.
    """
    if is_torch_array(x) and x.requires_grad:
        # A leaf tensor of an autograd graph: update its data, as torch.optim does
        # under ``no_grad`` (``detach`` shares the storage).
        return x.detach()
    if is_lazy_array(x) or not _has_inplace_operators(x) or is_writeable_array(x):
        return x
    return xp.asarray(x, copy=True)


def apply_rule(
    rule: Callable[..., tuple[Array, ...]],
    updated: tuple[Array, ...],
    gradient: Array,
    *,
    xp: Namespace,
    **hyper: Any,
) -> tuple[Array, ...]:
    """Run ``rule(p, g, *buffers, xp=xp, **hyper)`` and return its results.

    Args:
        rule: an elementwise update rule from :mod:`xpoptim._rules`.
        updated: the parameter followed by its state buffers, in the rule's order.
        gradient: the gradient; never written.
        xp: the namespace of all arrays.
        **hyper: the rule's Python-scalar hyperparameters.

    Returns:
        The rule's results: the same objects as ``updated`` where the arrays were updated
        in place, new arrays otherwise.
    """
    p, *buffers = (owned(x, xp) for x in updated)
    results = rule(p, gradient, *buffers, xp=xp, **hyper)
    # Hand back the caller's own objects where they were updated in place (for a
    # PyTorch leaf tensor the rule saw its detached alias).
    return tuple(
        old if updates_in_place(old) else new for old, new in zip(updated, results, strict=True)
    )


# -- lazy (Dask) graphs: one step, then commit ---------------------------------------------

#: A lazy parameter whose graph has more layers than this makes ``update`` warn: 30 to 40
#: chained Adam steps (13 to 17 layers each), well below the ~90 where Dask fails.
MAX_LAZY_LAYERS = 512


class LazyGraphWarning(UserWarning):
    """Lazy steps are being chained without committing them (see :func:`persist`)."""


def _graph_layers(x: Array) -> int:
    """Layers of ``x``'s task graph, through the Dask collection protocol; 0 if eager."""
    graph = getattr(x, "__dask_graph__", None)
    if graph is None or not is_lazy_array(x):
        return 0
    return len(getattr(graph(), "layers", ()))


def warn_if_deep(params: Mapping[str, Array]) -> None:
    """Warn when the returned parameters carry a graph of many chained lazy steps.

    Looks at the first parameter only (all are stepped together): one attribute lookup.
    """
    first = next(iter(params.values()), None)
    layers = 0 if first is None else _graph_layers(first)
    if layers > MAX_LAZY_LAYERS:
        import warnings

        warnings.warn(
            f"a lazy parameter's graph has {layers} layers: update() has been chained without "
            "computing. Each lazy step adds ~14 tasks per chunk and Dask fails near 90 steps; "
            "commit every step with `params, state = xpoptim.persist(params, state)` (or use "
            "xpoptim.OutOfCore for parameters that do not fit in memory)",
            LazyGraphWarning,
            stacklevel=3,
        )


def persist(params: Any, state: Any) -> tuple[Any, Any]:
    """Compute the lazy arrays of ``(params, state)`` once and keep the results.

    Call it after each :meth:`~xpoptim.Optimizer.update` on Dask arrays: the next step
    then starts from a graph of one task per chunk instead of the whole history. The
    parameters and every state buffer are computed together, so shared work runs once;
    with a ``dask.distributed`` client active the results stay in the cluster's memory.
    Eager arrays are returned as they are.

    Args:
        params: name -> array, as returned by ``update``.
        state: the optimizer state NamedTuple returned by ``update``.

    Returns:
        ``(params, state)`` with the same structure.
    """
    # Buffers of the state; the optional fields an optimizer does not use are None.
    fields = [f for f in type(state)._fields[1:] if getattr(state, f) is not None]
    lazy = [("params", n) for n, x in params.items() if is_lazy_array(x)]
    lazy += [(f, n) for f in fields for n, x in getattr(state, f).items() if is_lazy_array(x)]
    if not lazy:
        return params, state
    # Only lazy arrays get here, and Dask's are the lazy arrays xpoptim runs.
    dask: Any = importlib.import_module("dask")
    trees = {"params": dict(params), **{f: dict(getattr(state, f)) for f in fields}}
    done = dask.persist(*(trees[f][n] for f, n in lazy))
    for (f, n), x in zip(lazy, done, strict=True):
        trees[f][n] = x
    new_params = trees.pop("params")
    return new_params, type(state)(state[0], **trees)
