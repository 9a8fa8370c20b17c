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

import numpy as np

from ._compat import (
    Array,
    Namespace,
    is_lazy_array,
    is_torch_array,
    is_writeable_array,
    to_device,
)


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


def select(flag: Array, new: Any, old: Any, xp: Namespace) -> Any:
    """``new`` where the 0-d boolean ``flag`` holds, else ``old``, over nested state.

    Lazy and traceable (``xp.where``): how Dask and ``jax.jit`` keep a data-dependent
    choice without reading ``flag``. ``None`` entries (unused state fields) stay ``None``.
    """
    if new is None:
        return None
    if isinstance(new, Mapping):
        return {k: select(flag, new[k], old[k], xp) for k in new}
    if isinstance(new, tuple):
        parts = [select(flag, n, o, xp) for n, o in zip(new, old, strict=True)]
        return type(new)(*parts) if hasattr(new, "_fields") else tuple(parts)
    return xp.where(flag, new, old)


def scalars_like(scalars: dict[str, Any], p: Array, xp: Namespace) -> dict[str, Any]:
    """``scalars`` with each array among them cast to ``p``'s dtype (Python scalars kept).

    Per-step scalars become 0-d arrays when the step counter is an array (traced by
    ``jax.jit``, or selected lazily by ``nonfinite="skip"``); a float64 0-d array would
    promote float32 parameters and state under NumPy's rules (Dask follows them).
    """
    return {
        key: xp.astype(value, p.dtype)
        if hasattr(value, "dtype") and value.dtype != p.dtype
        else value
        for key, value in scalars.items()
    }


def values_readable(x: Array) -> bool:
    """Whether ``bool(x)``/``int(x)`` on ``x`` is cheap and possible (not lazy, not traced)."""
    return not bool(is_lazy_array(x))


def to_host(x: Array) -> np.ndarray[Any, Any]:
    """``x`` as a NumPy array in host memory (computing it if it is lazy).

    The result may share memory with ``x``: copy it before ``x`` can change.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_torch_array(x):
        x = x.detach()  # DLPack refuses tensors that require grad
    attempts = (
        # CPU arrays of every backend, array-api-strict's emulated devices too: no copy.
        lambda: np.from_dlpack(x),
        # Device arrays (CuPy, CUDA tensors: a copy to the host); Dask: computed.
        lambda: np.asarray(to_device(x, "cpu")),
        # Anything else NumPy can convert (JAX on an accelerator).
        lambda: np.asarray(x),
    )
    errors = []
    for attempt in attempts:
        try:
            return np.asarray(attempt())
        except Exception as exc:  # each library raises its own kind
            errors.append(f"{type(exc).__name__}: {exc}")
    raise TypeError(
        f"cannot bring a {type(x).__module__}.{type(x).__name__} to host memory: "
        + "; ".join(errors)
    )


def place(
    x: Array, xp: Namespace, *, dtype: Any = None, device: Any = None, like: Array = None
) -> Array:
    """A new array of namespace ``xp`` with the values of ``x``, which may come from any backend.

    Args:
        x: an array of any namespace (or NumPy).
        xp: the target namespace.
        dtype: the target dtype (``x``'s own by default, as ``xp`` spells it).
        device: the target device (``xp``'s default by default).
        like: an array of ``xp`` whose chunks to copy where arrays are chunked (Dask).

    Returns:
        An array that shares no memory with ``x``.
    """
    host = to_host(x)
    if dtype is None:
        out = xp.asarray(host, copy=True, device=device)
    else:
        out = xp.asarray(host, dtype=dtype, copy=True, device=device)
    chunks = getattr(like, "chunks", None)
    if chunks is not None and hasattr(out, "rechunk"):
        out = out.rechunk(chunks)
    return out


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
    # Buffers of the state; the optional fields an optimizer does not use are None, and
    # the counters (step, and skipped under nonfinite="skip") are scalars or 0-d arrays.
    fields = [f for f in type(state)._fields[1:] if isinstance(getattr(state, f), Mapping)]
    counters = [f for f in type(state)._fields if is_lazy_array(getattr(state, f))]
    lazy = [("params", n) for n, x in params.items() if is_lazy_array(x)]
    lazy += [(f, n) for f in fields for n, x in getattr(state, f).items() if is_lazy_array(x)]
    if not lazy and not counters:
        return params, state
    # Only lazy arrays get here, and Dask's are the lazy arrays xpoptim runs.
    dask: Any = importlib.import_module("dask")
    trees = {"params": dict(params), **{f: dict(getattr(state, f)) for f in fields}}
    done = dask.persist(*(trees[f][n] for f, n in lazy), *(getattr(state, f) for f in counters))
    for (f, n), x in zip(lazy, done[: len(lazy)], strict=True):
        trees[f][n] = x
    new_params = trees.pop("params")
    kept = dict(zip(counters, done[len(lazy) :], strict=True))
    return new_params, state._replace(**trees, **kept)
