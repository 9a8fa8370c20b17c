"""Gradient clipping, gradient accumulation and parameter groups.

Two levels, like optax:

* pure functions on gradient dicts -- [`clip_by_value`][], [`clip_by_norm`][],
  [`clip_by_global_norm`][], [`global_norm`][] -- that return new dicts and never
  modify their input (call them between computing gradients and ``update``, as one calls
  ``torch.nn.utils.clip_grad_norm_`` before ``optimizer.step()``);
* wrappers with the optimizers' interface (``init``/``update``/``step(layers)``/
  ``get_config``): [`Clipped`][], [`MultiSteps`][] (gradient accumulation, optax's
  ``MultiSteps``, Keras's ``gradient_accumulation_steps``) and [`ParamGroups`][]
  (torch's parameter groups, optax's ``multi_transform``). Wrappers nest:
  ``MultiSteps(Clipped(AdamW(), max_global_norm=1.0), every_k=4)``.

The math is in `xpoptim._rules` (pure Array API); everything here works on every
backend, lazily on Dask (nothing is computed) and under ``jax.jit``.

Examples:
    >>> import numpy as np
    >>> from xpoptim import transforms
    >>> grads = {"a": np.array([3.0]), "b": np.array([4.0])}
    >>> float(transforms.global_norm(grads))
    5.0
    >>> clipped = transforms.clip_by_global_norm(grads, max_norm=1.0)
    >>> clipped["a"], clipped["b"]
    (array([0.6]), array([0.8]))
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from . import _nonfinite, _rules, _selection
from . import _validation as check
from ._compat import Array, Namespace
from ._execution import select as _select
from ._execution import updates_in_place
from ._optimizers import OPTIMIZERS, Optimizer

__all__ = [
    "Clipped",
    "MultiSteps",
    "MultiStepsState",
    "ParamGroups",
    "ParamGroupsState",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "from_config",
    "global_norm",
]


# -- clipping: pure functions on gradient dicts -----------------------------------------


def _namespace(grads: Mapping[str, Array]) -> Namespace:
    # None (no gradients) only reaches code that has nothing to loop over.
    return check.params(grads, "grads")


def clip_by_value(grads: Mapping[str, Array], max_value: float) -> dict[str, Array]:
    """Each gradient element clipped to ``[-max_value, max_value]``.

    Args:
        grads: parameter name -> gradient.
        max_value: the bound, > 0.

    Returns:
        New arrays (the input is not modified).
    """
    limit = check.positive(max_value, "max_value")
    xp = _namespace(grads)
    return {name: _rules.clip_by_value(g, limit=limit, xp=xp) for name, g in grads.items()}


def _scaled(g: Array, scale: Array, xp: Namespace) -> Array:
    # The factor in the gradient's own dtype, so a float32 gradient stays float32 when
    # the norm was accumulated from mixed dtypes.
    return g * xp.astype(scale, g.dtype)


def clip_by_norm(grads: Mapping[str, Array], max_norm: float) -> dict[str, Array]:
    """Each gradient rescaled, separately, to an L2 norm of at most ``max_norm``.

    ``g = g * max_norm / max(||g||, max_norm)`` (unchanged when ``||g|| <= max_norm``).

    Args:
        grads: parameter name -> gradient.
        max_norm: the bound on each gradient's norm, > 0.

    Returns:
        New arrays (the input is not modified).
    """
    bound = check.positive(max_norm, "max_norm")
    xp = _namespace(grads)
    out = {}
    for name, g in grads.items():
        norm = xp.sqrt(_rules.sum_of_squares(g, xp=xp))
        out[name] = _scaled(g, _rules.clip_scale(norm, max_norm=bound, xp=xp), xp)
    return out


def global_norm(grads: Mapping[str, Array]) -> Array:
    """The L2 norm of all gradients together, ``sqrt(sum over params of sum(g**2))``.

    A 0-d array of the gradients' (promoted) dtype; lazy on Dask.

    Raises:
        ValueError: ``grads`` is empty.
    """
    xp = _namespace(grads)
    if xp is None:
        raise ValueError("grads is empty: the global norm of no gradients is undefined")
    squares = [_rules.sum_of_squares(g, xp=xp) for g in grads.values()]
    total = squares[0]
    for s in squares[1:]:
        total = total + s
    return xp.sqrt(total)


def clip_by_global_norm(grads: Mapping[str, Array], max_norm: float) -> dict[str, Array]:
    """All gradients rescaled by one factor so that their global norm is at most ``max_norm``.

    ``g = g * max_norm / max(global_norm, max_norm)`` for every gradient: one reduction
    over all of them (on Dask, one lazy scalar that every gradient's graph shares).
    This is optax's ``clip_by_global_norm`` and, up to torch's ``1e-6`` added to the norm,
    ``torch.nn.utils.clip_grad_norm_``.

    Args:
        grads: parameter name -> gradient.
        max_norm: the bound on the global norm, > 0.

    Returns:
        New arrays (the input is not modified).
    """
    bound = check.positive(max_norm, "max_norm")
    xp = _namespace(grads)
    if xp is None:
        return {}
    scale = _rules.clip_scale(global_norm(grads), max_norm=bound, xp=xp)
    return {name: _scaled(g, scale, xp) for name, g in grads.items()}


# -- wrappers with the optimizer interface ---------------------------------------------------


class _Wrapper:
    """What every wrapper shares: the seed's ``step(layers)``, ``state`` and ``repr``."""

    def __init__(self) -> None:
        self._state: Any = None
        self._names: frozenset[str] | None = None

    def init(self, params: Mapping[str, Array]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(
        self, params: Mapping[str, Array], grads: Mapping[str, Array], state: Any
    ) -> tuple[dict[str, Array], Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, layers: Iterable[Any]) -> None:
        """Update the parameters of ``layers`` in place (the seed's protocol).

        As [`step`][xpoptim.Optimizer.step]; the set of parameters must stay the same from
        one call to the next.

        Raises:
            TypeError: a parameter cannot be updated in place (use ``update``).
            ValueError: the parameters differ from those of the first call.
        """
        params, grads = Optimizer._collect_in_place(layers)
        names = frozenset(params)
        if self._state is None:
            state = self.init(params)
        elif names != self._names:
            raise ValueError(
                f"{type(self).__name__}.step(layers) got parameters {sorted(names)}, "
                f"but was started with {sorted(self._names or ())}"
            )
        else:
            state = self._state
        _, self._state = self.update(params, grads, state)
        self._names = names

    @property
    def state(self) -> Any:
        """The state kept by ``step`` (``None`` before the first step)."""
        return self._state

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "type")
        return f"{type(self).__name__}({args})"


def _check_optimizer(optimizer: Any) -> Any:
    if not all(callable(getattr(optimizer, m, None)) for m in ("init", "update", "get_config")):
        raise TypeError(
            f"optimizer must be an xpoptim optimizer or wrapper, got {type(optimizer).__name__}"
        )
    return optimizer


class Clipped(_Wrapper):
    """An optimizer that clips the gradients first (Keras's ``clipvalue``, ``clipnorm``,
    ``global_clipnorm``; optax's ``chain(clip..., opt)``).

    The clips that are set run in this order: by value, by norm per parameter, by global
    norm (see [`clip_by_value`][], [`clip_by_norm`][], [`clip_by_global_norm`][]).
    The state is the wrapped optimizer's.

    Args:
        optimizer: the optimizer (or wrapper) that takes the clipped gradients.
        max_value: clip each element to ``[-max_value, max_value]``.
        max_norm: rescale each gradient to a norm of at most ``max_norm``.
        max_global_norm: rescale all gradients by one factor to a global norm of at most
            ``max_global_norm``.
    """

    def __init__(
        self,
        optimizer: Any,
        *,
        max_value: float | None = None,
        max_norm: float | None = None,
        max_global_norm: float | None = None,
    ) -> None:
        super().__init__()
        self.optimizer = _check_optimizer(optimizer)
        for name, value in (
            ("max_value", max_value),
            ("max_norm", max_norm),
            ("max_global_norm", max_global_norm),
        ):
            if value is not None:
                check.positive(value, name)
        if max_value is None and max_norm is None and max_global_norm is None:
            raise ValueError("Clipped needs max_value, max_norm or max_global_norm")
        self.max_value = max_value
        self.max_norm = max_norm
        self.max_global_norm = max_global_norm

    def clip(self, grads: Mapping[str, Array]) -> dict[str, Array]:
        """The clipped gradients (new arrays)."""
        out = dict(grads)
        if self.max_value is not None:
            out = clip_by_value(out, self.max_value)
        if self.max_norm is not None:
            out = clip_by_norm(out, self.max_norm)
        if self.max_global_norm is not None:
            out = clip_by_global_norm(out, self.max_global_norm)
        return out

    def init(self, params: Mapping[str, Array]) -> Any:
        """The wrapped optimizer's state."""
        return self.optimizer.init(params)

    def update(
        self, params: Mapping[str, Array], grads: Mapping[str, Array], state: Any
    ) -> tuple[dict[str, Array], Any]:
        """Clip ``grads``, then update as the wrapped optimizer (which checks everything
        before anything changes)."""
        xp = check.params(params)
        check.like_params(grads, params, xp, "grads")
        return self.optimizer.update(params, self.clip(grads), state)  # type: ignore[no-any-return]

    def get_config(self) -> dict[str, Any]:
        """The wrapped optimizer's config and the bounds; see [`from_config`][]."""
        return {
            "type": "Clipped",
            "optimizer": self.optimizer.get_config(),
            "max_value": self.max_value,
            "max_norm": self.max_norm,
            "max_global_norm": self.max_global_norm,
        }


def _policy(optimizer: Any) -> str:
    """The ``nonfinite`` policy of an optimizer, or of the one a wrapper wraps."""
    while not hasattr(optimizer, "nonfinite") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return str(getattr(optimizer, "nonfinite", "propagate"))


class MultiStepsState(NamedTuple):
    """State of [`MultiSteps`][].

    Attributes:
        mini_step: micro-batches accumulated since the last update, in ``[0, every_k)``.
        accumulated: parameter name -> sum of those gradients.
        inner: the wrapped optimizer's state.
    """

    mini_step: Any
    accumulated: dict[str, Array]
    inner: Any


class MultiSteps(_Wrapper):
    """Gradient accumulation: one update every ``every_k`` calls, on the mean gradient.

    The first ``every_k - 1`` calls of [`update`][MultiSteps.update] add the gradient to a
    running sum and return the parameters unchanged; the ``every_k``-th call updates them with the
    wrapped optimizer on ``sum / every_k`` and resets the sum. This is exactly one step
    on the averaged gradient of the ``every_k`` micro-batches (optax's ``MultiSteps``,
    Keras's ``gradient_accumulation_steps``); the wrapped optimizer's step count, and so
    its schedule, advances once per ``every_k`` calls.

    With a Python ``int`` ``mini_step`` (every backend outside ``jax.jit``) the choice is a
    Python branch. Under ``jax.jit`` ``mini_step`` is traced: the update is then computed
    on every call and selected with ``xp.where``, which costs an update per micro-batch.
    On Dask every call adds to the lazy graph: persist the state every few updates.

    Args:
        optimizer: the optimizer (or wrapper) that takes the mean gradient.
        every_k: micro-batches per update, an integer >= 1.
    """

    def __init__(self, optimizer: Any, every_k: int) -> None:
        super().__init__()
        self.optimizer = _check_optimizer(optimizer)
        self.every_k = check.positive_integer(every_k, "every_k")

    def init(self, params: Mapping[str, Array]) -> MultiStepsState:
        """Zero sums, ``mini_step == 0``, and the wrapped optimizer's initial state."""
        xp = check.params(params)
        accumulated = {name: xp.zeros_like(p) for name, p in params.items()}  # type: ignore[union-attr]
        return MultiStepsState(0, accumulated, self.optimizer.init(params))

    def update(
        self, params: Mapping[str, Array], grads: Mapping[str, Array], state: Any
    ) -> tuple[dict[str, Array], MultiStepsState]:
        """Accumulate ``grads``; every ``every_k``-th call, update with their mean.

        Returns:
            ``(params, state)``: the parameters as given on an accumulating call.
        """
        if not isinstance(state, MultiStepsState):
            raise TypeError(
                f"state must be a MultiStepsState from MultiSteps.init, got {type(state).__name__}"
            )
        xp: Namespace = check.params(params)
        check.like_params(grads, params, xp, "grads")
        check.like_params(state.accumulated, params, xp, "state.accumulated")
        mini = state.mini_step
        if not isinstance(mini, numbers.Integral) and any(
            updates_in_place(p) for p in params.values()
        ):
            # A concrete 0-d array on an eager backend (never a traced one, which is
            # immutable): read it, so that the in-place update runs only on the k-th call.
            mini = int(mini)
        if isinstance(mini, numbers.Integral) and not 0 <= int(mini) < self.every_k:
            raise ValueError(f"state.mini_step must be in [0, {self.every_k}), got {mini}")
        k = self.every_k
        if isinstance(mini, numbers.Integral):
            if int(mini) + 1 < k:
                # Under nonfinite="raise" a bad micro-batch is refused now: once in the
                # sum it would make every later k-th call raise. ("skip" drops the whole
                # window at the k-th call, and the sum restarts from zero.)
                if _policy(self.optimizer) == "raise":
                    _nonfinite.all_finite("raise", grads, xp)
                # Everything is checked: the running sum (the state's own buffer) may grow
                # in place.
                total = {
                    name: _rules.accumulate(state.accumulated[name], grads[name], xp=xp)
                    for name in params
                }
                return dict(params), MultiStepsState(int(mini) + 1, total, state.inner)
            # The k-th call: out of place, so that if the wrapped optimizer refuses its
            # state, the sum is as it was.
            mean = {name: (state.accumulated[name] + grads[name]) / k for name in params}
            new_params, inner = self.optimizer.update(params, mean, state.inner)
            zeros = {name: xp.zeros_like(a) for name, a in state.accumulated.items()}
            return new_params, MultiStepsState(0, zeros, inner)
        # Traced mini_step (jax.jit): compute the update and keep it only on the k-th call.
        total = {name: state.accumulated[name] + grads[name] for name in params}
        last = (mini + 1) >= k
        mean = {name: t / k for name, t in total.items()}
        cand_params, cand_inner = self.optimizer.update(params, mean, state.inner)
        new_params = {name: xp.where(last, cand_params[name], params[name]) for name in params}
        inner = _select(last, cand_inner, state.inner, xp)
        kept = {name: xp.where(last, xp.zeros_like(t), t) for name, t in total.items()}
        return new_params, MultiStepsState((mini + 1) % k, kept, inner)

    def get_config(self) -> dict[str, Any]:
        """The wrapped optimizer's config and ``every_k``; see [`from_config`][]."""
        return {
            "type": "MultiSteps",
            "optimizer": self.optimizer.get_config(),
            "every_k": self.every_k,
        }


class ParamGroupsState(NamedTuple):
    """State of [`ParamGroups`][].

    Attributes:
        groups: one state per group, in the order of ``groups``, then the default
            group's (the parameters that no group selects).
    """

    groups: tuple[Any, ...]


class ParamGroups(_Wrapper):
    """Groups of parameters with their own hyperparameters (torch's parameter groups).

    Each group is a dict with ``"params"`` -- name patterns or a predicate (see
    `xpoptim._selection`; a pattern with ``*``, ``?`` or ``[`` is a glob over the whole
    name, any other a substring) -- and the constructor arguments that differ from
    ``optimizer``'s, such as ``learning_rate`` or ``weight_decay``. A parameter belongs to
    the first group that selects it; the others keep ``optimizer``'s settings.

    Args:
        optimizer: the settings of the default group; each group is a copy of it with
            its own overrides (``type(optimizer).from_config``).
        groups: the groups.

    Examples:
        >>> import numpy as np
        >>> import xpoptim
        >>> opt = xpoptim.transforms.ParamGroups(
        ...     xpoptim.SGD(learning_rate=0.1, momentum=0.0, regularization=None),
        ...     [{"params": ["encoder.*"], "learning_rate": 0.01}],
        ... )
        >>> params = {"encoder.w": np.array([1.0]), "head.w": np.array([1.0])}
        >>> grads = {"encoder.w": np.array([1.0]), "head.w": np.array([1.0])}
        >>> params, state = opt.update(params, grads, opt.init(params))
        >>> params["encoder.w"], params["head.w"]
        (array([0.99]), array([0.9]))
    """

    def __init__(self, optimizer: Any, groups: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be an xpoptim Optimizer (SGD, Adam, Lion, ...), "
                f"got {type(optimizer).__name__}"
            )
        if isinstance(groups, Mapping) or not isinstance(groups, Sequence):
            raise TypeError(f"groups must be a sequence of dicts, got {type(groups).__name__}")
        self.optimizer = optimizer
        self.groups: list[dict[str, Any]] = []
        self._selectors: list[Any] = []
        self._optimizers: list[Optimizer] = []
        # The default group's learning rate object itself, not its config: a schedule
        # with state (ReduceOnPlateau) is then shared by the groups that do not override it.
        base = {**optimizer.get_config(), "learning_rate": optimizer.learning_rate}
        for i, group in enumerate(groups):
            if not isinstance(group, Mapping) or "params" not in group:
                raise TypeError(f"groups[{i}] must be a dict with a 'params' entry, got {group!r}")
            overrides = {k: v for k, v in group.items() if k != "params"}
            if "type" in overrides:
                raise ValueError(f"groups[{i}] cannot change the optimizer type")
            if "nonfinite" in overrides:
                raise ValueError(
                    f"groups[{i}] cannot change nonfinite: the policy decides for the whole "
                    "step, every group at once"
                )
            selector = _selection.check_selector(group["params"], f"groups[{i}]['params']")
            try:
                member = type(optimizer).from_config({**base, **overrides})
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"groups[{i}]: {exc}") from exc
            self.groups.append({"params": selector, **overrides})
            self._selectors.append(selector)
            self._optimizers.append(member)
        self._optimizers.append(optimizer)

    def group_of(self, name: str) -> int:
        """The index of the group of parameter ``name`` (``len(groups)`` for the default)."""
        for index, selector in enumerate(self._selectors):
            if _selection.matches(name, selector):
                return index
        return len(self._selectors)

    def _split(self, arrays: Mapping[str, Array]) -> list[dict[str, Array]]:
        parts: list[dict[str, Array]] = [{} for _ in self._optimizers]
        for name, a in arrays.items():
            parts[self.group_of(name)][name] = a
        return parts

    def init(self, params: Mapping[str, Array]) -> ParamGroupsState:
        """Each group's optimizer initialized on its own parameters."""
        check.params(params)
        parts = self._split(params)
        return ParamGroupsState(
            tuple(opt.init(part) for opt, part in zip(self._optimizers, parts, strict=True))
        )

    def update(
        self, params: Mapping[str, Array], grads: Mapping[str, Array], state: Any
    ) -> tuple[dict[str, Array], ParamGroupsState]:
        """Each group's optimizer updates its own parameters."""
        if not isinstance(state, ParamGroupsState) or len(state.groups) != len(self._optimizers):
            raise TypeError(
                f"state must be a ParamGroupsState from this ParamGroups.init, "
                f"got {type(state).__name__}"
            )
        xp = check.params(params)
        check.like_params(grads, params, xp, "grads")
        p_parts, g_parts = self._split(params), self._split(grads)
        # Check every group's settings and state before any group changes.
        for opt, part, sub in zip(self._optimizers, p_parts, state.groups, strict=True):
            opt._validate_hyperparameters()
            opt._check_state(sub, part, xp)
        # The nonfinite policy decides once for the whole step, before any group changes:
        # a NaN in one group skips (or refuses) every group's update.
        finite = _nonfinite.all_finite(self.optimizer.nonfinite, grads, xp)
        if finite is False:
            skipped = (sub._replace(skipped=(sub.skipped or 0) + 1) for sub in state.groups)
            return dict(params), ParamGroupsState(tuple(skipped))
        new_params: dict[str, Array] = {}
        new_states = []
        for opt, p_part, g_part, sub in zip(
            self._optimizers, p_parts, g_parts, state.groups, strict=True
        ):
            updated, new_sub = opt.update(p_part, g_part, sub)
            if finite is not None and finite is not True:  # lazy: the step's flag, not the group's
                updated, new_sub = _nonfinite.select(finite, (updated, new_sub), (p_part, sub), xp)
            new_params.update(updated)
            new_states.append(new_sub)
        return {name: new_params[name] for name in params}, ParamGroupsState(tuple(new_states))

    def get_config(self) -> dict[str, Any]:
        """The default group's optimizer config and the groups; see [`from_config`][].

        Groups selected by a predicate keep the callable (not JSON-serializable).
        """
        groups = [
            {**g, "params": list(g["params"]) if isinstance(g["params"], tuple) else g["params"]}
            for g in self.groups
        ]
        return {"type": "ParamGroups", "optimizer": self.optimizer.get_config(), "groups": groups}


_OPTIMIZERS: dict[str, Callable[..., Any]] = {
    name: cls.from_config for name, cls in OPTIMIZERS.items()
}


def from_config(config: Mapping[str, Any]) -> Any:
    """Rebuild an optimizer or wrapper from its ``get_config()`` output.

    Raises:
        ValueError: ``config["type"]`` names nothing that xpoptim knows.
    """
    config = dict(config)
    kind = config.pop("type", None)
    if kind in _OPTIMIZERS:
        return _OPTIMIZERS[kind]({"type": kind, **config})
    if kind == "Clipped":
        return Clipped(from_config(config.pop("optimizer")), **config)
    if kind == "MultiSteps":
        return MultiSteps(from_config(config.pop("optimizer")), **config)
    if kind == "ParamGroups":
        return ParamGroups(from_config(config.pop("optimizer")), **config)
    raise ValueError(f"config type {kind!r} is not an xpoptim optimizer or wrapper")
