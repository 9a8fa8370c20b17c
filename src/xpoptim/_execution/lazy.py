"""Lazy (Dask) steps: warn when they are chained, commit them with `persist`."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from .._compat import Array, is_lazy_array

# -- lazy (Dask) graphs: one step, then commit ---------------------------------------------

#: A lazy parameter whose graph has more layers than this makes ``update`` warn: 30 to 40
#: chained Adam steps (13 to 17 layers each), well below the ~90 where Dask fails.
MAX_LAZY_LAYERS = 512


class LazyGraphWarning(UserWarning):
    """Lazy steps are being chained without committing them (see `persist`)."""


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

    Call it after each `xpoptim.Optimizer.update` on Dask arrays: the next step
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
    if not any(is_lazy_array(x) for x in _leaves((params, state))):
        return params, state
    # Only lazy arrays get here, and Dask's are the lazy arrays xpoptim runs. Dask walks
    # dicts and (named) tuples itself, so the nested states of wrappers (MultiSteps,
    # ParamGroups) are persisted too, all in one computation.
    dask: Any = importlib.import_module("dask")
    new_params, new_state = dask.persist(params, state)
    return new_params, new_state


def _leaves(tree: Any) -> Iterator[Any]:
    """The leaves of nested dicts and (named) tuples: arrays, counters, ``None``."""
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, tuple | list):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree
