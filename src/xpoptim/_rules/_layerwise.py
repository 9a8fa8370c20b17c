"""Layer-wise trust ratios: LAMB and LARS. Not elementwise: each rule takes two norms of
a whole parameter, so it runs on whole arrays (the plain path)."""

from __future__ import annotations

from .._compat import Array, Namespace
from ._common import moving_average


def _norm(x: Array, *, xp: Namespace) -> Array:
    """The Euclidean (Frobenius) norm of all elements of ``x``, a 0-d array."""
    return xp.sqrt(xp.sum(xp.square(x)))


def trust_ratio(p: Array, r: Array, *, coefficient: float, epsilon: float, xp: Namespace) -> Array:
    """``coefficient * ||p|| / (||r|| + epsilon)``, or exactly 1 where either norm is 0.

    optax's ``scale_by_trust_ratio`` (min_norm 0): a zero parameter (a fresh bias) or a
    zero update keeps the update as it is. Never divides by zero.
    """
    p_norm = _norm(p, xp=xp)
    r_norm = _norm(r, xp=xp)
    one = xp.ones_like(p_norm)
    zero = (p_norm == 0.0) | (r_norm == 0.0)
    ratio = coefficient * p_norm / xp.where(zero, one, r_norm + epsilon)
    return xp.where(zero, one, ratio)


def lamb(
    p: Array,
    g: Array,
    m: Array,
    v: Array,
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    bias_correction1: float,
    bias_correction2: float,
    weight_decay: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """LAMB (optax's ``lamb``): Adam's direction, decoupled decay, a per-parameter trust ratio.

    With ``bc1 = 1 - beta1**t`` and ``bc2 = 1 - beta2**t`` (``t`` from 1):

    ``m = beta1*m + (1-beta1)*g``; ``v = beta2*v + (1-beta2)*g**2``;
    ``r = (m/bc1) / (sqrt(v/bc2) + eps) + weight_decay*p``;
    ``ratio = ||p|| / ||r||`` (1 if either norm is 0); ``p = p - lr * ratio * r``.

    Not elementwise: the two norms see the whole parameter.

    Returns:
        ``(p, m, v)``.
    """
    m = moving_average(m, g, decay=beta1)
    v = moving_average(v, xp.square(g), decay=beta2)
    r = (m / bias_correction1) / (xp.sqrt(v / bias_correction2) + epsilon)
    if weight_decay:
        r = r + weight_decay * p
    ratio = trust_ratio(p, r, coefficient=1.0, epsilon=0.0, xp=xp)
    p -= (learning_rate * ratio) * r
    return p, m, v


def lars(
    p: Array,
    g: Array,
    velocity: Array,
    *,
    learning_rate: float,
    momentum: float,
    trust_coefficient: float,
    epsilon: float,
    nesterov: bool,
    weight_decay: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array]:
    """LARS (optax's ``lars``): a trust-ratio-scaled step, then momentum.

    ``r = g + weight_decay*p``; ``ratio = trust_coefficient * ||p|| / (||r|| + eps)``
    (1 if either norm is 0); ``u = -lr * ratio * r``; ``v = momentum*v + u``;
    ``p = p + v`` (``nesterov``: ``p = p + momentum*v + u``).

    Not elementwise: the two norms see the whole parameter.

    Returns:
        ``(p, velocity)``.
    """
    r = g + weight_decay * p if weight_decay else g
    ratio = trust_ratio(p, r, coefficient=trust_coefficient, epsilon=epsilon, xp=xp)
    u = (-learning_rate * ratio) * r
    velocity *= momentum
    velocity += u
    if nesterov:
        p += momentum * velocity + u
    else:
        p += velocity
    return p, velocity
