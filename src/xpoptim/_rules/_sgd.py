"""SGD: heavy-ball momentum (the seed's form) and Nesterov momentum."""

from __future__ import annotations

from .._compat import Array, Namespace
from ._common import penalized_gradient


def sgd(
    p: Array,
    g: Array,
    velocity: Array,
    *,
    learning_rate: float,
    momentum: float,
    l1: float = 0.0,
    l2: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array]:
    """SGD with (heavy-ball) momentum, the seed's form.

    ``g = g + l1*sign(p) + l2*p``; ``v = momentum*v - lr*g``; ``p = p + v``.

    Returns:
        ``(p, velocity)``.
    """
    g = penalized_gradient(g, p, l1=l1, l2=l2, xp=xp)
    velocity *= momentum
    velocity -= learning_rate * g
    p += velocity
    return p, velocity


def sgd_nesterov(
    p: Array,
    g: Array,
    velocity: Array,
    *,
    learning_rate: float,
    momentum: float,
    l1: float = 0.0,
    l2: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array]:
    """SGD with Nesterov momentum, in the seed's velocity form.

    ``g = g + l1*sign(p) + l2*p``; ``v = momentum*v - lr*g``;
    ``p = p + momentum*v - lr*g`` (the look-ahead step). With a constant learning rate
    this is PyTorch's ``SGD(nesterov=True)``, whose buffer is ``-v/lr``.

    Returns:
        ``(p, velocity)``.
    """
    g = penalized_gradient(g, p, l1=l1, l2=l2, xp=xp)
    velocity *= momentum
    velocity -= learning_rate * g
    p += momentum * velocity - learning_rate * g
    return p, velocity
