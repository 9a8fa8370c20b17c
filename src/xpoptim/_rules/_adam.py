"""Adam with bias correction, and AMSGrad; coupled L1 or decoupled (AdamW) decay."""

from __future__ import annotations

from .._compat import Array, Namespace
from ._common import moving_average, penalized_gradient


def adam(
    p: Array,
    g: Array,
    m: Array,
    v: Array,
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    step_size: float,
    sqrt_bias_correction2: float,
    l1: float = 0.0,
    decoupled_decay: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """Adam with bias correction; optional coupled L1 and decoupled (AdamW-style) decay.

    With ``t`` the step count (from 1), ``bc1 = 1 - beta1**t`` and ``bc2 = 1 - beta2**t``:

    ``g = g + l1*sign(p)``; ``m = beta1*m + (1-beta1)*g``;
    ``v = beta2*v + (1-beta2)*g**2``;
    ``p = p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)``;
    then ``p = p - lr*(decoupled_decay*p)`` on the *updated* ``p``.

    ``step_size`` is ``lr/bc1`` and ``sqrt_bias_correction2`` is ``sqrt(bc2)``, both
    computed once per step by the caller.

    Returns:
        ``(p, m, v)``.
    """
    g = penalized_gradient(g, p, l1=l1, l2=0.0, xp=xp)
    m = moving_average(m, g, decay=beta1)
    v = moving_average(v, xp.square(g), decay=beta2)
    denom = xp.sqrt(v)
    denom /= sqrt_bias_correction2
    denom += epsilon
    p -= step_size * m / denom
    if decoupled_decay:
        p -= learning_rate * (decoupled_decay * p)
    return p, m, v


def adam_amsgrad(
    p: Array,
    g: Array,
    m: Array,
    v: Array,
    v_max: Array,
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    step_size: float,
    sqrt_bias_correction2: float,
    l1: float = 0.0,
    decoupled_decay: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array, Array]:
    """Adam with AMSGrad: the denominator uses the running maximum of ``v``.

    As `adam`, with ``v_max = max(v_max, v)`` after the update of ``v`` and
    ``p = p - (lr/bc1) * m / (sqrt(v_max)/sqrt(bc2) + eps)`` (PyTorch's
    ``amsgrad=True``).

    Returns:
        ``(p, m, v, v_max)``.
    """
    g = penalized_gradient(g, p, l1=l1, l2=0.0, xp=xp)
    m = moving_average(m, g, decay=beta1)
    v = moving_average(v, xp.square(g), decay=beta2)
    # A new array: where the buffers are updated in place, the execution layer writes it
    # back into v_max's memory.
    v_max = xp.maximum(v_max, v)
    denom = xp.sqrt(v_max)
    denom /= sqrt_bias_correction2
    denom += epsilon
    p -= step_size * m / denom
    if decoupled_decay:
        p -= learning_rate * (decoupled_decay * p)
    return p, m, v, v_max
