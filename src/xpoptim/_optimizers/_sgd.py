"""SGD with (heavy-ball or Nesterov) momentum, the seed's first optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

from .. import _rules
from .. import _validation as check
from .._compat import Array
from ._base import NOT_DECAYED, Optimizer


class SGDState(NamedTuple):
    """State of `SGD`.

    Attributes:
        step: number of updates applied so far (a Python int; a traced integer under
            ``jax.jit``).
        velocities: parameter name -> velocity ``v``.
        skipped: number of updates skipped by ``nonfinite="skip"`` (not in ``step``);
            ``None`` under the other policies, which count nothing.
    """

    step: Any
    velocities: dict[str, Array]
    skipped: Any = None


class SGD(Optimizer):
    """Stochastic Gradient Descent with momentum.

    Update rule (``R`` is the regularization term added to the gradient):

    1. ``g = g + R(w)``, with ``R(w) = weight_decay * w`` (L2) or
       ``weight_decay * sign(w)`` (L1)
    2. ``v = momentum * v - learning_rate * g``
    3. ``w = w + v``

    With ``nesterov=True``, step 3 is ``w = w + momentum * v - learning_rate * g`` (the
    look-ahead step).

    Args:
        learning_rate: step size, or a schedule (see [schedules][xpoptim.schedules]).
            Defaults to 0.01.
        regularization: ``"L1"``, ``"L2"`` or ``None``. Defaults to ``"L2"``.
        weight_decay: regularization strength. Defaults to 0.001.
        momentum: momentum factor in [0, 1). Defaults to 0.1.
        nesterov: use Nesterov momentum (needs ``momentum > 0``). Defaults to False.
        no_decay: names that are not regularized: patterns or a predicate. Defaults to
            the seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).

    Examples:
        >>> import numpy as np
        >>> import xpoptim
        >>> opt = xpoptim.SGD(learning_rate=0.1, momentum=0.9, regularization=None)
        >>> params = {"w": np.array([1.0, -2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.update(params, {"w": np.array([0.5, 0.5])}, state)
        >>> params["w"]
        array([ 0.95, -2.05])
    """

    State = SGDState
    _rule = staticmethod(_rules.sgd)
    _hyperparameters = ("momentum",)
    _extensions: ClassVar[dict[str, Any]] = {
        "nesterov": False,
        "no_decay": NOT_DECAYED,
        "nonfinite": "propagate",
    }

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.01,
        regularization: str | None = "L2",
        weight_decay: float = 0.001,
        momentum: float = 0.1,
        *,
        nesterov: bool = False,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.momentum = momentum
        self.nesterov = nesterov
        self.no_decay = no_decay
        self.nonfinite = nonfinite
        super().__init__(learning_rate, regularization, weight_decay)  # type: ignore[arg-type]

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.momentum, "momentum")
        check.flag(self.nesterov, "nesterov")
        if self.nesterov and not self.momentum:
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0")

    def _rule_function(self) -> Callable[..., tuple[Array, ...]]:
        return _rules.sgd_nesterov if self.nesterov else _rules.sgd

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        return {"learning_rate": self._learning_rate(step), "momentum": float(self.momentum)}
