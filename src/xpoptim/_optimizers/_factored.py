"""Factored second moments: `Adafactor` (torch.optim's ``Adafactor``).

A matrix's second moment is kept as its row and column means (``m + n`` numbers for an
``m x n`` matrix), a vector's in full. The rule takes means, a matmul and RMS norms of
whole parameters: it is not elementwise, so it runs on whole arrays (the plain path, as
`xpoptim.explain` says) and `OutOfCore` refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

from .. import _rules
from .. import _validation as check
from .._compat import Array
from ._base import NOT_DECAYED
from ._decoupled import DecoupledOnly


class AdafactorState(NamedTuple):
    """State of `Adafactor`.

    A parameter of shape ``(..., m, n)`` (2 or more dimensions) keeps ``row_var`` of shape
    ``(..., m, 1)`` and ``col_var`` of shape ``(..., 1, n)``, and an empty ``variance``
    (shape ``(0,)``); any other parameter keeps ``variance`` of its own shape and empty
    factors. torch.optim's ``Adafactor`` keeps the same arrays, under the same names.

    Attributes:
        step: number of updates applied so far.
        row_var: parameter name -> running mean of ``g**2`` over the last axis.
        col_var: parameter name -> running mean of ``g**2`` over the second-to-last axis.
        variance: parameter name -> running ``g**2`` (parameters of fewer than 2 dims).
        skipped: number of updates skipped by ``nonfinite="skip"``; ``None`` under the
            other policies.
    """

    step: Any
    row_var: dict[str, Array]
    col_var: dict[str, Array]
    variance: dict[str, Array]
    skipped: Any = None


def _row_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-1], 1) if len(shape) >= 2 else (0,)


def _col_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-2], 1, shape[-1]) if len(shape) >= 2 else (0,)


def _variance_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if len(shape) < 2 else (0,)


def _minimum(a: Any, b: Any) -> Any:
    """``min(a, b)``, also for traced (``jax.jit``) or lazy 0-d arrays."""
    if isinstance(a, int | float) and isinstance(b, int | float):
        return min(a, b)
    return (a + b - abs(a - b)) / 2


class Adafactor(DecoupledOnly):
    """Adafactor: Adam-like steps from a factored second moment, relative to the weights.

    Update rule, with ``t`` the step count (from 1) and ``eps1 = epsilon`` (the dtype's
    machine epsilon when ``None``):

    1. ``w2 = t**beta2_decay`` (the weight of the new ``g**2``: ``beta2_t = 1 - w2``);
       ``rho = min(learning_rate, 1/sqrt(t))``
    2. ``alpha = max(min_scale, RMS(w)) * rho``
    3. ``w = w * (1 - learning_rate * weight_decay)``
    4. a parameter of 2 or more dims (the last two factored):
       ``R = R + w2 * (mean(g**2, last axis) - R)``,
       ``C = C + w2 * (mean(g**2, second-to-last axis) - C)``,
       ``V = R @ C / max(mean(R), eps1)``; otherwise ``V = V + w2 * (g**2 - V)``
    5. ``u = g / sqrt(max(V, eps1**2))``
    6. ``w = w - alpha / max(1, RMS(u) / clipping_threshold) * u``

    ``RMS(x) = ||x|| / sqrt(x.size)``, over the whole array.

    Paper: Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost" (ICML 2018). Peer: ``torch.optim.Adafactor``, matched to float64 rounding with
    the same defaults (torch's ``lr``, ``beta2_decay``, ``eps=(eps1, eps2)``, ``d``,
    ``weight_decay`` are ``learning_rate``, ``beta2_decay``, ``(epsilon, min_scale)``,
    ``clipping_threshold``, ``weight_decay``). Differences: torch decays every
    parameter; xpoptim skips the names ``no_decay`` selects (pass ``no_decay=()`` for
    torch's behaviour). No first moment (torch has none either). ``optax.adafactor``
    differs more: it factors only dimensions of at least 128, clips the update before
    its relative scaling, and has no decay by default.

    Not elementwise (means, a matmul, RMS norms): it runs on whole arrays, and
    `OutOfCore` refuses it.

    Args:
        learning_rate: the cap of the relative step size ``rho``, or a schedule (see
            [schedules][xpoptim.schedules]). Defaults to 0.01.
        beta2_decay: the exponent of ``t`` in ``1 - beta2_t``, <= 0. Defaults to -0.8.
        epsilon: the floor of the second moment's square root, > 0, or ``None`` for
            the dtype's machine epsilon. Defaults to None.
        min_scale: the floor of ``RMS(w)`` in the step size, > 0. Defaults to 1e-3.
        clipping_threshold: the update's RMS above which it is scaled down, > 0 (torch's
            ``d``). Defaults to 1.0.
        weight_decay: decoupled decay strength, >= 0. Defaults to 0 (off).
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).

    Examples:
        >>> import numpy as np
        >>> import xpoptim
        >>> opt = xpoptim.Adafactor()
        >>> params = {"w": np.ones((2, 3))}
        >>> state = opt.init(params)
        >>> state.row_var["w"].shape, state.col_var["w"].shape
        ((2, 1), (1, 3))
        >>> params, state = opt.update(params, {"w": np.ones((2, 3))}, state)
        >>> params["w"]  # alpha = max(1e-3, 1) * min(0.01, 1): w - 0.01 * u, RMS(u) = 1
        array([[0.99, 0.99, 0.99],
               [0.99, 0.99, 0.99]])
    """

    State = AdafactorState
    _rule = staticmethod(_rules.adafactor)
    _hyperparameters = ("beta2_decay", "epsilon", "min_scale", "clipping_threshold")
    _buffer_shapes: ClassVar[dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]]] = {
        "row_var": _row_shape,
        "col_var": _col_shape,
        "variance": _variance_shape,
    }

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.01,
        beta2_decay: float = -0.8,
        epsilon: float | None = None,
        min_scale: float = 1e-3,
        clipping_threshold: float = 1.0,
        weight_decay: float = 0.0,
        *,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.beta2_decay = beta2_decay
        self.epsilon = epsilon
        self.min_scale = min_scale
        self.clipping_threshold = clipping_threshold
        self.no_decay = no_decay
        self.nonfinite = nonfinite
        super().__init__(learning_rate, None, weight_decay)  # type: ignore[arg-type]

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.non_positive(self.beta2_decay, "beta2_decay")
        if self.epsilon is not None:
            check.positive(self.epsilon, "epsilon")
        check.positive(self.min_scale, "min_scale")
        check.positive(self.clipping_threshold, "clipping_threshold")

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        lr = self._learning_rate(step)
        return {
            "learning_rate": lr,
            "step_size": _minimum(lr, step**-0.5),
            "one_minus_beta2": step ** float(self.beta2_decay),
            "epsilon": None if self.epsilon is None else float(self.epsilon),
            "min_scale": float(self.min_scale),
            "clipping_threshold": float(self.clipping_threshold),
        }

    def _param_scalars(self, name: str) -> dict[str, Any]:
        return {"decoupled_decay": self._decay(name)}
