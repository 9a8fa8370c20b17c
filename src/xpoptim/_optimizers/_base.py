"""The base of every optimizer: validation, config, state, ``update`` and ``step(layers)``.

A subclass (one module per family beside this one) names its state NamedTuple, its
rule from `xpoptim._rules`, its hyperparameters, and the Python scalars the rule takes
for one parameter at one step; everything else is here:

* the functional core, optax-style: ``state = opt.init(params)`` then
  ``params, state = opt.update(params, grads, state)``, for any Array API backend
  (JAX and Dask included, and under ``jax.jit``);
* the seed's layer protocol: ``opt.step(layers)``, which updates each layer's
  ``params`` (``{name: (param, grad)}``) in place and keeps the state inside the
  optimizer, keyed by ``f"{layer_index}.{param_name}"``, repeating a validated step
  plan where the compiled path can;
* state dicts (the logic is in `xpoptim._state`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from .. import _nonfinite, _selection
from .. import _state as state_dicts
from .. import _validation as check
from .. import schedules as _schedules
from .._compat import Array, Namespace
from .._execution import (
    current_options,
    owned,
    run_rule,
    scalars_like,
    updates_in_place,
    values_readable,
    warn_if_deep,
    zeros_state,
)
from .._execution.blocked import Item
from .._execution.compiled import step_plan
from .._execution.compiled.step_plan import StepPlan
from .._execution.placement import zeros_beside

#: Substrings of parameter names that are never regularized (the seed's rule).
NOT_DECAYED = ("bias", "beta", "gamma")


def _truths(scalars: Mapping[str, Any]) -> tuple[tuple[str, bool], ...]:
    """Each scalar's truth value: what a traced kernel's guards check."""
    return tuple((name, bool(value)) for name, value in scalars.items())


def filled(buffer: Array, value: Array | float, xp: Namespace) -> Array:
    """A zero ``buffer`` plus ``value`` (a number, or an array shaped like it): in place
    where the buffer is updated in place (keeping its memory layout), else a new array.

    An array ``value`` is read through `owned` (a PyTorch parameter's autograd history
    stays out of the state).
    """
    if not isinstance(value, int | float):
        value = owned(value, xp)
    if updates_in_place(buffer):
        buffer += value
        return buffer
    return buffer + value


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
    #: State buffers not shaped like their parameter: field -> a function of the
    #: parameter's shape giving the buffer's (Adafactor's row and column factors).
    #: ``init`` makes them, and every state check and load expects them, in that shape.
    _buffer_shapes: ClassVar[Mapping[str, Callable[[tuple[int, ...]], tuple[int, ...]]]] = {}
    #: Whether the rule is elementwise, so that any slice of a parameter can be stepped
    #: alone (`OutOfCore` steps one chunk at a time and refuses the others).
    elementwise: ClassVar[bool] = True

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
        #: the truth values of the shared scalars the plan was made with
        self._plan_truths: tuple[tuple[str, bool], ...] = ()
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

    def _buffer_shape(self, field: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of buffer ``field`` for a parameter of shape ``shape``."""
        declared = self._buffer_shapes.get(field)
        return shape if declared is None else declared(shape)

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
        """The initial state for ``params``: each buffer has its parameter's shape, dtype,
        device (and, for Dask, chunks), and starts at zero unless the optimizer says
        otherwise (`Adagrad`'s ``initial_accumulator_value``, `Rprop`'s step sizes).

        Args:
            params: parameter name -> array, all of one Array API namespace.

        Returns:
            This optimizer's state (a NamedTuple) with ``step == 0``.
        """
        xp = check.params(params)
        fields = self._buffer_fields()
        buffers = zeros_state(params, len(fields), self._param_scalars, xp)
        for index, field in enumerate(fields):
            if field in self._buffer_shapes:  # not shaped like the parameters
                buffers[index] = {
                    name: zeros_beside(self._buffer_shape(field, tuple(p.shape)), p, xp)
                    for name, p in params.items()
                }
        initial = self._initial_state(params, dict(zip(fields, buffers, strict=True)), xp)
        return self.State(
            step=0,
            **initial,
            skipped=_nonfinite.initial_count(self.nonfinite),
        )

    def _initial_state(
        self, params: Mapping[str, Array], buffers: dict[str, dict[str, Array]], xp: Namespace
    ) -> dict[str, dict[str, Array]]:
        """The buffers of new parameters, given zeros laid out for the fast paths
        (``field -> name -> buffer``). An optimizer whose state does not start at zero
        fills them here, with `filled` (which keeps that layout)."""
        return buffers

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
            shape = self._buffer_shapes.get(field)
            check.like_params(getattr(state, field), params, xp, f"state.{field}", shape)
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
        shared = self._step_scalars(step)
        # The plan's kernels were traced for the truth values of these scalars (RAdam's
        # ``rectified`` turns True at some step): another pattern takes the full path,
        # which plans again, before any kernel runs.
        if _truths(shared) != self._plan_truths:
            return False
        if not plan.run(grads, shared):
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
        shared = self._step_scalars(state.step)
        self._plan_truths = _truths(shared)
        return step_plan.build(
            self._rule_function(),
            self._plan_key(),
            state,
            current_options(),
            layers,
            items,
            shared,
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
