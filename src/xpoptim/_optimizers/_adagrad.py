"""Adagrad and Adadelta: per-element step sizes from accumulated squared gradients."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .. import _rules
from .. import _validation as check
from .._compat import Array, Namespace
from ._base import NOT_DECAYED, filled
from ._peer import PeerOptimizer


class AdagradState(NamedTuple):
    """State of `Adagrad`.

    Attributes:
        step: number of updates applied so far.
        accumulators: parameter name -> sum of the squared gradients (plus
            ``initial_accumulator_value``).
        skipped: number of updates skipped by ``nonfinite="skip"``; ``None`` under the
            other policies.
    """

    step: Any
    accumulators: dict[str, Array]
    skipped: Any = None


class AdadeltaState(NamedTuple):
    """State of `Adadelta`.

    Attributes:
        step: number of updates applied so far.
        square_avg: parameter name -> running average of the squared gradient.
        delta_avg: parameter name -> running average of the squared update.
        skipped: number of updates skipped by ``nonfinite="skip"``; ``None`` under the
            other policies.
    """

    step: Any
    square_avg: dict[str, Array]
    delta_avg: dict[str, Array]
    skipped: Any = None


class Adagrad(PeerOptimizer):
    """Adagrad: each element's step shrinks with the sum of its squared gradients.

    Update rule, with ``t`` the step count (from 1):

    1. ``g = g + weight_decay * w`` (coupled, as torch.optim)
    2. ``s = s + g**2`` (``s`` starts at ``initial_accumulator_value``)
    3. ``lr_t = learning_rate / (1 + (t - 1) * learning_rate_decay)``
    4. ``w = w - lr_t * g / (sqrt(s) + epsilon)``

    Paper: Duchi, Hazan and Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011. Matches ``torch.optim.Adagrad`` (names: ``lr``,
    ``lr_decay``, ``eps``), checked against its trajectories. optax's ``adagrad``
    differs: ``initial_accumulator_value=0.1``, ``eps=1e-7`` inside the square root
    (``g / sqrt(s + eps)``) and no ``lr_decay``; for its starting point pass
    ``initial_accumulator_value=0.1``.

    Args:
        learning_rate: step size, or a schedule (see [schedules][xpoptim.schedules]).
            Defaults to 0.01 (torch's).
        weight_decay: coupled L2 strength, >= 0. Defaults to 0 (off).
        learning_rate_decay: ``lr_decay`` of torch, >= 0. Defaults to 0.
        initial_accumulator_value: the starting value of ``s``, >= 0. Defaults to 0.
        epsilon: added to ``sqrt(s)``, > 0. Defaults to 1e-10.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).

    Examples:
        >>> import numpy as np
        >>> import xpoptim
        >>> opt = xpoptim.Adagrad(learning_rate=0.5)
        >>> params = {"w": np.array([1.0, -1.0])}
        >>> params, state = opt.update(params, {"w": np.array([2.0, -4.0])}, opt.init(params))
        >>> params["w"]  # w - 0.5 * g / |g|
        array([ 0.5, -0.5])
    """

    State = AdagradState
    _rule = staticmethod(_rules.adagrad)
    _hyperparameters = ("learning_rate_decay", "initial_accumulator_value", "epsilon")

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.01,
        *,
        weight_decay: float = 0.0,
        learning_rate_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        epsilon: float = 1e-10,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.learning_rate_decay = learning_rate_decay
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon
        super().__init__(learning_rate, weight_decay, no_decay, nonfinite)

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.non_negative(self.learning_rate_decay, "learning_rate_decay")
        check.non_negative(self.initial_accumulator_value, "initial_accumulator_value")
        check.positive(self.epsilon, "epsilon")

    def _initial_state(
        self, params: Mapping[str, Array], buffers: dict[str, dict[str, Array]], xp: Namespace
    ) -> dict[str, dict[str, Array]]:
        value = float(self.initial_accumulator_value)
        if value:
            buffers["accumulators"] = {
                name: filled(a, value, xp) for name, a in buffers["accumulators"].items()
            }
        return buffers

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        lr = self._learning_rate(step)
        return {
            "learning_rate": lr / (1.0 + (step - 1) * float(self.learning_rate_decay)),
            "epsilon": float(self.epsilon),
        }


class Adadelta(PeerOptimizer):
    """Adadelta: steps sized by the ratio of running RMS of updates and of gradients.

    Update rule (``rho`` is ``decay_rate``):

    1. ``g = g + weight_decay * w`` (coupled, as torch.optim)
    2. ``a = rho * a + (1 - rho) * g**2``
    3. ``d = sqrt(b + epsilon) / sqrt(a + epsilon) * g``
    4. ``b = rho * b + (1 - rho) * d**2``
    5. ``w = w - learning_rate * d``

    Paper: Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012
    (which has no learning rate: ``learning_rate=1``). Matches ``torch.optim.Adadelta``
    (names: ``lr``, ``rho``, ``eps``), checked against its trajectories. optax's
    ``adadelta`` has the same formula with ``rho=0.9``, ``eps=1e-6`` and no default
    learning rate.

    Args:
        learning_rate: scale of the step, or a schedule. Defaults to 1.0 (torch's).
        weight_decay: coupled L2 strength, >= 0. Defaults to 0 (off).
        decay_rate: ``rho``, the discounting factor of both averages, in [0, 1).
            Defaults to 0.9.
        epsilon: added inside both square roots, > 0. Defaults to 1e-6.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).
    """

    State = AdadeltaState
    _rule = staticmethod(_rules.adadelta)
    _hyperparameters = ("decay_rate", "epsilon")

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 1.0,
        *,
        weight_decay: float = 0.0,
        decay_rate: float = 0.9,
        epsilon: float = 1e-6,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.decay_rate = decay_rate
        self.epsilon = epsilon
        super().__init__(learning_rate, weight_decay, no_decay, nonfinite)

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.decay_rate, "decay_rate")
        check.positive(self.epsilon, "epsilon")

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        return {
            "learning_rate": self._learning_rate(step),
            "decay_rate": float(self.decay_rate),
            "epsilon": float(self.epsilon),
        }
