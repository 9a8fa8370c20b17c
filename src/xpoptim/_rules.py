"""Update rules: the math of every optimizer, written once against the Array API standard.

Each rule is a pure function of arrays and Python scalars. It uses only the namespace
``xp`` it is given and the standard's operators: no backend branches, no output-array arguments, no
``bool()``/``float()`` on arrays. Hyperparameters and bias corrections arrive as Python
floats, so float32 state stays float32 (a NumPy scalar or a 0-d float64 array would
silently promote it).

The rules use the standard's in-place operators (``m *= beta1``). On eager, writeable
arrays (NumPy, CuPy, PyTorch, array-api-strict) they update the buffers in place; on
immutable or lazy arrays (JAX, Dask) the same statements rebind to new arrays. Either
way the rule *returns* its results, and callers must use what it returns. A rule may
also rebind a buffer to a new array (``v_max = xp.maximum(v_max, v)``, which has no
in-place form); where buffers are updated in place, the execution layer writes that
value back into the buffer's memory. How a rule is
executed for a given backend (in place, on copies, lazily, blocked) is decided in
`xpoptim._execution`, never here.

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


# -- variants: Nesterov, centered RMSprop with momentum, AMSGrad ---------------------------


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
    cache *= decay_rate
    cache += (1.0 - decay_rate) * xp.square(g)
    if centered:
        mean_grad = rest.pop(0)
        mean_grad *= decay_rate
        mean_grad += (1.0 - decay_rate) * g
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
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * xp.square(g)
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


# -- gradient transforms: clipping and accumulation -------------------------------------


def clip_by_value(g: Array, *, limit: float, xp: Namespace) -> Array:
    """Each element clipped to ``[-limit, limit]`` (a new array)."""
    return xp.clip(g, -limit, limit)


def sum_of_squares(g: Array, *, xp: Namespace) -> Array:
    """``sum(g**2)`` over all elements, a 0-d array (lazy on Dask)."""
    return xp.sum(xp.square(g))


def clip_scale(norm: Array, *, max_norm: float, xp: Namespace) -> Array:
    """The factor ``max_norm / max(norm, max_norm)``: exactly 1 when ``norm <= max_norm``.

    Never divides by zero (``max_norm > 0``), so a zero gradient stays zero.
    """
    return max_norm / xp.clip(norm, min=max_norm)


def accumulate(total: Array, g: Array, *, xp: Namespace) -> Array:
    """``total + g``, in place where ``total`` is writeable."""
    total += g
    return total
