"""Layer-wise trust ratios: `LAMB` and `LARS` (optax's ``lamb`` and ``lars``).

Each parameter's step is scaled by ``||w|| / ||update||``, two norms over the whole
parameter: the rules are not elementwise, so they run on whole arrays (the plain path,
as `xpoptim.explain` says) and `OutOfCore` refuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .. import _rules
from .. import _validation as check
from .._compat import Array
from ._base import NOT_DECAYED
from ._decoupled import DecoupledOnly


class LAMBState(NamedTuple):
    """State of `LAMB`.

    Attributes:
        step: number of updates applied so far.
        momentums: parameter name -> first moment ``m``.
        velocities: parameter name -> second moment ``v``.
        skipped: number of updates skipped by ``nonfinite="skip"``; ``None`` under the
            other policies.
    """

    step: Any
    momentums: dict[str, Array]
    velocities: dict[str, Array]
    skipped: Any = None


class LARSState(NamedTuple):
    """State of `LARS`.

    Attributes:
        step: number of updates applied so far.
        velocities: parameter name -> momentum buffer ``v``.
        skipped: number of updates skipped by ``nonfinite="skip"``; ``None`` under the
            other policies.
    """

    step: Any
    velocities: dict[str, Array]
    skipped: Any = None


class LAMB(DecoupledOnly):
    """LAMB: Adam's direction plus decoupled decay, scaled per parameter by a trust ratio.

    Update rule, with ``t`` the step count (from 1):

    1. ``m = beta1 * m + (1 - beta1) * g``; ``v = beta2 * v + (1 - beta2) * g**2``
    2. ``r = (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + epsilon) + weight_decay * w``
    3. ``ratio = ||w|| / ||r||`` (Euclidean norms over the whole parameter), or 1 when
       either norm is 0
    4. ``w = w - learning_rate * ratio * r``

    Paper: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes" (ICLR 2020). Peer: ``optax.lamb`` (torch.optim has no LAMB), matched to
    float64 rounding with the same defaults. Differences: optax decays every parameter
    unless given a ``mask``; xpoptim skips the names ``no_decay`` selects (pass
    ``no_decay=()`` for optax's behaviour); optax's ``eps_root`` is not offered (0).
    optax has no default learning rate; xpoptim's is 0.001.

    Not elementwise (two norms per parameter): it runs on whole arrays, and `OutOfCore`
    refuses it.

    Args:
        learning_rate: step size, or a schedule (see [schedules][xpoptim.schedules]).
            Defaults to 0.001.
        weight_decay: decoupled decay strength, >= 0, added to ``r`` before the trust
            ratio. Defaults to 0 (off).
        beta1: decay rate of the first moment, in [0, 1). Defaults to 0.9.
        beta2: decay rate of the second moment, in [0, 1). Defaults to 0.999.
        epsilon: added to ``sqrt(v_hat)``, > 0. Defaults to 1e-6 (optax's).
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).

    Examples:
        >>> import numpy as np
        >>> import xpoptim
        >>> opt = xpoptim.LAMB(learning_rate=0.1)
        >>> params = {"w": np.array([3.0, 4.0])}
        >>> params, state = opt.update(params, {"w": np.array([1.0, 1.0])}, opt.init(params))
        >>> np.round(params["w"], 6)  # r = (1, 1) up to epsilon, ratio = 5 / sqrt(2)
        array([2.646447, 3.646447])
    """

    State = LAMBState
    _rule = staticmethod(_rules.lamb)
    _hyperparameters = ("beta1", "beta2", "epsilon")

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.001,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-6,
        *,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        self.no_decay = no_decay
        self.nonfinite = nonfinite
        super().__init__(learning_rate, None, weight_decay)  # type: ignore[arg-type]

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.beta1, "beta1")
        check.unit_interval(self.beta2, "beta2")
        check.positive(self.epsilon, "epsilon")

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        b1, b2 = float(self.beta1), float(self.beta2)
        return {
            "learning_rate": self._learning_rate(step),
            "beta1": b1,
            "beta2": b2,
            "epsilon": float(self.epsilon),
            "bias_correction1": 1.0 - b1**step,
            "bias_correction2": 1.0 - b2**step,
        }

    def _param_scalars(self, name: str) -> dict[str, Any]:
        return {"weight_decay": self._decay(name)}


class LARS(DecoupledOnly):
    """LARS: SGD with momentum whose step is scaled per parameter by a trust ratio.

    Update rule:

    1. ``r = g + weight_decay * w``
    2. ``ratio = trust_coefficient * ||w|| / (||r|| + epsilon)`` (Euclidean norms over
       the whole parameter), or 1 when either norm is 0
    3. ``u = -learning_rate * ratio * r``; ``v = momentum * v + u``
    4. ``w = w + v`` (``nesterov=True``: ``w = w + momentum * v + u``)

    Paper: You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks"
    (2017). Peer: ``optax.lars`` (torch.optim has no LARS), matched to float64 rounding
    with the same defaults. Differences: optax decays and scales every parameter unless
    given masks; xpoptim skips the decay for the names ``no_decay`` selects (pass
    ``no_decay=()`` for optax's behaviour) and scales every parameter. optax has no
    default learning rate; xpoptim's is 1.0 (the trust coefficient already makes the
    step ``0.001 * ||w||``-sized).

    Not elementwise (two norms per parameter): it runs on whole arrays, and `OutOfCore`
    refuses it.

    Args:
        learning_rate: step size, or a schedule (see [schedules][xpoptim.schedules]).
            Defaults to 1.0.
        weight_decay: decay strength, >= 0, added to the gradient before the trust
            ratio. Defaults to 0 (off).
        momentum: momentum factor in [0, 1). Defaults to 0.9.
        trust_coefficient: the trust ratio's factor, > 0. Defaults to 0.001.
        epsilon: added to ``||r||``, >= 0. Defaults to 0.
        nesterov: use Nesterov momentum. Defaults to False.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).
    """

    State = LARSState
    _rule = staticmethod(_rules.lars)
    _hyperparameters = ("momentum", "trust_coefficient", "epsilon", "nesterov")

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 1.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        epsilon: float = 0.0,
        *,
        nesterov: bool = False,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.momentum = momentum
        self.trust_coefficient = trust_coefficient
        self.epsilon = epsilon
        self.nesterov = nesterov
        self.no_decay = no_decay
        self.nonfinite = nonfinite
        super().__init__(learning_rate, None, weight_decay)  # type: ignore[arg-type]

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.momentum, "momentum")
        check.positive(self.trust_coefficient, "trust_coefficient")
        check.non_negative(self.epsilon, "epsilon")
        check.flag(self.nesterov, "nesterov")

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        return {
            "learning_rate": self._learning_rate(step),
            "momentum": float(self.momentum),
            "trust_coefficient": float(self.trust_coefficient),
            "epsilon": float(self.epsilon),
            "nesterov": self.nesterov,
        }

    def _param_scalars(self, name: str) -> dict[str, Any]:
        return {"weight_decay": self._decay(name)}
