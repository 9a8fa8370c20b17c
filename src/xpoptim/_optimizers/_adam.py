"""Adam (the seed's, with AMSGrad) and AdamW (its decoupled-decay form)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

from .. import _nonfinite, _rules
from .. import _validation as check
from .._compat import Array
from ._base import NOT_DECAYED, Optimizer


class AdamState(NamedTuple):
    """State of `Adam`.

    Attributes:
        step: number of updates applied so far (the seed's ``t``).
        momentums: parameter name -> first moment ``m``.
        velocities: parameter name -> second moment ``v``.
        max_velocities: parameter name -> running maximum of ``v`` (``amsgrad=True``
            only, else ``None``).
        skipped: number of updates skipped by ``nonfinite="skip"`` (not in ``step``);
            ``None`` under the other policies, which count nothing.
    """

    step: Any
    momentums: dict[str, Array]
    velocities: dict[str, Array]
    max_velocities: dict[str, Array] | None = None
    skipped: Any = None


class Adam(Optimizer):
    """Adam (adaptive moment estimation), with decoupled weight decay for ``"L2"``.

    Update rule, with ``t`` the step count (from 1):

    1. ``g = g + weight_decay * sign(w)`` (L1 only)
    2. ``m = beta1 * m + (1 - beta1) * g``
    3. ``v = beta2 * v + (1 - beta2) * g**2``
    4. ``m_hat = m / (1 - beta1**t)``; ``v_hat = v / (1 - beta2**t)``
    5. ``w = w - learning_rate * m_hat / (sqrt(v_hat) + epsilon)``
    6. L2 only: ``w = w - learning_rate * weight_decay * w`` (decoupled, on the updated ``w``)

    With ``amsgrad=True`` (torch.optim's option), step 5 uses ``v_max = max(v_max, v)``
    in place of ``v``: ``w = w - learning_rate * m_hat / (sqrt(v_max / (1 - beta2**t)) +
    epsilon)``.

    Args:
        learning_rate: step size, or a schedule (see [schedules][xpoptim.schedules]).
            Defaults to 0.001.
        regularization: ``"L1"``, ``"L2"`` or ``None``. Defaults to ``"L2"``.
        weight_decay: regularization strength. Defaults to 0.001.
        beta1: decay rate of the first moment, in [0, 1). Defaults to 0.9.
        beta2: decay rate of the second moment, in [0, 1). Defaults to 0.999.
        epsilon: added to ``sqrt(v_hat)``, > 0. Defaults to 1e-8.
        amsgrad: use the running maximum of ``v``. Defaults to False.
        no_decay: names that are not regularized: patterns or a predicate. Defaults to
            the seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).
    """

    State = AdamState
    _rule = staticmethod(_rules.adam)
    _hyperparameters = ("beta1", "beta2", "epsilon")
    _extensions: ClassVar[dict[str, Any]] = {
        "amsgrad": False,
        "no_decay": NOT_DECAYED,
        "nonfinite": "propagate",
    }

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.001,
        regularization: str | None = "L2",
        weight_decay: float = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        *,
        amsgrad: bool = False,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        self.amsgrad = amsgrad
        self.no_decay = no_decay
        self.nonfinite = nonfinite
        super().__init__(learning_rate, regularization, weight_decay)  # type: ignore[arg-type]

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.beta1, "beta1")
        check.unit_interval(self.beta2, "beta2")
        check.positive(self.epsilon, "epsilon")
        check.flag(self.amsgrad, "amsgrad")

    def _buffer_fields(self) -> tuple[str, ...]:
        fields = ("momentums", "velocities")
        return (*fields, "max_velocities") if self.amsgrad else fields

    def _rule_function(self) -> Callable[..., tuple[Array, ...]]:
        return _rules.adam_amsgrad if self.amsgrad else _rules.adam

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        # ``step`` is a Python int, or a traced integer under jax.jit: both work here,
        # and stay Python floats in the first case.
        lr, b1, b2 = self._learning_rate(step), float(self.beta1), float(self.beta2)
        return {
            "learning_rate": lr,
            "beta1": b1,
            "beta2": b2,
            "epsilon": float(self.epsilon),
            "step_size": lr / (1.0 - b1**step),
            "sqrt_bias_correction2": (1.0 - b2**step) ** 0.5,
        }

    def _param_scalars(self, name: str) -> dict[str, Any]:
        decayed = self.regularization is not None and self.is_decayed(name)
        wd = float(self.weight_decay) if decayed else 0.0
        return {
            "l1": wd if self.regularization == "L1" else 0.0,
            "decoupled_decay": wd if self.regularization == "L2" else 0.0,
        }

    @property
    def t(self) -> int:
        """The step count of `step` (the seed's attribute): the updates applied so far.

        Settable, as in the seed (whose ``Model.train`` rewinds it when it restores its
        best weights): the next `step` is update ``t + 1``, with that bias correction and
        learning-rate schedule position; the buffers (momentums, velocities) are kept.
        Setting it before the first step starts the count there.

        Raises:
            TypeError: (on setting) not an int (``True`` and ``3.0`` are refused).
            ValueError: (on setting) a negative count.
        """
        return 0 if self._state is None else int(self._state.step)

    @t.setter
    def t(self, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"t must be an int >= 0, got {value!r} ({type(value).__name__})")
        if value < 0:
            raise ValueError(f"t must be an int >= 0, got {value}")
        if self._state is None:  # no buffers yet: step() creates them, counting from t
            fields: dict[str, dict[str, Array]] = {f: {} for f in self._buffer_fields()}
            skipped = _nonfinite.initial_count(self.nonfinite)
            self._state = self.State(step=int(value), skipped=skipped, **fields)
        else:
            self._state = self._state._replace(step=int(value))

    @property
    def params(self) -> dict[str, Any]:
        """The state kept by `step` in the seed's layout: ``t``, momentums, velocities."""
        return {"t": self.t, **super().params}


class AdamW(Adam):
    """Adam with decoupled weight decay: the seed's ``Adam(regularization="L2")``.

    Update rule, with ``t`` the step count (from 1):

    1. ``m = beta1 * m + (1 - beta1) * g``; ``v = beta2 * v + (1 - beta2) * g**2``
    2. ``w = w - learning_rate * m_hat / (sqrt(v_hat) + epsilon)`` (as [Adam][xpoptim.Adam])
    3. ``w = w - learning_rate * weight_decay * w``, on the *updated* ``w``

    The decay comes **after** the Adam step, as in mpneuralnetwork. torch.optim's
    ``AdamW`` and optax's ``adamw`` decay the *previous* ``w`` instead
    (``w = w * (1 - learning_rate * weight_decay) - learning_rate * m_hat / (...)``): the two
    differ by ``learning_rate**2 * weight_decay * m_hat / (sqrt(v_hat) + epsilon)`` per
    step, a second-order term.

    Args:
        learning_rate: step size, or a schedule (see [schedules][xpoptim.schedules]).
            Defaults to 0.001.
        weight_decay: decoupled decay strength, >= 0. Defaults to 0.01 (torch's default).
        beta1: decay rate of the first moment, in [0, 1). Defaults to 0.9.
        beta2: decay rate of the second moment, in [0, 1). Defaults to 0.999.
        epsilon: added to ``sqrt(v_hat)``, > 0. Defaults to 1e-8.
        amsgrad: use the running maximum of ``v``. Defaults to False.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).

    Examples:
        >>> import numpy as np
        >>> import xpoptim
        >>> opt = xpoptim.AdamW(learning_rate=0.1, weight_decay=0.5)
        >>> params = {"w": np.array([1.0, -1.0])}
        >>> params, state = opt.update(params, {"w": np.array([2.0, -2.0])}, opt.init(params))
        >>> params["w"]  # (1 - 0.1) * (1 - 0.1 * 0.5), up to epsilon
        array([ 0.855, -0.855])
    """

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.001,
        weight_decay: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        *,
        amsgrad: bool = False,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        super().__init__(
            learning_rate,
            "L2",
            weight_decay,
            beta1,
            beta2,
            epsilon,
            amsgrad=amsgrad,
            no_decay=no_decay,
            nonfinite=nonfinite,
        )

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        if self.regularization != "L2":
            raise ValueError(
                f"AdamW always uses decoupled ('L2') decay, got regularization="
                f"{self.regularization!r}; use Adam for other kinds"
            )

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (no ``regularization``: it is always decoupled)."""
        config = super().get_config()
        del config["regularization"]
        return config
