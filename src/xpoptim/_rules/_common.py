"""What several rules share: the coupled L1/L2 penalty and exponential moving averages."""

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


def moving_average(average: Array, value: Array, *, decay: float) -> Array:
    """``average = decay*average + (1-decay)*value``, in place where ``average`` is writeable.

    The moments of the Adam family, RMSprop's and Adadelta's squares, Lion's momentum: two
    operations in this order (``average *= decay`` first), so every rule that uses it
    rounds exactly as the others do. Returns the average; callers use what it returns.
    """
    average *= decay
    average += (1.0 - decay) * value
    return average
