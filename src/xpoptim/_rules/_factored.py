"""Adafactor: a factored second moment (row and column means) for matrices, full for
vectors. Not elementwise: means over rows and columns, a matmul, and RMS norms of whole
arrays, so it runs on whole arrays (the plain path)."""

from __future__ import annotations

from .._compat import Array, Namespace


def _rms(x: Array, *, xp: Namespace) -> Array:
    """The root mean square of all elements of ``x``: ``||x|| / sqrt(x.size)``, 0-d."""
    size = 1
    for n in x.shape:
        size *= n
    return xp.sqrt(xp.sum(xp.square(x))) / max(size, 1) ** 0.5  # 0 for an empty x


def _mean(x: Array, axis: int, *, xp: Namespace) -> Array:
    """The mean of ``x`` along ``axis``, kept as a dimension of 1 (0 along an empty axis)."""
    return xp.sum(x, axis=axis, keepdims=True) / max(x.shape[axis], 1)


def adafactor(
    p: Array,
    g: Array,
    row_var: Array,
    col_var: Array,
    variance: Array,
    *,
    learning_rate: float,
    step_size: float,
    one_minus_beta2: float,
    epsilon: float | None,
    min_scale: float,
    clipping_threshold: float,
    decoupled_decay: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array, Array]:
    """Adafactor as torch.optim's ``Adafactor`` computes it.

    With ``w = one_minus_beta2`` (``t**beta2_decay``), ``step_size = min(lr, 1/sqrt(t))``
    and ``eps1 = epsilon`` (the dtype's machine epsilon if ``None``):

    ``alpha = max(min_scale, RMS(p)) * step_size`` (before the decay);
    ``p = p * (1 - lr*decoupled_decay)``;
    a parameter of 2 or more dimensions (the last two factored, per leading index):
    ``row_var += w * (mean(g**2, axis=-1) - row_var)``,
    ``col_var += w * (mean(g**2, axis=-2) - col_var)``,
    ``V = row_var @ col_var / max(mean(row_var, axis=-2), eps1)``; otherwise
    ``variance += w * (g**2 - variance)``, ``V = variance``;
    ``u = g / sqrt(max(V, eps1**2))``;
    ``p = p - alpha / max(1, RMS(u)/clipping_threshold) * u``.

    ``row_var`` has shape ``p.shape[:-1] + (1,)`` and ``col_var``
    ``p.shape[:-2] + (1, p.shape[-1])``; ``variance`` has ``p``'s shape. The buffers a
    parameter does not use are empty (shape ``(0,)``) and returned as they are.

    Not elementwise: means, a matmul and RMS norms over the whole parameter.

    Returns:
        ``(p, row_var, col_var, variance)``.
    """
    eps1 = xp.finfo(p.dtype).eps if epsilon is None else epsilon
    alpha = xp.clip(_rms(p, xp=xp), min=min_scale) * step_size
    if decoupled_decay:
        p *= 1.0 - learning_rate * decoupled_decay
    g2 = xp.square(g)
    if p.ndim >= 2:
        row_var += one_minus_beta2 * (_mean(g2, -1, xp=xp) - row_var)
        col_var += one_minus_beta2 * (_mean(g2, -2, xp=xp) - col_var)
        row_scale = xp.clip(_mean(row_var, -2, xp=xp), min=eps1)
        estimate = xp.matmul(row_var, col_var) / row_scale
    else:
        variance += one_minus_beta2 * (g2 - variance)
        estimate = variance
    u = g / xp.sqrt(xp.clip(estimate, min=eps1 * eps1))
    scale = alpha / xp.clip(_rms(u, xp=xp) / clipping_threshold, min=1.0)
    p -= scale * u
    return p, row_var, col_var, variance
