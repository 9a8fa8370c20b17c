"""What several rules share: the coupled L1/L2 penalty."""

from __future__ import annotations

from .._compat import Array, Namespace


def penalized_gradient(g: Array, p: Array, *, l1: float, l2: float, xp: Namespace) -> Array:
    """The gradient with the coupled L1/L2 penalty added: ``g + l1*sign(p) + l2*p``.

    Returns ``g`` itself (never modified) when both strengths are zero, otherwise a new
    array.
    """
    if l1:
        g = g + l1 * xp.sign(p)
    if l2:
        g = g + l2 * p
    return g
