"""Rprop and Lion: steps from the signs of gradients, not their sizes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

from .. import _rules
from .. import _validation as check
from .._compat import Array, Namespace
from ._base import NOT_DECAYED, filled
from ._peer import PeerOptimizer


class RpropState(NamedTuple):
    """State of `Rprop`.

    Attributes:
        step: number of updates applied so far.
        previous: parameter name -> the gradient of the previous step (0 where its sign
            flipped).
        step_sizes: parameter name -> each element's step size (starts at
            ``learning_rate``).
        skipped: number of updates skipped by ``nonfinite="skip"``; ``None`` under the
            other policies.
    """

    step: Any
    previous: dict[str, Array]
    step_sizes: dict[str, Array]
    skipped: Any = None


class LionState(NamedTuple):
    """State of `Lion`.

    Attributes:
        step: number of updates applied so far.
        momentums: parameter name -> momentum ``m``.
        skipped: number of updates skipped by ``nonfinite="skip"``; ``None`` under the
            other policies.
    """

    step: Any
    momentums: dict[str, Array]
    skipped: Any = None


class Rprop(PeerOptimizer):
    """Rprop: each element moves by its own step size, grown or shrunk by sign agreement.

    Update rule (per element, ``p`` the previous gradient, ``s`` the step size):

    1. ``g = g + weight_decay * w`` (coupled; torch's Rprop has no weight decay)
    2. if ``g * p > 0``: ``s = min(s * eta_plus, step_size_max)``
    3. if ``g * p < 0``: ``s = max(s * eta_minus, step_size_min)`` and ``g = 0``
    4. ``w = w - sign(g) * s``; ``p = g``

    ``s`` starts at ``learning_rate``, which is used for nothing else: it must be a
    number, not a schedule. Paper: Riedmiller and Braun, "A Direct Adaptive Method for
    Faster Backpropagation Learning: The RPROP Algorithm", ICNN 1993 (the variant
    without weight backtracking, "Rprop-"). Matches ``torch.optim.Rprop`` (``lr``,
    ``etas=(eta_minus, eta_plus)``, ``step_sizes=(step_size_min, step_size_max)``),
    checked against its trajectories. optax has no Rprop.

    Args:
        learning_rate: the initial step size, a number > 0. Defaults to 0.01 (torch's).
        weight_decay: coupled L2 strength, >= 0. Defaults to 0 (off, as torch).
        eta_minus: the shrink factor, in (0, 1). Defaults to 0.5.
        eta_plus: the growth factor, > 1. Defaults to 1.2.
        step_size_min: the smallest step size, >= 0. Defaults to 1e-6.
        step_size_max: the largest step size, >= ``step_size_min``. Defaults to 50.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).
    """

    State = RpropState
    _rule = staticmethod(_rules.rprop)
    _hyperparameters = ("eta_minus", "eta_plus", "step_size_min", "step_size_max")

    def __init__(
        self,
        learning_rate: float = 0.01,
        *,
        weight_decay: float = 0.0,
        eta_minus: float = 0.5,
        eta_plus: float = 1.2,
        step_size_min: float = 1e-6,
        step_size_max: float = 50.0,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.eta_minus = eta_minus
        self.eta_plus = eta_plus
        self.step_size_min = step_size_min
        self.step_size_max = step_size_max
        super().__init__(learning_rate, weight_decay, no_decay, nonfinite)

    def _validate_hyperparameters(self) -> None:
        if callable(self.learning_rate):
            raise TypeError(
                "Rprop's learning_rate is only its initial step size (it adapts its own "
                f"step sizes), so it must be a number, got the schedule {self.learning_rate!r}"
            )
        super()._validate_hyperparameters()
        eta_minus = check.positive(self.eta_minus, "eta_minus")
        if eta_minus >= 1.0:
            raise ValueError(f"eta_minus must be in (0, 1), got {eta_minus!r}")
        eta_plus = check.positive(self.eta_plus, "eta_plus")
        if eta_plus <= 1.0:
            raise ValueError(f"eta_plus must be > 1, got {eta_plus!r}")
        low = check.non_negative(self.step_size_min, "step_size_min")
        high = check.positive(self.step_size_max, "step_size_max")
        if low > high:
            raise ValueError(f"step_size_min must be <= step_size_max, got {low!r} > {high!r}")

    def _initial_state(
        self, params: Mapping[str, Array], buffers: dict[str, dict[str, Array]], xp: Namespace
    ) -> dict[str, dict[str, Array]]:
        size = float(self.learning_rate)
        buffers["step_sizes"] = {
            name: filled(a, size, xp) for name, a in buffers["step_sizes"].items()
        }
        return buffers

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        return {
            "eta_minus": float(self.eta_minus),
            "eta_plus": float(self.eta_plus),
            "step_size_min": float(self.step_size_min),
            "step_size_max": float(self.step_size_max),
        }


class Lion(PeerOptimizer):
    """Lion (evolved sign momentum): the sign of an interpolated momentum, decayed weights.

    Update rule:

    1. ``u = sign(beta1 * m + (1 - beta1) * g)``
    2. ``w = w - learning_rate * (u + weight_decay * w)`` (decoupled, on the old ``w``)
    3. ``m = beta2 * m + (1 - beta2) * g``

    Paper: Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023.
    Matches ``optax.lion`` (``b1``, ``b2``, ``weight_decay``), checked against its
    trajectories; torch.optim has no Lion. optax's ``weight_decay`` defaults to 1e-3;
    here decay is off by default (pass ``weight_decay=1e-3`` for optax's). optax has no
    default learning rate; 1e-4 here is the paper's suggestion (3 to 10 times smaller
    than AdamW's).

    Args:
        learning_rate: step size, or a schedule. Defaults to 1e-4.
        weight_decay: decoupled decay strength, >= 0. Defaults to 0 (off).
        beta1: interpolation factor of the update, in [0, 1). Defaults to 0.9.
        beta2: decay rate of the momentum, in [0, 1). Defaults to 0.99.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).

    Examples:
        >>> import numpy as np
        >>> import xpoptim
        >>> opt = xpoptim.Lion(learning_rate=0.1)
        >>> params = {"w": np.array([1.0, -1.0, 0.5])}
        >>> grads = {"w": np.array([3.0, -0.2, 0.0])}
        >>> params, state = opt.update(params, grads, opt.init(params))
        >>> params["w"]  # w - 0.1 * sign(g)
        array([ 0.9, -0.9,  0.5])
    """

    State = LionState
    _rule = staticmethod(_rules.lion)
    _hyperparameters = ("beta1", "beta2")
    _decay: ClassVar[str] = "decoupled"

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 1e-4,
        *,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        super().__init__(learning_rate, weight_decay, no_decay, nonfinite)

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.beta1, "beta1")
        check.unit_interval(self.beta2, "beta2")

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        return {
            "learning_rate": self._learning_rate(step),
            "beta1": float(self.beta1),
            "beta2": float(self.beta2),
        }
