"""Schedule-free AdamW: no learning-rate schedule to tune, an average to evaluate at."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

from .. import _rules
from .. import _validation as check
from .._compat import Array, Namespace
from ._base import NOT_DECAYED, filled
from ._peer import PeerOptimizer, StepSeries, in_open_unit_interval


class ScheduleFreeAdamWState(NamedTuple):
    """State of `ScheduleFreeAdamW` (the averaging weights are recomputed from ``step``).

    Attributes:
        step: number of updates applied so far.
        z: parameter name -> the base sequence ``z`` that Adam's steps move (starts at
            the parameters).
        velocities: parameter name -> second moment ``v``.
        skipped: number of updates skipped by ``nonfinite="skip"``; ``None`` under the
            other policies.
    """

    step: Any
    z: dict[str, Array]
    velocities: dict[str, Array]
    skipped: Any = None


class ScheduleFreeAdamW(PeerOptimizer):
    """Schedule-free AdamW: Adam's step on ``z``, averaged into ``x``, gradients at ``y``.

    The parameters the optimizer updates (and where gradients are taken) are ``y``;
    evaluate the model at the average ``x`` = `average` ``(params, state)``. Update
    rule, with ``t`` the step count (from 1), ``lr_i`` the learning rate of update
    ``i``, ``w_i = max(lr_1, ..., lr_i)**weight_lr_power`` and
    ``c_t = w_t / (w_1 + ... + w_t)`` (0 while that sum is 0):

    1. ``v = beta2 * v + (1 - beta2) * g**2``
    2. ``u = g / (sqrt(v / (1 - beta2**t)) + epsilon) + weight_decay * y`` (decoupled
       decay, at ``y``)
    3. ``x = (y - (1 - beta1) * z) / beta1`` (the average so far)
    4. ``z = z - learning_rate * u``
    5. ``x = (1 - c_t) * x + c_t * z``
    6. ``y = beta1 * x + (1 - beta1) * z``

    ``z`` starts at the parameters. Paper: Defazio et al., "The Road Less Scheduled",
    NeurIPS 2024. Matches ``optax.contrib.schedule_free_adamw`` (``b1``, ``b2``,
    ``eps``, ``weight_decay``, ``weight_lr_power``; its defaults), checked against its
    trajectories; torch.optim has none (the authors' ``schedulefree`` package for
    PyTorch stores ``y`` and ``z`` the same way). Differences from optax: a schedule
    gives ``lr_i`` = its value after ``i - 1`` updates everywhere, where optax's
    averaging weights read it one count later (``schedule(i)``); optax's
    ``warmup_steps=k`` is ``learning_rate=`` a linear warmup from 0 over ``k`` updates
    here. ``c_t`` is a Python float computed from ``t``, so ``update`` needs a concrete
    step count (not under ``jax.jit``).

    Args:
        learning_rate: step size, or a schedule (a warmup, then constant: no decay is
            needed). Defaults to 0.0025 (optax's).
        weight_decay: decoupled decay strength, >= 0. Defaults to 0 (off).
        beta1: interpolation between ``x`` and ``z``, in (0, 1). Defaults to 0.9.
        beta2: decay rate of the second moment, in [0, 1). Defaults to 0.999.
        epsilon: added to the denominator, > 0. Defaults to 1e-8.
        weight_lr_power: the power of the learning rate in the averaging weights, >= 0.
            Defaults to 2.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).

    Examples:
        >>> import numpy as np
        >>> import xpoptim
        >>> opt = xpoptim.ScheduleFreeAdamW(learning_rate=0.1)
        >>> params = {"w": np.array([1.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.update(params, {"w": np.array([2.0])}, state)
        >>> params["w"], opt.average(params, state)["w"]  # first step: x = z = y
        (array([0.9]), array([0.9]))
    """

    State = ScheduleFreeAdamWState
    _rule = staticmethod(_rules.schedule_free_adamw)
    _hyperparameters = ("beta1", "beta2", "epsilon", "weight_lr_power")
    _decay: ClassVar[str] = "decoupled"

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.0025,
        *,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        weight_lr_power: float = 2.0,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        self.weight_lr_power = weight_lr_power
        self._weights = StepSeries()
        super().__init__(learning_rate, weight_decay, no_decay, nonfinite)

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        in_open_unit_interval(check.positive(self.beta1, "beta1"), "beta1")
        check.unit_interval(self.beta2, "beta2")
        check.positive(self.epsilon, "epsilon")
        check.non_negative(self.weight_lr_power, "weight_lr_power")

    def _initial_state(
        self, params: Mapping[str, Array], buffers: dict[str, dict[str, Array]], xp: Namespace
    ) -> dict[str, dict[str, Array]]:
        buffers["z"] = {name: filled(a, params[name], xp) for name, a in buffers["z"].items()}
        return buffers

    def _average_weight(self, t: int) -> float:
        """``c_t``: the weight of the new ``z`` in the average after update ``t``."""
        power = float(self.weight_lr_power)

        def add(value: tuple[float, float, float], i: int) -> tuple[float, float, float]:
            top, total, _ = value
            top = max(top, float(self._learning_rate(i)))
            weight = top**power
            total += weight
            return top, total, weight / total if total > 0.0 else 0.0

        key = (self.learning_rate, power)
        return float(self._weights.at(t, key, (0.0, 0.0, 0.0), add)[2])

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        t = self._concrete(step, "its averaging weights")
        b2 = float(self.beta2)
        return {
            "learning_rate": self._learning_rate(t),
            "beta1": float(self.beta1),
            "beta2": b2,
            "epsilon": float(self.epsilon),
            "bias_correction2": 1.0 - b2**t,
            "average_weight": self._average_weight(t),
        }

    def average(self, params: Mapping[str, Array], state: Any = None) -> dict[str, Array]:
        """The averaged parameters ``x = (y - (1 - beta1) * z) / beta1``, to evaluate at.

        Args:
            params: the parameters ``y`` (as `update` returned them, or the arrays
                ``step(layers)`` updated), by name.
            state: their state; by default the state kept by `step`.

        Returns:
            New arrays, by name (optax.contrib.schedule_free_eval_params).
        """
        if state is None:
            if self._state is None:
                raise ValueError(
                    "ScheduleFreeAdamW.average() has no state: pass the state of update(), "
                    "or run step(layers) first"
                )
            state = self._state
        xp = check.params(params)
        self._check_state(state, params, xp)
        beta1 = float(self.beta1)
        return {
            name: _rules.schedule_free_average(y, state.z[name], beta1=beta1, xp=xp)
            for name, y in params.items()
        }
