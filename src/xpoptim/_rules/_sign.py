"""Rprop and Lion: steps from the signs of gradients."""

from __future__ import annotations

from .._compat import Array, Namespace
from ._common import moving_average, penalized_gradient


def rprop(
    p: Array,
    g: Array,
    previous: Array,
    step_size: Array,
    *,
    eta_minus: float,
    eta_plus: float,
    step_size_min: float,
    step_size_max: float,
    l2: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """Rprop (Riedmiller and Braun, 1993), as torch.optim.Rprop.

    ``g = g + l2*p``; where ``g*previous > 0`` the step size grows,
    ``s = min(s*eta_plus, s_max)``; where ``g*previous < 0`` it shrinks,
    ``s = max(s*eta_minus, s_min)``, and ``g`` counts as 0 this step; elsewhere it stays.
    Then ``p = p - sign(g)*s`` and ``previous = g``.

    Returns:
        ``(p, previous, step_size)``.
    """
    g = penalized_gradient(g, p, l1=0.0, l2=l2, xp=xp)
    product = g * previous
    # New arrays: where the buffers are updated in place, the execution layer writes
    # them back into the buffers' memory.
    step_size = xp.where(
        product > 0.0,
        step_size * eta_plus,
        xp.where(product < 0.0, step_size * eta_minus, step_size),
    )
    step_size = xp.clip(step_size, step_size_min, step_size_max)
    previous = xp.where(product < 0.0, 0.0 * g, g)
    p -= xp.sign(previous) * step_size
    return p, previous, step_size


def lion(
    p: Array,
    g: Array,
    m: Array,
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    decoupled_decay: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array]:
    """Lion (Chen et al., 2023), as optax.lion.

    ``u = sign(beta1*m + (1-beta1)*g)``; ``p = p - lr*(u + decoupled_decay*p)``;
    ``m = beta2*m + (1-beta2)*g``.

    Returns:
        ``(p, m)``.
    """
    update = xp.sign(beta1 * m + (1.0 - beta1) * g)
    if decoupled_decay:
        update = update + decoupled_decay * p
    p -= learning_rate * update
    m = moving_average(m, g, decay=beta2)
    return p, m
