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

With a Python ``int`` count, a built-in schedule also checks what it computes: a count
above ``2**63 - 1`` raises [`StepCountError`][], and a value that overflows a float or is
not a finite number >= 0 raises [`LearningRateError`][] (both name the schedule and the
count). An optimizer evaluates its learning rate before it changes anything, so on these
errors its parameters and state are exactly as they were. A value that *underflows* to
``0.0`` (``ExponentialDecay`` with ``decay_rate < 1``, a few thousand transitions on) is
accepted, as a learning rate of exactly 0 is (the start of a warmup): it is the limit of
the decay, and the update then changes only the optimizer's moments.

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
    "MAX_COUNT",
    "Constant",
    "ExponentialDecay",
    "LearningRate",
    "LearningRateError",
    "ReduceOnPlateau",
    "Schedule",
    "StepCountError",
    "StepDecay",
    "WarmupCosineDecay",
    "deserialize",
    "learning_rate_at",
    "serialize",
]


#: The largest step count accepted: a signed 64-bit integer, which checkpoints, state
#: dicts and every backend's integer counter can hold (and a float can represent).
MAX_COUNT = 2**63 - 1


class StepCountError(ValueError, OverflowError):
    """A step count too large to use (above ``MAX_COUNT``, ``2**63 - 1``).

    Such a count does not come from counting steps: it comes from a hand-edited or
    corrupted state dict, checkpoint or ``state.step``. A subclass of both `ValueError`
    and `OverflowError` (what a float conversion of the count raised before).
    """


class LearningRateError(ValueError, OverflowError):
    """A learning rate that cannot be used: a schedule overflowed a float, or gave a
    negative, infinite or NaN value. The message names the schedule and the step.

    A subclass of both `ValueError` and `OverflowError` (what the overflow raised before).
    """


def _describe_count(count: int) -> str:
    """A count for a message: its digits, or its size when it has too many to print."""
    if count.bit_length() <= 128:
        return str(count)
    return f"a {count.bit_length()}-bit integer (about 2**{count.bit_length() - 1})"


def check_count(count: Any, what: str = "count") -> int:
    """A Python-integer count (or NumPy integer) as an ``int`` in ``[0, MAX_COUNT]``.

    Raises:
        StepCountError: the count is above ``MAX_COUNT``.
        ValueError: the count is negative.
    """
    number = int(count)
    if number < 0:
        raise ValueError(f"{what} must be >= 0, got {number}")
    if number > MAX_COUNT:
        raise StepCountError(
            f"{what} is {_describe_count(number)}, above the largest step count, 2**63 - 1: "
            "it cannot come from counting steps (a hand-edited or corrupted state, "
            "checkpoint or state.step?)"
        )
    return number


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
    arguments in ``_args`` ([`get_config`][Schedule.get_config] and [`deserialize`][] use
    them) and write their formula in ``_value(count)``; ``__call__`` checks a Python-int
    count and the value.
    """

    _args: ClassVar[tuple[str, ...]] = ()

    def __call__(self, count: Any) -> Any:
        """The learning rate after ``count`` updates.

        Raises:
            StepCountError: ``count`` is a Python integer above ``MAX_COUNT``.
            LearningRateError: the value overflows a float, or is not a finite number
                >= 0 (checked when ``count`` is a Python integer; a traced or lazy count
                cannot be read without a compute).
            ValueError: ``count`` is a negative integer.
        """
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            return self._value(count)
        count = check_count(count, f"the count given to {self!r}")
        try:
            value = float(self._value(count))
        except OverflowError:
            raise LearningRateError(
                f"{self!r} overflows a float at count {count}{self._overflow_hint()}"
            ) from None
        if not (math.isfinite(value) and value >= 0.0):
            raise LearningRateError(
                f"{self!r} gives {value!r} at count {count}{self._overflow_hint()}"
            )
        return value

    def _value(self, count: Any) -> Any:
        """The schedule's formula, for a Python int or an array ``count``."""
        raise NotImplementedError

    def _overflow_hint(self) -> str:
        """What to change when the value overflows (empty when nothing helps)."""
        return ""

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

    def _value(self, count: Any) -> Any:
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

    def _value(self, count: Any) -> Any:
        return self.init_value * self.gamma ** (count // self.step_size)


class ExponentialDecay(Schedule):
    """Exponential decay (optax's ``exponential_decay``, Keras's ``ExponentialDecay``).

    ``lr(count) = init_value * decay_rate ** (count / transition_steps)``, with
    ``count // transition_steps`` instead when ``staircase``.

    With ``decay_rate < 1`` the rate tends to 0 and, once below the smallest float
    (about ``1e-308``), is exactly ``0.0``: accepted, as the limit of the decay (the
    updates then change only the optimizer's moments), like optax. With ``decay_rate > 1``
    the rate grows; at the count where it passes the largest float, calling the schedule
    raises [`LearningRateError`][], naming the schedule and the count, before any update.

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

    def _value(self, count: Any) -> Any:
        if self.staircase:
            exponent = count // self.transition_steps
        else:
            exponent = count / self.transition_steps
        return self.init_value * self.decay_rate**exponent

    def _overflow_hint(self) -> str:
        if self.decay_rate > 1.0:
            return (
                f": with decay_rate={self.decay_rate!r} > 1 the rate grows without bound; "
                "use decay_rate <= 1, or a schedule that stops growing"
            )
        return ""


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

    def _value(self, count: Any) -> Any:
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

    def _value(self, count: Any) -> Any:
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

    A Python-int ``count`` is checked first, whatever the learning rate: the update it
    leads to, number ``count + 1``, must be at most ``MAX_COUNT``. Optimizers call this
    before they compute anything else of the step (Adam's bias corrections included),
    so these errors leave parameters and state as they were.

    Raises:
        StepCountError: ``count + 1`` is above ``MAX_COUNT`` (a state whose step was
            loaded from a hand-edited or corrupted file, say).
        LearningRateError: the schedule overflowed, or gave a negative or non-finite
            learning rate; the message names the schedule and the step.
    """
    if isinstance(count, numbers.Integral):
        count = check_count(count + 1, "the next step number (state.step + 1, or opt.t + 1)") - 1
    if not callable(learning_rate):
        return float(learning_rate)
    if not isinstance(count, numbers.Integral):
        return learning_rate(count)
    step = count + 1
    try:
        number = float(learning_rate(count))
    except LearningRateError as exc:
        raise LearningRateError(f"learning_rate at step {step}: {exc}") from None
    except OverflowError as exc:
        raise LearningRateError(
            f"learning_rate schedule {learning_rate!r} overflows at step {step} "
            f"(count {count}): {exc}"
        ) from None
    if not (math.isfinite(number) and number >= 0.0):
        raise LearningRateError(
            f"learning_rate schedule gave {number!r} at count {count} (step {step}); "
            f"a finite value >= 0 is needed from {learning_rate!r}"
        )
    return number
