"""Learning-rate schedules: a learning rate that depends on the step count.

An optimizer's ``learning_rate`` may be a number or a *schedule*: any callable
``schedule(count) -> learning rate``, where ``count`` is the number of updates already
applied (0 for the first update, as in optax). The built-in schedules below are written
with arithmetic that works the same on a Python ``int`` and on a traced integer array
(under ``jax.jit``): ``//``, ``**``, ``abs`` and, for the cosine, the namespace of the
count itself. No Python branch ever looks at the value of ``count``, so a schedule does
not force a recompilation or a Dask compute.

With a Python ``int`` count (every backend outside ``jax.jit``), a built-in schedule
returns a Python ``float``, so float32 parameters stay float32; under ``jax.jit`` it
returns a weakly typed scalar, which does not promote float32 either.

Built-in schedules serialize to a plain dict ([`Schedule.get_config`][]), which is how
an optimizer's ``get_config`` stores them; [`deserialize`][] rebuilds them.

Examples:
    >>> from xpoptim.schedules import WarmupCosineDecay
    >>> schedule = WarmupCosineDecay(0.0, 1.0, warmup_steps=2, decay_steps=6)
    >>> [round(schedule(count), 3) for count in range(7)]
    [0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from . import _validation as check
from ._compat import array_namespace

#: A learning rate: a number, or a callable of the number of updates already applied.
LearningRate = float | Callable[[Any], Any]

__all__ = [
    "Constant",
    "ExponentialDecay",
    "LearningRate",
    "ReduceOnPlateau",
    "Schedule",
    "StepDecay",
    "WarmupCosineDecay",
    "deserialize",
    "learning_rate_at",
    "serialize",
]


def _min(a: Any, b: Any) -> Any:
    """``min(a, b)`` for Python numbers and arrays alike, without a Python branch."""
    return (a + b - abs(a - b)) / 2


def _max0(a: Any) -> Any:
    """``max(a, 0)`` for Python numbers and arrays alike, without a Python branch."""
    return (a + abs(a)) / 2


def _cos(x: Any) -> Any:
    if isinstance(x, numbers.Real):
        return math.cos(x)
    return array_namespace(x).cos(x)


class Schedule:
    """Base class of the built-in schedules.

    A schedule is called with ``count``, the number of updates already applied, and
    returns the learning rate of the next update. Subclasses list their constructor
    arguments in ``_args``; [`get_config`][Schedule.get_config] and [`deserialize`][] use them.
    """

    _args: ClassVar[tuple[str, ...]] = ()

    def __call__(self, count: Any) -> Any:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, with ``"schedule"`` naming the class."""
        return {"schedule": type(self).__name__, **{k: getattr(self, k) for k in self._args}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._args)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule) or type(other) is not type(self):
            return NotImplemented
        return self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.get_config().items())))


class Constant(Schedule):
    """The same learning rate at every step: ``lr(count) = value``.

    Args:
        value: the learning rate, > 0.
    """

    _args = ("value",)

    def __init__(self, value: float) -> None:
        self.value = check.positive(value, "value")

    def __call__(self, count: Any) -> Any:
        return self.value


class StepDecay(Schedule):
    """Multiply by ``gamma`` every ``step_size`` updates (torch's ``StepLR``).

    ``lr(count) = init_value * gamma ** (count // step_size)``

    Args:
        init_value: the learning rate of the first ``step_size`` updates, > 0.
        step_size: number of updates between two decays, an integer >= 1.
        gamma: the factor, in (0, 1]. Defaults to 0.1.
    """

    _args = ("init_value", "step_size", "gamma")

    def __init__(self, init_value: float, step_size: int, gamma: float = 0.1) -> None:
        self.init_value = check.positive(init_value, "init_value")
        self.step_size = check.positive_integer(step_size, "step_size")
        self.gamma = check.positive(gamma, "gamma")
        if self.gamma > 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")

    def __call__(self, count: Any) -> Any:
        return self.init_value * self.gamma ** (count // self.step_size)


class ExponentialDecay(Schedule):
    """Exponential decay (optax's ``exponential_decay``, Keras's ``ExponentialDecay``).

    ``lr(count) = init_value * decay_rate ** (count / transition_steps)``, with
    ``count // transition_steps`` instead when ``staircase``.

    Args:
        init_value: the learning rate at count 0, > 0.
        transition_steps: number of updates over which the rate is multiplied by
            ``decay_rate``, an integer >= 1.
        decay_rate: the factor per ``transition_steps``, > 0.
        staircase: decay in discrete steps. Defaults to False.
    """

    _args = ("init_value", "transition_steps", "decay_rate", "staircase")

    def __init__(
        self,
        init_value: float,
        transition_steps: int,
        decay_rate: float,
        staircase: bool = False,
    ) -> None:
        self.init_value = check.positive(init_value, "init_value")
        self.transition_steps = check.positive_integer(transition_steps, "transition_steps")
        self.decay_rate = check.positive(decay_rate, "decay_rate")
        if not isinstance(staircase, bool):
            raise TypeError(f"staircase must be a bool, got {staircase!r}")
        self.staircase = staircase

    def __call__(self, count: Any) -> Any:
        if self.staircase:
            exponent = count // self.transition_steps
        else:
            exponent = count / self.transition_steps
        return self.init_value * self.decay_rate**exponent


class WarmupCosineDecay(Schedule):
    """Linear warmup, then cosine decay (optax's ``warmup_cosine_decay_schedule``).

    With ``W = warmup_steps`` and ``T = decay_steps - warmup_steps``:

    * ``count < W``: ``lr = init_value + (peak_value - init_value) * count / W``;
    * after: ``lr = end_value + (peak_value - end_value) * (1 + cos(pi * c / T)) / 2``
      with ``c = min(count - W, T)``, so ``lr = end_value`` from ``count = decay_steps`` on.

    Written without a branch on ``count``: the two phases are added, each being
    ``peak_value`` outside its own range.

    Args:
        init_value: the learning rate at count 0, >= 0.
        peak_value: the learning rate at the end of the warmup, > 0.
        warmup_steps: length of the warmup, an integer >= 0.
        decay_steps: total length of warmup plus decay, an integer > ``warmup_steps``.
        end_value: the final learning rate, >= 0. Defaults to 0.
    """

    _args = ("init_value", "peak_value", "warmup_steps", "decay_steps", "end_value")

    def __init__(
        self,
        init_value: float,
        peak_value: float,
        warmup_steps: int,
        decay_steps: int,
        end_value: float = 0.0,
    ) -> None:
        self.init_value = check.non_negative(init_value, "init_value")
        self.peak_value = check.positive(peak_value, "peak_value")
        self.warmup_steps = check.non_negative_integer(warmup_steps, "warmup_steps")
        self.decay_steps = check.positive_integer(decay_steps, "decay_steps")
        if self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"decay_steps ({self.decay_steps}) must be > warmup_steps ({self.warmup_steps})"
            )
        self.end_value = check.non_negative(end_value, "end_value")

    def __call__(self, count: Any) -> Any:
        warmup, span = self.warmup_steps, self.decay_steps - self.warmup_steps
        peak = self.peak_value
        # Warmup phase: the fraction is 1 (so the value is peak) once count >= warmup.
        fraction = _min(count, warmup) / warmup if warmup else 1.0
        warm = self.init_value + (peak - self.init_value) * fraction
        # Decay phase: c is 0 (so the value is peak) while count <= warmup.
        c = _min(_max0(count - warmup), span)
        cosine = self.end_value + (peak - self.end_value) * 0.5 * (1.0 + _cos(math.pi * c / span))
        return warm + (cosine - peak)


class ReduceOnPlateau(Schedule):
    """Divide the learning rate when a metric stops improving (torch's ``ReduceLROnPlateau``).

    Call [`observe`][ReduceOnPlateau.observe] with the metric (say, the validation loss
    once per epoch); the schedule then returns the current learning rate for every count.
    After more than ``patience`` observations without improvement, the rate is multiplied
    by ``factor`` (not below ``min_value``) and ``cooldown`` observations are ignored.

    An improvement is ``metric < best * (1 - threshold)`` for ``mode="min"``,
    ``metric > best * (1 + threshold)`` for ``mode="max"`` (torch's relative threshold).

    The metric is read with ``float(metric)``: a Dask scalar is computed there, and under
    ``jax.jit`` the rate is a constant of the trace, so call
    [`observe`][ReduceOnPlateau.observe] outside the jitted function and re-jit (or pass
    the rate as an argument) when it changes.

    Args:
        init_value: the starting learning rate, > 0.
        factor: the multiplier on a plateau, in (0, 1). Defaults to 0.1.
        patience: observations without improvement that are tolerated, >= 0.
            Defaults to 10.
        mode: ``"min"`` or ``"max"``. Defaults to ``"min"``.
        threshold: relative improvement that counts, >= 0. Defaults to 1e-4.
        cooldown: observations ignored after a reduction, >= 0. Defaults to 0.
        min_value: the rate is never reduced below this, >= 0. Defaults to 0.
    """

    _args = ("init_value", "factor", "patience", "mode", "threshold", "cooldown", "min_value")

    def __init__(
        self,
        init_value: float,
        factor: float = 0.1,
        patience: int = 10,
        mode: str = "min",
        threshold: float = 1e-4,
        cooldown: int = 0,
        min_value: float = 0.0,
    ) -> None:
        self.init_value = check.positive(init_value, "init_value")
        self.factor = check.positive(factor, "factor")
        if self.factor >= 1.0:
            raise ValueError(f"factor must be in (0, 1), got {self.factor!r}")
        self.patience = check.non_negative_integer(patience, "patience")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        self.threshold = check.non_negative(threshold, "threshold")
        self.cooldown = check.non_negative_integer(cooldown, "cooldown")
        self.min_value = check.non_negative(min_value, "min_value")
        self.value = self.init_value
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_observations = 0
        self.cooldown_left = 0

    def observe(self, metric: Any) -> float:
        """Record one value of the metric; return the learning rate from now on.

        Raises:
            ValueError: the metric is not a finite number (nothing is recorded).
        """
        value = float(metric)
        if not math.isfinite(value):
            raise ValueError(f"metric must be finite, got {value!r}")
        if self.mode == "min":
            improved = value < self.best * (1.0 - self.threshold)
        else:
            improved = value > self.best * (1.0 + self.threshold)
        if improved:
            self.best, self.bad_observations = value, 0
        else:
            self.bad_observations += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_observations = 0
        if self.bad_observations > self.patience:
            self.value = max(self.value * self.factor, self.min_value)
            self.cooldown_left = self.cooldown
            self.bad_observations = 0
        return self.value

    def __call__(self, count: Any) -> Any:
        return self.value


BUILT_IN: dict[str, type[Schedule]] = {
    cls.__name__: cls
    for cls in (Constant, StepDecay, ExponentialDecay, WarmupCosineDecay, ReduceOnPlateau)
}


def serialize(learning_rate: Any) -> Any:
    """A learning rate as a ``get_config`` value: numbers and non-built-in callables as
    they are, built-in schedules as their config dict."""
    if isinstance(learning_rate, Schedule):
        return learning_rate.get_config()
    return learning_rate


def deserialize(value: Any) -> Any:
    """The inverse of [`serialize`][]: a schedule config dict becomes the schedule.

    Raises:
        ValueError: the dict names no built-in schedule.
    """
    if isinstance(value, Mapping):
        config = dict(value)
        name = config.pop("schedule", None)
        if name not in BUILT_IN:
            raise ValueError(
                f"learning_rate config names schedule {name!r}; built-in ones are "
                f"{sorted(BUILT_IN)}"
            )
        return BUILT_IN[name](**config)
    return value


def check_learning_rate(value: Any) -> Any:
    """A number > 0 or a callable; a schedule config dict is rebuilt first."""
    value = deserialize(value)
    if callable(value):
        return value
    check.positive(value, "learning_rate")
    return value


def learning_rate_at(learning_rate: Any, count: Any) -> Any:
    """The learning rate of the update that follows ``count`` updates.

    A number gives itself as a Python ``float``. A schedule is called with ``count``;
    when ``count`` is a Python int, its result is made a Python ``float`` (so a NumPy
    or 0-d array result cannot promote float32 parameters) and checked to be finite and
    >= 0. When ``count`` is traced (``jax.jit``), the result is returned as it is.

    Raises:
        ValueError: the schedule gave a negative or non-finite learning rate.
    """
    if not callable(learning_rate):
        return float(learning_rate)
    value = learning_rate(count)
    if isinstance(count, numbers.Integral):
        number = float(value)
        if not (math.isfinite(number) and number >= 0.0):
            raise ValueError(
                f"learning_rate schedule gave {number!r} at count {count}; "
                "a finite value >= 0 is needed"
            )
        return number
    return value
