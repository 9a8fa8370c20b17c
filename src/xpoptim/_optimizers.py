"""The optimizers: SGD, RMSprop and Adam, with the names and defaults of mpneuralnetwork 1.1.1.

Each optimizer offers two ways in, both running the same rule from :mod:`xpoptim._rules`:

* the functional core, optax-style: ``state = opt.init(params)`` then
  ``params, state = opt.update(params, grads, state)``, for any Array API backend
  (JAX and Dask included, and under ``jax.jit``);
* the seed's layer protocol: ``opt.step(layers)``, which updates each layer's
  ``params`` (``{name: (param, grad)}``) in place and keeps the state inside the
  optimizer, keyed by ``f"{layer_index}.{param_name}"``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

from . import _rules
from . import _validation as check
from ._compat import Array, Namespace
from ._execution import run_rule, updates_in_place, zeros_state

#: Substrings of parameter names that are never regularized (the seed's rule).
NOT_DECAYED = ("bias", "beta", "gamma")


class SGDState(NamedTuple):
    """State of :class:`SGD`.

    Attributes:
        step: number of updates applied so far (a Python int; a traced integer under
            ``jax.jit``).
        velocities: parameter name -> velocity ``v``.
    """

    step: Any
    velocities: dict[str, Array]


class RMSpropState(NamedTuple):
    """State of :class:`RMSprop`.

    Attributes:
        step: number of updates applied so far.
        cache: parameter name -> running average of the squared gradient.
    """

    step: Any
    cache: dict[str, Array]


class AdamState(NamedTuple):
    """State of :class:`Adam`.

    Attributes:
        step: number of updates applied so far (the seed's ``t``).
        momentums: parameter name -> first moment ``m``.
        velocities: parameter name -> second moment ``v``.
    """

    step: Any
    momentums: dict[str, Array]
    velocities: dict[str, Array]


class Optimizer:
    """Base class of the optimizers: validation, state, ``update`` and ``step(layers)``.

    Subclasses name their state type, their rule, their own hyperparameters, and the
    Python scalars the rule takes for one parameter at one step.

    Args:
        learning_rate: the step size, a finite number > 0.
        regularization: ``"L1"``, ``"L2"`` or ``None`` (no regularization).
        weight_decay: the regularization strength, a finite number >= 0.
    """

    State: ClassVar[type[Any]]
    _rule: ClassVar[Callable[..., tuple[Array, ...]]]
    #: The subclass's own constructor arguments, in ``get_config`` order.
    _hyperparameters: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, learning_rate: float, regularization: str | None, weight_decay: float
    ) -> None:
        self.learning_rate = learning_rate
        self.regularization = regularization
        self.weight_decay = weight_decay
        self._state: Any = None
        self._validate_hyperparameters()

    # -- configuration -------------------------------------------------------------

    def _validate_hyperparameters(self) -> None:
        """Check every hyperparameter; called by ``__init__`` and before each update."""
        check.positive(self.learning_rate, "learning_rate")
        check.regularization(self.regularization)
        check.non_negative(self.weight_decay, "weight_decay")

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, with the seed's keys.

        ``type(opt)(**{k: v for k, v in opt.get_config().items() if k != "type"})``
        rebuilds an optimizer that behaves identically (without its state).
        """
        config: dict[str, Any] = {
            "type": type(self).__name__,
            "learning_rate": self.learning_rate,
            "regularization": self.regularization,
            "weight_decay": self.weight_decay,
        }
        config.update({name: getattr(self, name) for name in self._hyperparameters})
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Optimizer:
        """Rebuild an optimizer from :meth:`get_config` output."""
        config = dict(config)
        kind = config.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"config is for {kind!r}, not {cls.__name__!r}")
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "type")
        return f"{type(self).__name__}({args})"

    def is_decayed(self, name: str) -> bool:
        """Whether parameter ``name`` is regularized: not if it contains bias, beta or gamma."""
        return not any(part in name for part in NOT_DECAYED)

    # -- what the rule gets ----------------------------------------------------------

    def _penalty(self, name: str) -> tuple[float, float]:
        """The coupled (L1, L2) strengths added to the gradient of ``name``."""
        if self.regularization is None or not self.is_decayed(name):
            return 0.0, 0.0
        wd = float(self.weight_decay)
        return (wd, 0.0) if self.regularization == "L1" else (0.0, wd)

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        """Python scalars of the rule shared by every parameter at step ``step`` (from 1)."""
        raise NotImplementedError

    def _param_scalars(self, name: str) -> dict[str, Any]:
        """Python scalars of the rule for parameter ``name``."""
        l1, l2 = self._penalty(name)
        return {"l1": l1, "l2": l2}

    # -- functional core ---------------------------------------------------------------

    def init(self, params: Mapping[str, Array]) -> Any:
        """Zero state for ``params``: each buffer has its parameter's shape, dtype, device
        (and, for Dask, chunks).

        Args:
            params: parameter name -> array, all of one Array API namespace.

        Returns:
            This optimizer's state (a NamedTuple) with ``step == 0``.
        """
        xp = check.params(params)
        fields = self.State._fields[1:]
        buffers = zeros_state(params, len(fields), self._param_scalars, xp)
        return self.State(step=0, **dict(zip(fields, buffers, strict=True)))

    def _check_state(self, state: Any, params: Mapping[str, Array], xp: Namespace | None) -> Any:
        if not isinstance(state, self.State):
            raise TypeError(
                f"state must be a {self.State.__name__} from {type(self).__name__}.init, "
                f"got {type(state).__name__}"
            )
        step = state.step
        if isinstance(step, numbers.Integral):
            if step < 0:
                raise ValueError(f"state.step must be >= 0, got {step}")
            # A NumPy integer would turn the bias corrections into NumPy float64
            # scalars, which promote float32 state to float64.
            step = int(step)
        elif not hasattr(step, "dtype"):
            raise TypeError(f"state.step must be an integer, got {step!r}")
        for field in self.State._fields[1:]:
            check.like_params(getattr(state, field), params, xp, f"state.{field}")
        return step

    def update(
        self, params: Mapping[str, Array], grads: Mapping[str, Array], state: Any
    ) -> tuple[dict[str, Array], Any]:
        """One optimization step on every parameter.

        Everything is checked before anything changes: on any error the parameters and
        the state are exactly as they were.

        On eager, writeable arrays (NumPy, CuPy, PyTorch, array-api-strict) the update
        may happen in place and the returned arrays may be the ones passed in; on JAX
        and Dask new arrays are returned (lazily, for Dask: nothing is computed). Never
        rely on either: always use what is returned. Gradients are never modified.

        Args:
            params: parameter name -> array.
            grads: parameter name -> gradient, with the parameter's shape, dtype,
                namespace and device.
            state: the state from :meth:`init` or from the previous ``update``.

        Returns:
            ``(new_params, new_state)``.
        """
        self._validate_hyperparameters()
        xp = check.params(params)
        check.like_params(grads, params, xp, "grads")
        step = self._check_state(state, params, xp) + 1
        shared = self._step_scalars(step)
        fields = self.State._fields[1:]
        new_params, new_buffers = run_rule(
            type(self)._rule,
            params,
            grads,
            [getattr(state, field) for field in fields],
            shared=shared,
            per_param=self._param_scalars,
            xp=xp,
        )
        return new_params, self.State(step, **dict(zip(fields, new_buffers, strict=True)))

    # -- the seed's layer protocol ---------------------------------------------------------

    @staticmethod
    def _collect(layers: Iterable[Any]) -> tuple[dict[str, Array], dict[str, Array]]:
        params: dict[str, Array] = {}
        grads: dict[str, Array] = {}
        for index, layer in enumerate(layers):
            if not hasattr(layer, "params"):
                continue
            layer_params = layer.params
            if not isinstance(layer_params, Mapping):
                raise TypeError(
                    f"layers[{index}].params must map names to (param, grad), "
                    f"got {type(layer_params).__name__}"
                )
            for name, pair in layer_params.items():
                key = f"{index}.{name}"
                if not isinstance(pair, tuple | list) or len(pair) != 2:
                    raise TypeError(
                        f"layers[{index}].params[{name!r}] must be a (param, grad) pair"
                    )
                params[key], grads[key] = pair
        return params, grads

    def step(self, layers: Iterable[Any]) -> None:
        """Update the parameters of ``layers`` in place (the seed's protocol).

        Each layer with a ``params`` attribute gives ``{name: (param, grad)}``; layers
        without one are skipped. State lives in the optimizer, keyed by
        ``f"{layer_index}.{name}"``, and is created the first time a name is seen.

        Raises:
            TypeError: a parameter cannot be updated in place (JAX, Dask or read-only
                arrays); use :meth:`update` for those.
        """
        params, grads = self._collect(layers)
        for name, p in params.items():
            if not updates_in_place(p):
                raise TypeError(
                    f"parameter {name!r} ({type(p).__module__}.{type(p).__name__}) cannot be "
                    "updated in place, which step(layers) needs; for JAX, Dask or read-only "
                    "arrays use `params, state = optimizer.update(params, grads, state)`"
                )
        state = self._state_for(params)
        _, new_state = self.update(params, grads, state)
        self._keep_state(new_state)

    def _state_for(self, params: Mapping[str, Array]) -> Any:
        """The stored state restricted to ``params``, with fresh zeros for new names."""
        if self._state is None:
            return self.init(params)
        new = {name: p for name, p in params.items() if name not in self._state[1]}
        fresh = self.init(new) if new else None
        buffers = {}
        for i, field in enumerate(self.State._fields[1:], start=1):
            known = self._state[i]
            buffers[field] = {
                name: known[name] if name in known else fresh[i][name]  # type: ignore[index]
                for name in params
            }
        return self.State(self._state.step, **buffers)

    def _keep_state(self, new_state: Any) -> None:
        if self._state is None:
            self._state = new_state
            return
        buffers = {
            field: {**self._state[i], **new_state[i]}
            for i, field in enumerate(self.State._fields[1:], start=1)
        }
        self._state = self.State(new_state.step, **buffers)

    @property
    def state(self) -> Any:
        """The state kept by :meth:`step` (``None`` before the first step)."""
        return self._state

    @property
    def params(self) -> dict[str, Any]:
        """The state kept by :meth:`step`, in the seed's layout (keyed by stable names)."""
        fields = self.State._fields[1:]
        if self._state is None:
            return {field: {} for field in fields}
        return {field: dict(getattr(self._state, field)) for field in fields}


class SGD(Optimizer):
    """Stochastic Gradient Descent with momentum.

    Update rule (``R`` is the regularization term added to the gradient):

    1. ``g = g + R(w)``, with ``R(w) = weight_decay * w`` (L2) or
       ``weight_decay * sign(w)`` (L1)
    2. ``v = momentum * v - learning_rate * g``
    3. ``w = w + v``

    Args:
        learning_rate: step size. Defaults to 0.01.
        regularization: ``"L1"``, ``"L2"`` or ``None``. Defaults to ``"L2"``.
        weight_decay: regularization strength. Defaults to 0.001.
        momentum: momentum factor in [0, 1). Defaults to 0.1.

    Example:
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

    def __init__(
        self,
        learning_rate: float = 0.01,
        regularization: str | None = "L2",
        weight_decay: float = 0.001,
        momentum: float = 0.1,
    ) -> None:
        self.momentum = momentum
        super().__init__(learning_rate, regularization, weight_decay)

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.momentum, "momentum")

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        return {"learning_rate": float(self.learning_rate), "momentum": float(self.momentum)}


class RMSprop(Optimizer):
    """RMSprop: the gradient divided by a running root mean square of its recent values.

    Update rule:

    1. ``g = g + R(w)`` (as in :class:`SGD`)
    2. ``cache = decay_rate * cache + (1 - decay_rate) * g**2``
    3. ``w = w - learning_rate * g / (sqrt(cache) + epsilon)``

    Args:
        learning_rate: step size. Defaults to 0.001.
        regularization: ``"L1"``, ``"L2"`` or ``None``. Defaults to ``"L2"``.
        weight_decay: regularization strength. Defaults to 0.001.
        decay_rate: discounting factor in [0, 1). Defaults to 0.9.
        epsilon: added to the denominator, > 0. Defaults to 1e-8.
    """

    State = RMSpropState
    _rule = staticmethod(_rules.rmsprop)
    _hyperparameters = ("decay_rate", "epsilon")

    def __init__(
        self,
        learning_rate: float = 0.001,
        regularization: str | None = "L2",
        weight_decay: float = 0.001,
        decay_rate: float = 0.9,
        epsilon: float = 1e-8,
    ) -> None:
        self.decay_rate = decay_rate
        self.epsilon = epsilon
        super().__init__(learning_rate, regularization, weight_decay)

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.decay_rate, "decay_rate")
        check.positive(self.epsilon, "epsilon")

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        return {
            "learning_rate": float(self.learning_rate),
            "decay_rate": float(self.decay_rate),
            "epsilon": float(self.epsilon),
        }


class Adam(Optimizer):
    """Adam (adaptive moment estimation), with decoupled weight decay for ``"L2"``.

    Update rule, with ``t`` the step count (from 1):

    1. ``g = g + weight_decay * sign(w)`` (L1 only)
    2. ``m = beta1 * m + (1 - beta1) * g``
    3. ``v = beta2 * v + (1 - beta2) * g**2``
    4. ``m_hat = m / (1 - beta1**t)``; ``v_hat = v / (1 - beta2**t)``
    5. ``w = w - learning_rate * m_hat / (sqrt(v_hat) + epsilon)``
    6. L2 only: ``w = w - learning_rate * weight_decay * w`` (decoupled, on the updated ``w``)

    Args:
        learning_rate: step size. Defaults to 0.001.
        regularization: ``"L1"``, ``"L2"`` or ``None``. Defaults to ``"L2"``.
        weight_decay: regularization strength. Defaults to 0.001.
        beta1: decay rate of the first moment, in [0, 1). Defaults to 0.9.
        beta2: decay rate of the second moment, in [0, 1). Defaults to 0.999.
        epsilon: added to ``sqrt(v_hat)``, > 0. Defaults to 1e-8.
    """

    State = AdamState
    _rule = staticmethod(_rules.adam)
    _hyperparameters = ("beta1", "beta2", "epsilon")

    def __init__(
        self,
        learning_rate: float = 0.001,
        regularization: str | None = "L2",
        weight_decay: float = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
    ) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        super().__init__(learning_rate, regularization, weight_decay)

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.beta1, "beta1")
        check.unit_interval(self.beta2, "beta2")
        check.positive(self.epsilon, "epsilon")

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        # ``step`` is a Python int, or a traced integer under jax.jit: both work here,
        # and stay Python floats in the first case.
        lr, b1, b2 = float(self.learning_rate), float(self.beta1), float(self.beta2)
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
        """The step count of :meth:`step` (the seed's attribute)."""
        return 0 if self._state is None else int(self._state.step)

    @property
    def params(self) -> dict[str, Any]:
        """The state kept by :meth:`step` in the seed's layout: ``t``, momentums, velocities."""
        return {"t": self.t, **super().params}
