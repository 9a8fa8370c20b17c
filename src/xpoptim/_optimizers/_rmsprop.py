"""RMSprop, with torch.optim's centered and momentum options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

from .. import _rules
from .. import _validation as check
from .._compat import Array
from ._base import NOT_DECAYED, Optimizer


class RMSpropState(NamedTuple):
    """State of `RMSprop`.

    Attributes:
        step: number of updates applied so far.
        cache: parameter name -> running average of the squared gradient.
        mean_grad: parameter name -> running average of the gradient (``centered=True``
            only, else ``None``).
        momentum_buffer: parameter name -> momentum buffer (``momentum > 0`` only, else
            ``None``).
        skipped: number of updates skipped by ``nonfinite="skip"`` (not in ``step``);
            ``None`` under the other policies, which count nothing.
    """

    step: Any
    cache: dict[str, Array]
    mean_grad: dict[str, Array] | None = None
    momentum_buffer: dict[str, Array] | None = None
    skipped: Any = None


class RMSprop(Optimizer):
    """RMSprop: the gradient divided by a running root mean square of its recent values.

    Update rule:

    1. ``g = g + R(w)`` (as in `SGD`)
    2. ``cache = decay_rate * cache + (1 - decay_rate) * g**2``
    3. ``w = w - learning_rate * g / (sqrt(cache) + epsilon)``

    With ``centered=True`` (torch.optim's option) the denominator is
    ``sqrt(cache - mean_grad**2) + epsilon``, where
    ``mean_grad = decay_rate * mean_grad + (1 - decay_rate) * g``. With ``momentum > 0``
    step 3 becomes ``b = momentum * b + g / denominator``; ``w = w - learning_rate * b``.

    Args:
        learning_rate: step size, or a schedule (see [schedules][xpoptim.schedules]).
            Defaults to 0.001.
        regularization: ``"L1"``, ``"L2"`` or ``None``. Defaults to ``"L2"``.
        weight_decay: regularization strength. Defaults to 0.001.
        decay_rate: discounting factor in [0, 1). Defaults to 0.9.
        epsilon: added to the denominator, > 0. Defaults to 1e-8.
        centered: normalize by the estimated variance of the gradient. Defaults to False.
        momentum: momentum factor in [0, 1). Defaults to 0.
        no_decay: names that are not regularized: patterns or a predicate. Defaults to
            the seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).
    """

    State = RMSpropState
    _rule = staticmethod(_rules.rmsprop)
    _hyperparameters = ("decay_rate", "epsilon")
    _extensions: ClassVar[dict[str, Any]] = {
        "centered": False,
        "momentum": 0.0,
        "no_decay": NOT_DECAYED,
        "nonfinite": "propagate",
    }

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.001,
        regularization: str | None = "L2",
        weight_decay: float = 0.001,
        decay_rate: float = 0.9,
        epsilon: float = 1e-8,
        *,
        centered: bool = False,
        momentum: float = 0.0,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.decay_rate = decay_rate
        self.epsilon = epsilon
        self.centered = centered
        self.momentum = momentum
        self.no_decay = no_decay
        self.nonfinite = nonfinite
        super().__init__(learning_rate, regularization, weight_decay)  # type: ignore[arg-type]

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.decay_rate, "decay_rate")
        check.positive(self.epsilon, "epsilon")
        check.flag(self.centered, "centered")
        check.unit_interval(self.momentum, "momentum")

    def _buffer_fields(self) -> tuple[str, ...]:
        fields: tuple[str, ...] = ("cache",)
        if self.centered:
            fields += ("mean_grad",)
        if self.momentum:
            fields += ("momentum_buffer",)
        return fields

    def _rule_function(self) -> Callable[..., tuple[Array, ...]]:
        if self.centered or self.momentum:
            return _rules.rmsprop_extended
        return _rules.rmsprop

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        scalars = {
            "learning_rate": self._learning_rate(step),
            "decay_rate": float(self.decay_rate),
            "epsilon": float(self.epsilon),
        }
        if self.centered or self.momentum:
            scalars.update(centered=self.centered, momentum=float(self.momentum))
        return scalars
