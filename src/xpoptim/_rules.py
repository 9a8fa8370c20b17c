"""Update rules: the math of every optimizer, written once against the Array API standard.

Each rule is a pure function of arrays and Python scalars. It uses only the namespace
``xp`` it is given and the standard's operators: no backend branches, no output-array arguments, no
``bool()``/``float()`` on arrays. Hyperparameters and bias corrections arrive as Python
floats, so float32 state stays float32 (a NumPy scalar or a 0-d float64 array would
silently promote it).

The rules use the standard's in-place operators (``m *= beta1``). On eager, writeable
arrays (NumPy, CuPy, PyTorch, array-api-strict) they update the buffers in place; on
immutable or lazy arrays (JAX, Dask) the same statements rebind to new arrays. Either
way the rule *returns* its results, and callers must use what it returns. How a rule is
executed for a given backend (in place, on copies, lazily, blocked) is decided in
:mod:`xpoptim._execution`, never here.

Every rule is elementwise, so it may be applied to any slice of its arrays.
"""

from __future__ import annotations

from ._compat import Array, Namespace


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
    g = penalized_gradient(g, p, l1=l1, l2=l2, xp=xp)
    cache *= decay_rate
    cache += (1.0 - decay_rate) * xp.square(g)
    denom = xp.sqrt(cache)
    denom += epsilon
    p -= learning_rate * g / denom
    return p, cache


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
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * xp.square(g)
    denom = xp.sqrt(v)
    denom /= sqrt_bias_correction2
    denom += epsilon
    p -= step_size * m / denom
    if decoupled_decay:
        p -= learning_rate * (decoupled_decay * p)
    return p, m, v
