"""Schedule-free AdamW: Adam's step on a sequence ``z``, averaged into ``x``, evaluated at ``y``."""

from __future__ import annotations

from .._compat import Array, Namespace
from ._common import moving_average


def schedule_free_adamw(
    y: Array,
    g: Array,
    z: Array,
    v: Array,
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    bias_correction2: float,
    average_weight: float,
    decoupled_decay: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """Schedule-free AdamW (Defazio et al., 2024), as optax.contrib.schedule_free_adamw.

    The parameters are ``y``, where gradients are taken; ``x`` (the average, to evaluate
    the model at) is ``(y - (1-beta1)*z) / beta1``. With ``c_t = average_weight``
    (``w_t / (w_1 + ... + w_t)``, ``w_i = max(lr_1..lr_i)**power``, from the caller):

    ``v = beta2*v + (1-beta2)*g**2``;
    ``u = g / (sqrt(v/(1 - beta2**t)) + eps) + decoupled_decay*y``;
    ``x = (y - (1-beta1)*z) / beta1``; ``z = z - lr*u``; ``x = (1-c_t)*x + c_t*z``;
    ``y = beta1*x + (1-beta1)*z``.

    Returns:
        ``(y, z, v)``.
    """
    v = moving_average(v, xp.square(g), decay=beta2)
    update = g * (1.0 / (xp.sqrt(v / bias_correction2) + epsilon))
    if decoupled_decay:
        update = update + decoupled_decay * y
    x = (y - (1.0 - beta1) * z) / beta1
    z -= learning_rate * update
    x = (1.0 - average_weight) * x + average_weight * z
    # A new array: where the parameters are updated in place, the execution layer writes
    # it back into y's memory.
    y = beta1 * x + (1.0 - beta1) * z
    return y, z, v


def schedule_free_average(y: Array, z: Array, *, beta1: float, xp: Namespace) -> Array:
    """The averaged sequence ``x = (y - (1-beta1)*z) / beta1``: the point to evaluate at
    (optax.contrib.schedule_free_eval_params). A new array."""
    return (y - (1.0 - beta1) * z) / beta1
