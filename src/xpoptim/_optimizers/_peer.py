"""The base of the optimizers beyond the seed's three: their peer's conventions.

`PeerOptimizer` is `Optimizer` with the conventions of torch.optim (or of optax, where
torch lacks the optimizer): one ``weight_decay``, off (0) by default, applied the way
the peer applies it, and no seed-style ``regularization`` argument. The seed's L2
default stays on `SGD`, `RMSprop` and `Adam`.

`StepSeries` computes, in Python, a quantity that accumulates over the steps (NAdam's
product of momentum coefficients, schedule-free's sum of weights) and remembers the
last value, so that consecutive steps cost one term each.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

from ._base import NOT_DECAYED, Optimizer


class PeerOptimizer(Optimizer):
    """An optimizer whose defaults and conventions are its peer's (torch.optim, else optax).

    ``weight_decay`` (>= 0, default 0) is the only regularization: ``"coupled"`` (the
    class's ``_decay``) adds ``weight_decay * w`` to the gradient, as torch.optim's
    ``weight_decay`` does for Adagrad, Adadelta, Adamax, NAdam, RAdam; ``"decoupled"``
    shrinks the weights by ``learning_rate * weight_decay * w``, as optax's Lion and
    schedule-free AdamW do. Names that ``no_decay`` selects are never decayed.
    """

    #: How ``weight_decay`` applies: ``"coupled"`` (to the gradient) or ``"decoupled"``.
    _decay: ClassVar[str] = "coupled"

    def __init__(
        self,
        learning_rate: Any,
        weight_decay: float,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.no_decay = no_decay
        self.nonfinite = nonfinite
        super().__init__(learning_rate, "L2", weight_decay)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (no ``regularization``: ``weight_decay`` says it all)."""
        config = super().get_config()
        del config["regularization"]
        return config

    def _decay_of(self, name: str) -> float:
        """The weight decay of parameter ``name`` (0 where ``no_decay`` selects it)."""
        return float(self.weight_decay) if self.is_decayed(name) else 0.0

    def _decoupled(self) -> bool:
        return self._decay == "decoupled"

    def _param_scalars(self, name: str) -> dict[str, Any]:
        wd = self._decay_of(name)
        if self._decoupled():
            return {"decoupled_decay": wd}
        return {"l2": wd}

    def _concrete(self, step: Any, what: str) -> int:
        """``step`` as a Python int, for a scalar computed with Python control flow."""
        if isinstance(step, numbers.Integral):
            return int(step)
        raise TypeError(
            f"{type(self).__name__} computes {what} from the step count in Python, so it "
            f"needs a concrete state.step, got {type(step).__name__}: call update outside "
            "jax.jit (or jit the rest of the step), and use nonfinite='raise' or "
            "'propagate' on Dask"
        )


def in_open_unit_interval(value: Any, name: str) -> float:
    """``value`` (already checked to be a finite real) checked to lie in (0, 1)."""
    number = float(value)
    if not 0.0 < number < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {number!r}")
    return number


class StepSeries:
    """``f(1) op f(2) op ... op f(t)`` for a step ``t``, in Python floats, remembered.

    The next step (``t + 1``) and the same step cost one term at most; any other step
    (a rewind, a loaded state) is recomputed from step 1. ``key`` names what the terms
    depend on (hyperparameters): a different key starts over.
    """

    def __init__(self) -> None:
        self._key: Hashable = None
        self._step = 0
        self._value: Any = None

    def at(
        self,
        step: int,
        key: Hashable,
        start: Any,
        add: Callable[[Any, int], Any],
    ) -> Any:
        """The series at ``step``: ``start`` folded with ``add(value, i)`` for i in 1..step.

        Args:
            step: the step count (>= 0).
            key: what the terms depend on; a change starts over.
            start: the value at step 0.
            add: ``(value at i - 1, i) -> value at i``.
        """
        if key != self._key or step < self._step:
            self._key, self._step, self._value = key, 0, start
        value, i = self._value, self._step
        while i < step:
            i += 1
            value = add(value, i)
        self._step, self._value = step, value
        return value
