"""The optimizers: SGD, RMSprop and Adam, with the names and defaults of mpneuralnetwork 1.1.1.

Each optimizer offers two ways in, both running the same rule from `xpoptim._rules`:

* the functional core, optax-style: ``state = opt.init(params)`` then
  ``params, state = opt.update(params, grads, state)``, for any Array API backend
  (JAX and Dask included, and under ``jax.jit``);
* the seed's layer protocol: ``opt.step(layers)``, which updates each layer's
  ``params`` (``{name: (param, grad)}``) in place and keeps the state inside the
  optimizer, keyed by ``f"{layer_index}.{param_name}"``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

from . import _nonfinite, _rules, _selection
from . import _state as state_dicts
from . import _validation as check
from . import schedules as _schedules
from ._compat import Array, Namespace
from ._execution import (
    current_options,
    run_rule,
    scalars_like,
    updates_in_place,
    values_readable,
    warn_if_deep,
    zeros_state,
)
from ._execution.blocked import Item
from ._execution.compiled import step_plan
from ._execution.compiled.step_plan import StepPlan

#: Substrings of parameter names that are never regularized (the seed's rule).
NOT_DECAYED = ("bias", "beta", "gamma")


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


class RMSpropState(NamedTuple):
    """State of `RMSprop`.

    Attributes:
        step: number of updates applied so far.
        cache: parameter name -> running average of the squared gradient.
        mean_grad: parameter name -> running average of the gradient (``centered=True``
            only, else ``None``).
        momentum_buffer: parameter name -> momentum buffer (``momentum > 0`` only, else
            ``None``).
        skipped: number of updates skipped by ``nonfinite="skip"`` (not in ``step``);
            ``None`` under the other policies, which count nothing.
    """

    step: Any
    cache: dict[str, Array]
    mean_grad: dict[str, Array] | None = None
    momentum_buffer: dict[str, Array] | None = None
    skipped: Any = None


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


class Optimizer:
    """Base class of the optimizers: validation, state, ``update`` and ``step(layers)``.

    Subclasses name their state type, their rule, their own hyperparameters, and the
    Python scalars the rule takes for one parameter at one step.

    Args:
        learning_rate: the step size, a finite number > 0, or a schedule: a callable of
            the number of updates already applied (see [schedules][xpoptim.schedules]).
        regularization: ``"L1"``, ``"L2"`` or ``None`` (no regularization).
        weight_decay: the regularization strength, a finite number >= 0.

    Every optimizer also takes ``nonfinite`` (keyword only): what an update does when a
    gradient holds NaN or Inf. ``"propagate"`` (the default, the seed's behaviour: the
    values flow into the parameters and state), ``"skip"`` (the whole update is skipped
    for every parameter and counted in ``state.skipped``) or ``"raise"`` (an error naming
    the parameter, nothing changed; eager arrays only). See ``docs/state.md``.
    """

    State: ClassVar[type[Any]]
    _rule: ClassVar[Callable[..., tuple[Array, ...]]]
    #: The subclass's own constructor arguments, in ``get_config`` order.
    _hyperparameters: ClassVar[tuple[str, ...]] = ()
    #: Constructor arguments beyond the seed's, with their defaults: ``get_config`` lists
    #: them only when they differ, so a seed-compatible config stays the seed's.
    _extensions: ClassVar[dict[str, Any]] = {"no_decay": NOT_DECAYED, "nonfinite": "propagate"}
    #: Names whose parameters are not regularized: patterns or a predicate (see
    #: ``xpoptim._selection``); the seed's rule by default.
    no_decay: Any = NOT_DECAYED
    #: What an update does with NaN/Inf gradients (see ``xpoptim._nonfinite``).
    nonfinite: str = "propagate"

    def __init__(
        self, learning_rate: float, regularization: str | None, weight_decay: float
    ) -> None:
        self.learning_rate = _schedules.deserialize(learning_rate)
        self.regularization = regularization
        self.weight_decay = weight_decay
        self._state: Any = None
        #: names of loaded state buffers not yet placed like their parameters
        self._unplaced: set[str] = set()
        #: what the last ``step(layers)`` did, to do it again cheaply (see step_plan)
        self._plan: StepPlan | None = None
        self._validate_hyperparameters()

    # -- configuration -------------------------------------------------------------

    def _validate_hyperparameters(self) -> None:
        """Check every hyperparameter; called by ``__init__`` and before each update."""
        _schedules.check_learning_rate(self.learning_rate)
        check.regularization(self.regularization)
        self.no_decay = _selection.check_selector(self.no_decay, "no_decay")
        check.non_negative(self.weight_decay, "weight_decay")
        _nonfinite.check_policy(self.nonfinite)

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
        config["learning_rate"] = _schedules.serialize(self.learning_rate)
        for name, default in self._extensions.items():
            value = getattr(self, name)
            if value is not default and value != default:
                # Patterns as a list, so a JSON round trip gives back an equal config.
                config[name] = list(value) if isinstance(value, tuple) else value
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Optimizer:
        """Rebuild an optimizer from `get_config` output."""
        config = dict(config)
        kind = config.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"config is for {kind!r}, not {cls.__name__!r}")
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "type")
        return f"{type(self).__name__}({args})"

    def is_decayed(self, name: str) -> bool:
        """Whether parameter ``name`` is regularized: not if ``no_decay`` selects it (by
        default, names containing bias, beta or gamma)."""
        return not _selection.matches(name, self.no_decay)

    # -- hooks of the variants (Nesterov, centered, AMSGrad) and of schedules --------------

    def _buffer_fields(self) -> tuple[str, ...]:
        """The state fields this optimizer uses (the others stay ``None``)."""
        return state_dicts.buffer_fields(self.State)

    def _rule_function(self) -> Callable[..., tuple[Array, ...]]:
        """The rule this optimizer runs, given its options."""
        return type(self)._rule

    def _learning_rate(self, step: Any) -> Any:
        """The learning rate of update number ``step`` (from 1): a schedule sees the count
        of updates already applied, ``step - 1``."""
        return _schedules.learning_rate_at(self.learning_rate, step - 1)

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
        fields = self._buffer_fields()
        buffers = zeros_state(params, len(fields), self._param_scalars, xp)
        return self.State(
            step=0,
            **dict(zip(fields, buffers, strict=True)),
            skipped=_nonfinite.initial_count(self.nonfinite),
        )

    def _check_state(self, state: Any, params: Mapping[str, Array], xp: Namespace | None) -> Any:
        if not isinstance(state, self.State):
            raise TypeError(
                f"state must be {self.State.__name__} (from {type(self).__name__}.init), "
                f"got {type(state).__name__}"
            )
        step = check.counter(state.step, "state.step", readable=values_readable)
        if state.skipped is not None:
            check.counter(state.skipped, "state.skipped", readable=values_readable)
        for field in self._buffer_fields():
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
            state: the state from `init` or from the previous ``update``.

        Returns:
            ``(new_params, new_state)``.
        """
        self._validate_hyperparameters()
        xp = check.params(params)
        check.like_params(grads, params, xp, "grads")
        step = self._check_state(state, params, xp) + 1
        finite = _nonfinite.all_finite(self.nonfinite, grads, xp)
        if finite is False:  # "skip", read eagerly: nothing to compute
            return dict(params), state._replace(skipped=(state.skipped or 0) + 1)
        shared = self._step_scalars(step)
        # A step counter that is an array (traced, or selected lazily by "skip") makes
        # array scalars: give them each parameter's dtype, or float32 would promote.
        scalars_are_python = isinstance(step, int)
        fields = self._buffer_fields()
        per_param = self._param_scalars
        if not scalars_are_python:

            def per_param(name: str) -> dict[str, Any]:
                return {**scalars_like(shared, params[name], xp), **self._param_scalars(name)}

        new_params, new_buffers = run_rule(
            self._rule_function(),
            params,
            grads,
            [getattr(state, field) for field in fields],
            shared=shared if scalars_are_python else {},
            per_param=per_param,
            xp=xp,
        )
        new_state = self.State(
            step, **dict(zip(fields, new_buffers, strict=True)), skipped=state.skipped
        )
        if finite is not None and finite is not True:  # "skip" on lazy/traced arrays
            new_params, new_state = _nonfinite.select(
                finite, (new_params, new_state), (params, state), xp
            )
        warn_if_deep(new_params)
        return new_params, new_state

    # -- the seed's layer protocol ---------------------------------------------------------

    @staticmethod
    def _collect(layers: Iterable[Any]) -> tuple[dict[str, Array], dict[str, Array]]:
        if (
            isinstance(layers, Mapping | str | bytes)
            or hasattr(layers, "shape")
            or not isinstance(layers, Iterable)
        ):
            raise TypeError(
                "layers must be a list (or other sequence) of layers, each with a `params` "
                f"attribute, got {type(layers).__name__}: pass model.layers, not the model "
                "or a dict of layers"
            )
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

    @classmethod
    def _collect_in_place(cls, layers: Iterable[Any]) -> tuple[dict[str, Array], dict[str, Array]]:
        """`_collect`, refusing parameters that cannot be updated in place."""
        params, grads = cls._collect(layers)
        for name, p in params.items():
            if not updates_in_place(p):
                raise TypeError(
                    f"parameter {name!r} ({type(p).__module__}.{type(p).__name__}) cannot be "
                    "updated in place, which step(layers) needs; for JAX, Dask or read-only "
                    "arrays use `params, state = optimizer.update(params, grads, state)`"
                )
        return params, grads

    def step(self, layers: Iterable[Any]) -> None:
        """Update the parameters of ``layers`` in place (the seed's protocol).

        Each layer with a ``params`` attribute gives ``{name: (param, grad)}``; layers
        without one are skipped. State lives in the optimizer, keyed by
        ``f"{layer_index}.{name}"``, and is created the first time a name is seen.

        Raises:
            TypeError: a parameter cannot be updated in place (JAX, Dask or read-only
                arrays); use `update` for those.
        """
        if (
            self._plan is not None
            and isinstance(layers, list | tuple)
            and self._planned_step(layers)
        ):
            return
        params, grads = self._collect_in_place(layers)
        state = self._state_for(params)
        _, new_state = self.update(params, grads, state)
        self._keep_state(new_state)
        self._plan = self._make_plan(layers, params, grads)

    # -- the step plan: a model's structure is validated once, not at every step --------

    def _plan_key(self) -> tuple[Any, ...]:
        """Every setting a step depends on (compared by identity, then equality)."""
        names = ("learning_rate", "regularization", "weight_decay", "no_decay", "nonfinite")
        return tuple(
            getattr(self, name) for name in (*names, *self._hyperparameters, *self._extensions)
        )

    def _planned_step(self, layers: Sequence[Any]) -> bool:
        """Step ``layers`` through the plan if nothing it relies on changed; else False."""
        plan = self._plan
        assert plan is not None
        if (
            plan.state is not self._state
            or plan.options is not current_options()
            or plan.key != self._plan_key()
        ):
            return False
        grads = plan.gradients(layers)
        if grads is None:
            return False
        step = self._state.step + 1
        if not plan.run(grads, self._step_scalars(step)):
            return False
        self._state = plan.state = self._state._replace(step=step)
        return True

    def _make_plan(
        self, layers: Iterable[Any], params: Mapping[str, Array], grads: Mapping[str, Array]
    ) -> StepPlan | None:
        """A plan of the step just taken, where the compiled path can repeat it."""
        if not isinstance(layers, list | tuple) or self.nonfinite != "propagate" or self._unplaced:
            return None
        state = self._state
        fields = [getattr(state, field) for field in self._buffer_fields()]
        items = [
            Item(name, (p, *[buffers[name] for buffers in fields]), grads[name], scalars)
            for name, p in params.items()
            for scalars in (self._param_scalars(name),)
        ]
        return step_plan.build(
            self._rule_function(),
            self._plan_key(),
            state,
            current_options(),
            layers,
            items,
            self._step_scalars(state.step),
            fields,
        )

    def _state_for(self, params: Mapping[str, Array]) -> Any:
        """The stored state restricted to ``params``, with fresh zeros for new names."""
        if self._state is None:
            return self.init(params)
        if self._unplaced:
            state_dicts.adopt(self, params)
        fields = self._buffer_fields()
        known_names = getattr(self._state, fields[0])
        new = {name: p for name, p in params.items() if name not in known_names}
        fresh = self.init(new) if new else None
        buffers = {}
        for field in fields:
            known = getattr(self._state, field)
            buffers[field] = {
                name: known[name] if name in known else getattr(fresh, field)[name]
                for name in params
            }
        return self.State(self._state.step, **buffers, skipped=self._state.skipped)

    def _keep_state(self, new_state: Any) -> None:
        if self._state is None:
            self._state = new_state
            return
        buffers = {
            field: {**getattr(self._state, field), **getattr(new_state, field)}
            for field in self._buffer_fields()
        }
        self._state = self.State(new_state.step, **buffers, skipped=new_state.skipped)

    @property
    def state(self) -> Any:
        """The state kept by `step` (``None`` before the first step)."""
        return self._state

    @property
    def params(self) -> dict[str, Any]:
        """The state kept by `step`, in the seed's layout (keyed by stable names)."""
        fields = self._buffer_fields()
        if self._state is None:
            return {field: {} for field in fields}
        return {field: dict(getattr(self._state, field)) for field in fields}

    # -- state dicts: the logic is in xpoptim._state (see docs/state.md) ----------------

    def state_dict(self, state: Any = None) -> dict[str, Any]:
        """A versioned snapshot of a state as a plain nested dict.

        Args:
            state: a state from `init`/`update`; by default the state kept by
                `step`.

        Returns:
            ``{"format_version", "optimizer", "config", "step", "skipped", "buffers"}``, with
            ``buffers[field][name]`` a copy of each state array (later steps do not change
            it) and the counters as Python ints. See [state_to_dict][xpoptim.state_to_dict].

        Raises:
            ValueError: no ``state`` and the optimizer keeps none (it never ran `step`,
                nor `load_state_dict`): after functional `update` calls the state is
                the caller's, so pass it.
        """
        if state is None:
            if self._state is None:
                name = type(self).__name__
                raise ValueError(
                    f"{name}.state_dict() has no state to take: this optimizer never ran "
                    "step(layers) nor load_state_dict(). After functional init()/update() "
                    "calls, pass their state: opt.state_dict(state)"
                )
            state = self._state
        return state_dicts.state_to_dict(self, state)

    def load_state_dict(
        self,
        state_dict: Mapping[str, Any],
        like: Any = None,
        *,
        xp: Namespace | None = None,
        device: Any = None,
    ) -> None:
        """Restore the state kept by `step` from `state_dict` output.

        Everything is checked before anything changes; a refused load leaves the
        optimizer as it was. Shapes are checked against ``like`` and against the state
        the optimizer keeps now. Hyperparameters are not changed (the dict's ``config``
        is only checked for the optimizer type).

        Args:
            state_dict: the dict to load (from any backend or device).
            like: the parameters the state belongs to, as ``{name: array}`` or as the
                layers given to `step`: each buffer is checked against and placed
                on its parameter's namespace, device and dtype now. Without it, buffers
                are placed like their parameters at the next `step`.
            xp: without ``like``, the namespace to place the buffers in now.
            device: with ``xp``, the device to place them on.
        """
        state_dicts.load_state_dict(self, state_dict, like, xp=xp, device=device)


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


class RMSprop(Optimizer):
    """RMSprop: the gradient divided by a running root mean square of its recent values.

    Update rule:

    1. ``g = g + R(w)`` (as in `SGD`)
    2. ``cache = decay_rate * cache + (1 - decay_rate) * g**2``
    3. ``w = w - learning_rate * g / (sqrt(cache) + epsilon)``

    With ``centered=True`` (torch.optim's option) the denominator is
    ``sqrt(cache - mean_grad**2) + epsilon``, where
    ``mean_grad = decay_rate * mean_grad + (1 - decay_rate) * g``. With ``momentum > 0``
    step 3 becomes ``b = momentum * b + g / denominator``; ``w = w - learning_rate * b``.

    Args:
        learning_rate: step size, or a schedule (see [schedules][xpoptim.schedules]).
            Defaults to 0.001.
        regularization: ``"L1"``, ``"L2"`` or ``None``. Defaults to ``"L2"``.
        weight_decay: regularization strength. Defaults to 0.001.
        decay_rate: discounting factor in [0, 1). Defaults to 0.9.
        epsilon: added to the denominator, > 0. Defaults to 1e-8.
        centered: normalize by the estimated variance of the gradient. Defaults to False.
        momentum: momentum factor in [0, 1). Defaults to 0.
        no_decay: names that are not regularized: patterns or a predicate. Defaults to
            the seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).
    """

    State = RMSpropState
    _rule = staticmethod(_rules.rmsprop)
    _hyperparameters = ("decay_rate", "epsilon")
    _extensions: ClassVar[dict[str, Any]] = {
        "centered": False,
        "momentum": 0.0,
        "no_decay": NOT_DECAYED,
        "nonfinite": "propagate",
    }

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.001,
        regularization: str | None = "L2",
        weight_decay: float = 0.001,
        decay_rate: float = 0.9,
        epsilon: float = 1e-8,
        *,
        centered: bool = False,
        momentum: float = 0.0,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.decay_rate = decay_rate
        self.epsilon = epsilon
        self.centered = centered
        self.momentum = momentum
        self.no_decay = no_decay
        self.nonfinite = nonfinite
        super().__init__(learning_rate, regularization, weight_decay)  # type: ignore[arg-type]

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.decay_rate, "decay_rate")
        check.positive(self.epsilon, "epsilon")
        check.flag(self.centered, "centered")
        check.unit_interval(self.momentum, "momentum")

    def _buffer_fields(self) -> tuple[str, ...]:
        fields: tuple[str, ...] = ("cache",)
        if self.centered:
            fields += ("mean_grad",)
        if self.momentum:
            fields += ("momentum_buffer",)
        return fields

    def _rule_function(self) -> Callable[..., tuple[Array, ...]]:
        if self.centered or self.momentum:
            return _rules.rmsprop_extended
        return _rules.rmsprop

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        scalars = {
            "learning_rate": self._learning_rate(step),
            "decay_rate": float(self.decay_rate),
            "epsilon": float(self.epsilon),
        }
        if self.centered or self.momentum:
            scalars.update(centered=self.centered, momentum=float(self.momentum))
        return scalars


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
