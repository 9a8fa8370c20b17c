"""Adagrad and Adadelta: steps scaled by accumulated squared gradients (torch.optim's forms)."""

from __future__ import annotations

from .._compat import Array, Namespace
from ._common import moving_average, penalized_gradient


def adagrad(
    p: Array,
    g: Array,
    accumulator: Array,
    *,
    learning_rate: float,
    epsilon: float,
    l2: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array]:
    """Adagrad (Duchi et al., 2011), as torch.optim.Adagrad.

    ``g = g + l2*p``; ``s = s + g**2``; ``p = p - lr_t * g / (sqrt(s) + eps)``, where
    ``lr_t = lr / (1 + (t - 1) * lr_decay)`` is computed by the caller.

    Returns:
        ``(p, accumulator)``.
    """
    g = penalized_gradient(g, p, l1=0.0, l2=l2, xp=xp)
    accumulator += xp.square(g)
    denom = xp.sqrt(accumulator)
    denom += epsilon
    p -= learning_rate * g / denom
    return p, accumulator


def adadelta(
    p: Array,
    g: Array,
    square_avg: Array,
    delta_avg: Array,
    *,
    learning_rate: float,
    decay_rate: float,
    epsilon: float,
    l2: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """Adadelta (Zeiler, 2012), as torch.optim.Adadelta (``rho = decay_rate``).

    ``g = g + l2*p``; ``a = rho*a + (1-rho)*g**2``;
    ``d = sqrt(b + eps) / sqrt(a + eps) * g``; ``b = rho*b + (1-rho)*d**2``;
    ``p = p - lr*d``.

    Returns:
        ``(p, square_avg, delta_avg)``.
    """
    g = penalized_gradient(g, p, l1=0.0, l2=l2, xp=xp)
    square_avg = moving_average(square_avg, xp.square(g), decay=decay_rate)
    delta = xp.sqrt(delta_avg + epsilon) / xp.sqrt(square_avg + epsilon) * g
    delta_avg = moving_average(delta_avg, xp.square(delta), decay=decay_rate)
    p -= learning_rate * delta
    return p, square_avg, delta_avg
