"""Gradient transforms: clipping and accumulation."""

from __future__ import annotations

from .._compat import Array, Namespace


def clip_by_value(g: Array, *, limit: float, xp: Namespace) -> Array:
    """Each element clipped to ``[-limit, limit]`` (a new array)."""
    return xp.clip(g, -limit, limit)


def sum_of_squares(g: Array, *, xp: Namespace) -> Array:
    """``sum(g**2)`` over all elements, a 0-d array (lazy on Dask)."""
    return xp.sum(xp.square(g))


def clip_scale(norm: Array, *, max_norm: float, xp: Namespace) -> Array:
    """The factor ``max_norm / max(norm, max_norm)``: exactly 1 when ``norm <= max_norm``.

    Never divides by zero (``max_norm > 0``), so a zero gradient stays zero.
    """
    return max_norm / xp.clip(norm, min=max_norm)


def accumulate(total: Array, g: Array, *, xp: Namespace) -> Array:
    """``total + g``, in place where ``total`` is writeable."""
    total += g
    return total
