"""Adam's variants: Adamax (infinity norm), NAdam (Nesterov momentum), RAdam (rectified)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

from .. import _rules
from .. import _validation as check
from .._compat import Array
from ._base import NOT_DECAYED
from ._peer import PeerOptimizer, StepSeries


class AdamaxState(NamedTuple):
    """State of `Adamax`.

    Attributes:
        step: number of updates applied so far.
        momentums: parameter name -> first moment ``m``.
        norms: parameter name -> exponentially weighted infinity norm ``u``.
        skipped: number of updates skipped by ``nonfinite="skip"``; ``None`` under the
            other policies.
    """

    step: Any
    momentums: dict[str, Array]
    norms: dict[str, Array]
    skipped: Any = None


class NAdamState(NamedTuple):
    """State of `NAdam` (the product of momentum coefficients is recomputed from ``step``).

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


class RAdamState(NamedTuple):
    """State of `RAdam`.

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


class _AdamLike(PeerOptimizer):
    """``beta1``, ``beta2``, ``epsilon`` and their checks, shared by Adam's variants."""

    _hyperparameters: ClassVar[tuple[str, ...]] = ("beta1", "beta2", "epsilon")

    def __init__(
        self,
        learning_rate: Any,
        weight_decay: float,
        beta1: float,
        beta2: float,
        epsilon: float,
        no_decay: Any,
        nonfinite: str,
    ) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        super().__init__(learning_rate, weight_decay, no_decay, nonfinite)

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.beta1, "beta1")
        check.unit_interval(self.beta2, "beta2")
        check.positive(self.epsilon, "epsilon")


class _DecoupledOption(_AdamLike):
    """torch.optim's ``decoupled_weight_decay`` (NAdam, RAdam): ``decoupled=True`` shrinks
    ``w`` by ``learning_rate * weight_decay * w`` before the step, instead of adding
    ``weight_decay * w`` to the gradient."""

    _extensions: ClassVar[dict[str, Any]] = {
        "decoupled": False,
        "no_decay": NOT_DECAYED,
        "nonfinite": "propagate",
    }
    decoupled: bool = False

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.flag(self.decoupled, "decoupled")

    def _decoupled(self) -> bool:
        return self.decoupled

    def _param_scalars(self, name: str) -> dict[str, Any]:
        wd = self._decay_of(name)
        return {
            "l2": 0.0 if self.decoupled else wd,
            "decoupled_decay": wd if self.decoupled else 0.0,
        }


class Adamax(_AdamLike):
    """Adamax: Adam with the infinity norm in place of the second moment.

    Update rule, with ``t`` the step count (from 1):

    1. ``g = g + weight_decay * w`` (coupled, as torch.optim)
    2. ``m = beta1 * m + (1 - beta1) * g``
    3. ``u = max(beta2 * u, |g| + epsilon)``
    4. ``w = w - learning_rate / (1 - beta1**t) * m / u``

    Paper: Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
    section 7.1. Matches ``torch.optim.Adamax`` (``lr``, ``betas``, ``eps``), checked
    against its trajectories; optax's ``adamax`` has the same formula and defaults
    (``b1``, ``b2``, ``eps``) and no default learning rate.

    Args:
        learning_rate: step size, or a schedule. Defaults to 0.002 (torch's).
        weight_decay: coupled L2 strength, >= 0. Defaults to 0 (off).
        beta1: decay rate of the first moment, in [0, 1). Defaults to 0.9.
        beta2: decay rate of the infinity norm, in [0, 1). Defaults to 0.999.
        epsilon: added to ``|g|`` inside the maximum, > 0. Defaults to 1e-8.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).
    """

    State = AdamaxState
    _rule = staticmethod(_rules.adamax)

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.002,
        *,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        super().__init__(learning_rate, weight_decay, beta1, beta2, epsilon, no_decay, nonfinite)

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        lr, b1 = self._learning_rate(step), float(self.beta1)
        return {
            "beta1": b1,
            "beta2": float(self.beta2),
            "epsilon": float(self.epsilon),
            "step_size": lr / (1.0 - b1**step),
        }


class NAdam(_DecoupledOption):
    """NAdam: Adam with Nesterov momentum and a momentum schedule.

    Update rule, with ``t`` the step count (from 1), ``psi = momentum_decay``,
    ``mu_t = beta1 * (1 - 0.5 * 0.96**(t * psi))`` and ``P_t = mu_1 * ... * mu_t``:

    1. ``g = g + weight_decay * w`` (or, with ``decoupled=True``,
       ``w = w * (1 - learning_rate * weight_decay)``)
    2. ``m = beta1 * m + (1 - beta1) * g``; ``v = beta2 * v + (1 - beta2) * g**2``
    3. ``d = sqrt(v / (1 - beta2**t)) + epsilon``
    4. ``w = w - learning_rate * (1 - mu_t) / (1 - P_t) * g / d
       - learning_rate * mu_{t+1} / (1 - P_t * mu_{t+1}) * m / d``

    Paper: Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop.
    Matches ``torch.optim.NAdam`` (``lr``, ``betas``, ``eps``, ``momentum_decay``,
    ``decoupled_weight_decay``), checked against its trajectories. ``P_t`` is a Python
    float computed from ``t`` (torch keeps it in the state); ``update`` therefore needs a
    concrete step count (not under ``jax.jit``). optax's ``nadam`` is Adam with
    Nesterov's look-ahead on ``m`` and no momentum schedule (``momentum_decay`` tends
    to it as ``psi`` grows: ``mu_t -> beta1``).

    Args:
        learning_rate: step size, or a schedule. Defaults to 0.002 (torch's).
        weight_decay: L2 strength, >= 0. Defaults to 0 (off).
        beta1: decay rate of the first moment, in [0, 1). Defaults to 0.9.
        beta2: decay rate of the second moment, in [0, 1). Defaults to 0.999.
        epsilon: added to the denominator, > 0. Defaults to 1e-8.
        momentum_decay: ``psi`` of the momentum schedule, >= 0. Defaults to 0.004.
        decoupled: decay the weights (AdamW-style, torch's ``decoupled_weight_decay``)
            instead of adding ``weight_decay * w`` to the gradient. Defaults to False.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).
    """

    State = NAdamState
    _rule = staticmethod(_rules.nadam)
    _hyperparameters = ("beta1", "beta2", "epsilon", "momentum_decay")

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.002,
        *,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        momentum_decay: float = 0.004,
        decoupled: bool = False,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.momentum_decay = momentum_decay
        self.decoupled = decoupled
        self._products = StepSeries()
        super().__init__(learning_rate, weight_decay, beta1, beta2, epsilon, no_decay, nonfinite)

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.non_negative(self.momentum_decay, "momentum_decay")

    def _mu(self, t: int) -> float:
        decay: float = 0.96 ** (t * float(self.momentum_decay))
        return float(self.beta1) * (1.0 - 0.5 * decay)

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        t = self._concrete(step, "its momentum-schedule product")
        lr, b2 = self._learning_rate(t), float(self.beta2)
        key = (float(self.beta1), float(self.momentum_decay))
        product = float(self._products.at(t, key, 1.0, lambda value, i: value * self._mu(i)))
        mu, mu_next = self._mu(t), self._mu(t + 1)
        return {
            "learning_rate": lr,
            "beta1": float(self.beta1),
            "beta2": b2,
            "epsilon": float(self.epsilon),
            "bias_correction2": 1.0 - b2**t,
            "gradient_step": lr * (1.0 - mu) / (1.0 - product),
            "momentum_step": lr * mu_next / (1.0 - product * mu_next),
        }


class RAdam(_DecoupledOption):
    """RAdam: Adam with the variance of its adaptive step rectified.

    Update rule, with ``t`` the step count (from 1), ``rho_inf = 2 / (1 - beta2) - 1``
    and ``rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)``:

    1. ``g = g + weight_decay * w`` (or, with ``decoupled=True``,
       ``w = w * (1 - learning_rate * weight_decay)``)
    2. ``m = beta1 * m + (1 - beta1) * g``; ``v = beta2 * v + (1 - beta2) * g**2``
    3. if ``rho_t > 5``: ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf /
       ((rho_inf - 4)(rho_inf - 2) rho_t))`` and
       ``w = w - learning_rate * r_t / (1 - beta1**t) * m * sqrt(1 - beta2**t) /
       (sqrt(v) + epsilon)``
    4. else: ``w = w - learning_rate / (1 - beta1**t) * m`` (SGD with momentum)

    Paper: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR
    2020. Matches ``torch.optim.RAdam`` (``lr``, ``betas``, ``eps``,
    ``decoupled_weight_decay``), checked against its trajectories. The branch on
    ``rho_t`` is taken in Python from the step count, so ``update`` needs a concrete
    step (not under ``jax.jit``). optax's ``radam`` adds ``epsilon`` to
    ``sqrt(v_hat)`` (the bias-corrected ``v``) instead of ``sqrt(v)``, and rectifies from
    ``rho_t >= 5`` (torch: ``> 5``); with ``epsilon`` far below ``sqrt(v)`` the two agree.

    Args:
        learning_rate: step size, or a schedule. Defaults to 0.001 (torch's).
        weight_decay: L2 strength, >= 0. Defaults to 0 (off).
        beta1: decay rate of the first moment, in [0, 1). Defaults to 0.9.
        beta2: decay rate of the second moment, in [0, 1). Defaults to 0.999.
        epsilon: added to ``sqrt(v)``, > 0. Defaults to 1e-8.
        decoupled: decay the weights (AdamW-style, torch's ``decoupled_weight_decay``)
            instead of adding ``weight_decay * w`` to the gradient. Defaults to False.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).
    """

    State = RAdamState
    _rule = staticmethod(_rules.radam)

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.001,
        *,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        decoupled: bool = False,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.decoupled = decoupled
        super().__init__(learning_rate, weight_decay, beta1, beta2, epsilon, no_decay, nonfinite)

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        t = self._concrete(step, "the branch on rho_t")
        lr, b1, b2 = self._learning_rate(t), float(self.beta1), float(self.beta2)
        bias_correction2 = 1.0 - b2**t
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        rho_t = rho_inf - 2.0 * t * b2**t / bias_correction2
        rectified = rho_t > 5.0
        step_size = lr / (1.0 - b1**t)
        if rectified:
            step_size *= math.sqrt(
                (rho_t - 4.0)
                * (rho_t - 2.0)
                * rho_inf
                / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
            )
        return {
            "learning_rate": lr,
            "beta1": b1,
            "beta2": b2,
            "epsilon": float(self.epsilon),
            "step_size": step_size,
            "rectified": rectified,
            "sqrt_bias_correction2": math.sqrt(bias_correction2),
        }
