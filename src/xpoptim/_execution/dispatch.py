"""Which path each parameter's step takes, and running it: `run_rule`.

For each parameter, the first path that applies:

1. **compiled** -- one fused kernel generated from the rule (`xpoptim._execution.compiled`):
   plain NumPy arrays (many parameters per kernel call, threads for large steps), Dask
   arrays of NumPy chunks (one task per chunk, lazily), CuPy arrays (one CUDA launch) and
   PyTorch CPU tensors (in place, through views of their memory).
2. **blocked** -- plain NumPy arrays the compiler does not take (numba missing,
   ``compile=False``, mixed memory layouts, NumPy-scalar hyperparameters): the rule over
   cache-sized blocks (`xpoptim._execution.blocked`).
3. **plain** -- everything else, a rule the tracer cannot follow (it may not be
   elementwise: a reduction must see the whole array), and everything under
   ``execution_options(fast=False)``: the rule once per whole array
   (`xpoptim._execution.plain`).

All three give the same bits. `explain` says which path each parameter took the last
time it was stepped in this thread, and why it did not take a faster one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._compat import Array, Namespace
from . import blocked
from .blocked import Item
from .compiled import accelerated, numpy_path
from .compiled.kernels import NoKernel, elementwise
from .options import ExecutionOptions, current_options
from .plain import apply_rule

Rule = Callable[..., tuple[Array, ...]]


@dataclasses.dataclass(frozen=True)
class StepPath:
    """How a parameter was stepped.

    Attributes:
        path: ``"compiled"``, ``"blocked"`` or ``"plain"``.
        reason: why no faster path was taken (empty for ``"compiled"``).
    """

    path: str
    reason: str = ""


_COMPILED = StepPath("compiled")
_NOT_COMPILED = NoKernel("compile=False")
_local = threading.local()


def _record(names: Sequence[str], how: StepPath) -> None:
    paths: dict[str, StepPath] = _local.__dict__.setdefault("paths", {})
    paths.update(dict.fromkeys(names, how))


def explain() -> dict[str, StepPath]:
    """The path each parameter took the last time this thread stepped it, and why.

    Examples:
        >>> import numpy as np
        >>> import xpoptim
        >>> opt = xpoptim.Adam()
        >>> params = {"w": np.zeros(4, np.float32)}
        >>> params, state = opt.update(params, {"w": np.ones(4, np.float32)}, opt.init(params))
        >>> xpoptim.explain()["w"].path in ("compiled", "blocked")
        True
    """
    return dict(_local.__dict__.get("paths", {}))


def _plain(arrays: Sequence[Array]) -> bool:
    """Whether every array is a plain NumPy array."""
    return {*map(type, arrays)} <= {np.ndarray}


def _blockable(arrays: Sequence[Array]) -> bool:
    """Whether the NumPy fast paths take these arrays: plain NumPy arrays, not empty."""
    for a in arrays:
        if type(a) is not np.ndarray:
            return False
    return bool(arrays[0].size)


def run_rule(
    rule: Rule,
    params: Mapping[str, Array],
    grads: Mapping[str, Array],
    state: Sequence[Mapping[str, Array]],
    *,
    shared: Mapping[str, Any],
    per_param: Callable[[str], Mapping[str, Any]],
    xp: Namespace,
) -> tuple[dict[str, Array], list[dict[str, Array]]]:
    """Apply ``rule`` to every parameter: ``rule(p, g, *buffers, xp=xp, **scalars)``.

    Args:
        rule: an elementwise update rule from `xpoptim._rules`.
        params: parameter name -> parameter.
        grads: parameter name -> gradient (never written).
        state: the state buffers, one mapping per buffer of the rule, in its order.
        shared: the rule's scalars common to every parameter.
        per_param: name -> the rule's scalars for that parameter.
        xp: the namespace of all arrays.

    Returns:
        ``(new_params, new_state)``, ``new_state`` in the order of ``state``.
    """
    options = current_options()
    names = list(params)
    # Every parameter's scalars before any rule runs: ``per_param`` may call user code
    # (a ``no_decay`` predicate), and an error there must leave nothing half-updated.
    scalars = {name: per_param(name) for name in names}
    columns = [list(params.values()), *[[buffers[name] for name in names] for buffers in state]]
    gradients = [grads[name] for name in names]
    if not _plain(gradients):
        # NumPy arithmetic on 0-d arrays gives NumPy scalars (a clipped 0-d gradient):
        # read-only 0-d arrays of the same value, for the fast paths.
        gradients = [np.asarray(g) if isinstance(g, np.generic) else g for g in gradients]
        grads = dict(zip(names, gradients, strict=True))
    if options.fast and all(_plain(column) for column in (gradients, *columns)):
        # The common case, every array a NumPy array: column-wise bookkeeping.
        # Read-only inputs are updated on a private copy (same memory layout).
        columns = [
            [a if a.flags.writeable else a.copy(order="K") for a in column] for column in columns
        ]
        items = [
            Item(name, arrays, gradient, scalars[name])
            for name, gradient, *arrays in zip(names, gradients, *columns, strict=True)
            if arrays[0].size
        ]
        _run_numpy(rule, items, shared, options, xp)
        return dict(zip(names, columns[0], strict=True)), [
            dict(zip(names, column, strict=True)) for column in columns[1:]
        ]
    new_params: dict[str, Array] = {}
    new_state: list[dict[str, Array]] = [{} for _ in state]
    fast: list[Item] = []
    for name, p in params.items():
        updated = (p, *[buffers[name] for buffers in state])
        gradient = grads[name]
        if options.fast and type(gradient) is np.ndarray and _blockable(updated):
            # Read-only inputs are updated on a private copy (same memory layout).
            results: Sequence[Array] = [
                a if a.flags.writeable else a.copy(order="K") for a in updated
            ]
            fast.append(Item(name, results, gradient, scalars[name]))
        else:
            results = _run_other(rule, name, updated, gradient, {**shared, **scalars[name]}, xp)
        new_params[name] = results[0]
        for buffers, new in zip(new_state, results[1:], strict=True):
            buffers[name] = new
    if fast:
        _run_numpy(rule, fast, shared, options, xp)
    return new_params, new_state


def _run_numpy(
    rule: Rule,
    items: Sequence[Item],
    shared: Mapping[str, Any],
    options: ExecutionOptions,
    xp: Namespace,
) -> None:
    """Step NumPy ``items`` in place: compiled where possible, then blocked, then plain."""
    if options.compile:
        reasons = numpy_path.run(rule, items, shared, options)
    else:
        reasons = {}
        seen: dict[Any, NoKernel] = {}
        for position, item in enumerate(items):
            key = tuple(item.scalars.items())
            if key not in seen:
                refusal = elementwise(rule, len(item.arrays) + 1, {**shared, **item.scalars})
                seen[key] = refusal or _NOT_COMPILED
            reasons[position] = seen[key]
    _record([item.name for i, item in enumerate(items) if i not in reasons], _COMPILED)
    rest = []
    for position, refusal in reasons.items():
        item = items[position]
        if refusal.untraceable:
            scalars = {**shared, **item.scalars}
            p, *buffers = item.arrays
            apply_rule(rule, (p, *buffers), item.gradient, xp=xp, **scalars)
            _record([item.name], StepPath("plain", refusal.reason))
        else:
            rest.append(item)
            _record([item.name], StepPath("blocked", refusal.reason))
    if rest:
        blocked.run(rule, rest, shared, options, xp)


def _run_other(
    rule: Rule,
    name: str,
    updated: tuple[Array, ...],
    gradient: Array,
    scalars: Mapping[str, Any],
    xp: Namespace,
) -> tuple[Array, ...]:
    """Step one parameter that the NumPy paths do not take: compiled for Dask and CuPy
    arrays where possible, else on the plain path."""
    options = current_options()
    if not options.fast:
        reason = "fast=False"
    elif not options.compile:
        reason = "compile=False"
    else:
        outcome = accelerated.step(rule, updated, gradient, scalars)
        if not isinstance(outcome, NoKernel):
            _record([name], _COMPILED)
            return outcome
        reason = outcome.reason
    _record([name], StepPath("plain", reason))
    return apply_rule(rule, updated, gradient, xp=xp, **scalars)
