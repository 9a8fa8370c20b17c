"""The plain path: a rule run once per whole array, with the standard's operators.

This is how every array that no faster path takes is stepped, and the reference that
the faster paths are tested against (bit for bit):

* **in place** -- eager, writeable arrays (NumPy, CuPy, PyTorch, array-api-strict): the
  rule's in-place operators update the parameter and state buffers where they are;
* **rebinding** -- arrays whose type has no in-place operators or no item assignment,
  and lazy arrays (JAX, Dask, Cubed, ndonnx): the same statements build new arrays (for
  the lazy ones, a graph: nothing is computed here). Which arrays are lazy or writeable
  is decided from what their type can do (``xpoptim._compat``), not from a list of
  libraries, so a library nobody here wrote is stepped the right way;
* **on a copy** -- eager arrays that have in-place operators but are read-only (a NumPy
  view of a read-only buffer): the rule runs on a private copy, so the caller's array is
  never written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .._compat import Array, Namespace, is_lazy_array, is_torch_array, is_writeable_array


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
        rule: an elementwise update rule from `xpoptim._rules`.
        updated: the parameter followed by its state buffers, in the rule's order.
        gradient: the gradient; never written.
        xp: the namespace of all arrays.
        **hyper: the rule's Python-scalar hyperparameters.

    Returns:
        The rule's results: the same objects as ``updated`` where the arrays were updated
        in place, new arrays otherwise.
    """
    mine = [owned(x, xp) for x in updated]
    results = rule(mine[0], gradient, *mine[1:], xp=xp, **hyper)
    out = []
    for old, given, new in zip(updated, mine, results, strict=True):
        if not updates_in_place(old):
            out.append(new)
            continue
        if new is not given:
            # The rule rebound this array (``v = xp.maximum(v, w)``) where it could have
            # written it: put the value where the caller's array lives.
            given[...] = new
        # The caller's own object (for a PyTorch leaf tensor the rule saw its alias).
        out.append(old)
    return tuple(out)


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
