"""Adamax, NAdam and RAdam: Adam's variants, in torch.optim's forms."""

from __future__ import annotations

from .._compat import Array, Namespace
from ._common import moving_average, penalized_gradient


def _decay_and_penalty(
    p: Array, g: Array, *, learning_rate: float, l2: float, decoupled_decay: float, xp: Namespace
) -> tuple[Array, Array]:
    """torch.optim's two weight decays: ``p = p * (1 - lr*wd)`` (decoupled, on ``p``
    before the step) and ``g = g + l2*p`` (coupled). Returns ``(p, g)``: use both (an
    in-place ``*=`` rebinds on JAX, Dask and in the tracer)."""
    if decoupled_decay:
        p *= 1.0 - learning_rate * decoupled_decay
    return p, penalized_gradient(g, p, l1=0.0, l2=l2, xp=xp)


def adamax(
    p: Array,
    g: Array,
    m: Array,
    u: Array,
    *,
    beta1: float,
    beta2: float,
    epsilon: float,
    step_size: float,
    l2: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """Adamax (Kingma and Ba, 2015, section 7), as torch.optim.Adamax.

    ``g = g + l2*p``; ``m = beta1*m + (1-beta1)*g``; ``u = max(beta2*u, |g| + eps)``;
    ``p = p - (lr/(1 - beta1**t)) * m / u``, with ``step_size = lr/(1 - beta1**t)``.

    Returns:
        ``(p, m, u)``.
    """
    g = penalized_gradient(g, p, l1=0.0, l2=l2, xp=xp)
    m = moving_average(m, g, decay=beta1)
    u *= beta2
    # A new array: where the buffers are updated in place, the execution layer writes it
    # back into u's memory.
    u = xp.maximum(u, xp.abs(g) + epsilon)
    p -= step_size * m / u
    return p, m, u


def nadam(
    p: Array,
    g: Array,
    m: Array,
    v: Array,
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    bias_correction2: float,
    gradient_step: float,
    momentum_step: float,
    l2: float = 0.0,
    decoupled_decay: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """NAdam (Dozat, 2016), as torch.optim.NAdam.

    With ``mu_t = beta1*(1 - 0.5*0.96**(t*psi))`` (``psi`` the momentum decay) and
    ``P_t = mu_1*...*mu_t``, computed by the caller:
    ``gradient_step = lr*(1 - mu_t)/(1 - P_t)`` and
    ``momentum_step = lr*mu_{t+1}/(1 - P_t*mu_{t+1})``.

    ``p = p*(1 - lr*decoupled_decay)``; ``g = g + l2*p``; ``m = beta1*m + (1-beta1)*g``;
    ``v = beta2*v + (1-beta2)*g**2``; ``d = sqrt(v/(1 - beta2**t)) + eps``;
    ``p = p - gradient_step*g/d - momentum_step*m/d``.

    Returns:
        ``(p, m, v)``.
    """
    p, g = _decay_and_penalty(
        p, g, learning_rate=learning_rate, l2=l2, decoupled_decay=decoupled_decay, xp=xp
    )
    m = moving_average(m, g, decay=beta1)
    v = moving_average(v, xp.square(g), decay=beta2)
    denom = xp.sqrt(v / bias_correction2)
    denom += epsilon
    p -= gradient_step * g / denom
    p -= momentum_step * m / denom
    return p, m, v


def radam(
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
    rectified: bool,
    sqrt_bias_correction2: float,
    l2: float = 0.0,
    decoupled_decay: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """RAdam (Liu et al., 2020), as torch.optim.RAdam.

    ``p = p*(1 - lr*decoupled_decay)``; ``g = g + l2*p``; ``m = beta1*m + (1-beta1)*g``;
    ``v = beta2*v + (1-beta2)*g**2``. While the variance is tractable (``rectified``,
    ``rho_t > 5``, decided by the caller from the step count):
    ``p = p - step_size * m * sqrt(1 - beta2**t) / (sqrt(v) + eps)`` with
    ``step_size = lr * r_t / (1 - beta1**t)``; before that (SGD with momentum)
    ``p = p - step_size * m`` with ``step_size = lr / (1 - beta1**t)``.

    Returns:
        ``(p, m, v)``.
    """
    p, g = _decay_and_penalty(
        p, g, learning_rate=learning_rate, l2=l2, decoupled_decay=decoupled_decay, xp=xp
    )
    m = moving_average(m, g, decay=beta1)
    v = moving_average(v, xp.square(g), decay=beta2)
    if rectified:
        denom = xp.sqrt(v)
        denom += epsilon
        p -= step_size * m * sqrt_bias_correction2 / denom
    else:
        p -= step_size * m
    return p, m, v
