"""RMSprop: the seed's form, and torch.optim's centered/momentum form."""

from __future__ import annotations

from .._compat import Array, Namespace
from ._common import moving_average, penalized_gradient


def rmsprop(
    p: Array,
    g: Array,
    cache: Array,
    *,
    learning_rate: float,
    decay_rate: float,
    epsilon: float,
    l1: float = 0.0,
    l2: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array]:
    """RMSprop, the seed's form (epsilon added after the square root).

    ``g = g + l1*sign(p) + l2*p``; ``c = rho*c + (1-rho)*g**2``;
    ``p = p - lr*g/(sqrt(c) + eps)``.

    Returns:
        ``(p, cache)``.
    """
    p, cache = rmsprop_extended(
        p,
        g,
        cache,
        learning_rate=learning_rate,
        decay_rate=decay_rate,
        epsilon=epsilon,
        centered=False,
        momentum=0.0,
        l1=l1,
        l2=l2,
        xp=xp,
    )
    return p, cache


def rmsprop_extended(
    p: Array,
    g: Array,
    cache: Array,
    *buffers: Array,
    learning_rate: float,
    decay_rate: float,
    epsilon: float,
    centered: bool,
    momentum: float,
    l1: float = 0.0,
    l2: float = 0.0,
    xp: Namespace,
) -> tuple[Array, ...]:
    """RMSprop, optionally centered and with momentum (PyTorch's RMSprop).

    ``buffers`` is ``(mean_grad,)`` if ``centered``, then ``(momentum_buffer,)`` if
    ``momentum > 0``, in that order. With ``rho = decay_rate``:

    ``g = g + l1*sign(p) + l2*p``; ``c = rho*c + (1-rho)*g**2``;
    centered: ``a = rho*a + (1-rho)*g`` and ``d = sqrt(c - a**2) + eps``, else
    ``d = sqrt(c) + eps``; momentum: ``b = momentum*b + g/d`` and ``p = p - lr*b``, else
    ``p = p - lr*g/d``.

    Returns:
        ``(p, cache, *buffers)``.
    """
    g = penalized_gradient(g, p, l1=l1, l2=l2, xp=xp)
    rest = list(buffers)
    cache = moving_average(cache, xp.square(g), decay=decay_rate)
    if centered:
        mean_grad = rest.pop(0)
        mean_grad = moving_average(mean_grad, g, decay=decay_rate)
        denom = xp.sqrt(cache - xp.square(mean_grad))
        out: list[Array] = [mean_grad]
    else:
        denom = xp.sqrt(cache)
        out = []
    denom += epsilon
    if momentum:
        buf = rest.pop(0)
        buf *= momentum
        buf += g / denom
        p -= learning_rate * buf
        out.append(buf)
    else:
        p -= learning_rate * g / denom
    return (p, cache, *out)
