"""Muon: momentum orthogonalized by a Newton-Schulz iteration, for 2-D parameters; the
others take AdamW. Not elementwise: matmuls and a norm of the whole matrix, so it runs
on whole arrays (the plain path)."""

from __future__ import annotations

from .._compat import Array, Namespace
from ._common import moving_average


def newton_schulz(
    x: Array, *, a: float, b: float, c: float, steps: int, epsilon: float, xp: Namespace
) -> Array:
    """An approximate orthogonalization ``U S' V^T`` of the matrix ``x = U S V^T``.

    ``X = x / max(||x||_F, epsilon)`` (transposed first if it has more rows than
    columns); ``steps`` times: ``A = X @ X^T``; ``X = a*X + (b*A + c*A@A) @ X``; then
    transposed back. torch.optim's ``Muon`` iteration, in ``x``'s own dtype.
    """
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = xp.matrix_transpose(x)
    norm = xp.sqrt(xp.sum(xp.square(x)))
    x = x / xp.clip(norm, min=epsilon)
    for _ in range(steps):
        gram = xp.matmul(x, xp.matrix_transpose(x))
        update = b * gram + c * xp.matmul(gram, gram)
        x = a * x + xp.matmul(update, x)
    if transposed:
        x = xp.matrix_transpose(x)
    return x


def muon(
    p: Array,
    g: Array,
    m: Array,
    v: Array,
    *,
    learning_rate: float,
    momentum: float,
    nesterov: bool,
    ns_a: float,
    ns_b: float,
    ns_c: float,
    ns_steps: int,
    epsilon: float,
    match_rms_adamw: bool,
    adam_beta1: float,
    adam_beta2: float,
    adam_epsilon: float,
    adam_step_size: float,
    adam_sqrt_bias_correction2: float,
    decoupled_decay: float = 0.0,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """Muon for a 2-D parameter (torch.optim's ``Muon``), AdamW for any other.

    2-D ``p`` of shape ``(A, B)``: ``m = m + (1-momentum)*(g - m)``;
    ``u = g + momentum*(m - g)`` (``nesterov``) or ``u = m``;
    ``O = newton_schulz(u)``; ``p = p * (1 - lr*decoupled_decay)``;
    ``p = p - lr * s * O`` with ``s = sqrt(max(1, A/B))`` (``adjust_lr="original"``) or
    ``s = 0.2*sqrt(max(A, B))`` (``match_rms_adamw``). ``v`` is empty and unused.

    Other ``p`` (torch.optim's ``AdamW``): ``m = adam_beta1*m + (1-adam_beta1)*g``;
    ``v = adam_beta2*v + (1-adam_beta2)*g**2``; ``p = p * (1 - lr*decoupled_decay)``;
    ``p = p - adam_step_size * m / (sqrt(v)/adam_sqrt_bias_correction2 + adam_epsilon)``,
    with ``adam_step_size = lr/(1 - adam_beta1**t)`` and
    ``adam_sqrt_bias_correction2 = sqrt(1 - adam_beta2**t)``.

    Not elementwise (2-D): matmuls and the norm of the whole matrix.

    Returns:
        ``(p, m, v)``.
    """
    if p.ndim != 2:
        m = moving_average(m, g, decay=adam_beta1)
        v = moving_average(v, xp.square(g), decay=adam_beta2)
        if decoupled_decay:
            p *= 1.0 - learning_rate * decoupled_decay
        denom = xp.sqrt(v) / adam_sqrt_bias_correction2 + adam_epsilon
        p -= adam_step_size * m / denom
        return p, m, v
    m += (1.0 - momentum) * (g - m)
    u = g + momentum * (m - g) if nesterov else m
    o = newton_schulz(u, a=ns_a, b=ns_b, c=ns_c, steps=ns_steps, epsilon=epsilon, xp=xp)
    rows, cols = p.shape
    # Moonshot's RMS match, or Keller Jordan's original scale.
    scale = (
        0.2 * max(rows, cols) ** 0.5 if match_rms_adamw else max(1.0, rows / max(cols, 1)) ** 0.5
    )
    if decoupled_decay:
        p *= 1.0 - learning_rate * decoupled_decay
    p -= (learning_rate * scale) * o
    return p, m, v
