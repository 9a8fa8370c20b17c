"""A step plan for ``optimizer.step(layers)``: the per-step Python work paid once.

A model's structure does not change from one step to the next: the same layers hold the
same parameter arrays (updated in place), the state buffers are the same arrays, the
rule and its per-parameter scalars are the same. `StepPlan` records all of that after a
full (validated) step and, at the next steps, only re-checks what can change:

* the optimizer's state object, execution options and hyperparameters are the ones the
  plan was made with (identity or equality: one comparison each);
* each layer still holds the same parameter objects, under the same names, writeable,
  and the state still holds the same buffer objects (a buffer replaced in the state's
  dictionaries must not be left stale, let alone written after it was freed);
* each gradient is a NumPy array of its parameter's shape, dtype and a memory layout the
  kernel can walk.

Anything else (a new layer, a replaced array, another dtype, a state loaded from a file,
``nonfinite`` other than ``"propagate"``) makes the optimizer take its full path, which
validates everything and builds a new plan. A step through the plan computes what the
full path computes, with the same kernels: the same bits.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ..blocked import Item
from ..flat import group_key
from ..options import ExecutionOptions
from .ir import GuardFailed
from .kernels import NUMBA_MISSING, Kernel, NoKernel, numba_kernel
from .numpy_path import launch


@dataclasses.dataclass
class _Group:
    """Parameters stepped by one kernel call: same dtype, same per-parameter scalars."""

    kernel: Kernel
    scalars: Mapping[str, Any]  # the per-parameter ones
    positions: list[int]  # of its parameters in the plan's order
    layouts: list[int]  # the memory layouts each parameter shares with its buffers
    table: np.ndarray  # gradient column to fill
    sizes: np.ndarray


@dataclasses.dataclass
class StepPlan:
    """What a ``step(layers)`` did, to do again without re-deriving it."""

    rule: Callable[..., Any]
    key: Hashable  # the optimizer's hyperparameters
    state: Any  # the optimizer's state object after the planned step
    options: ExecutionOptions
    layers: list[tuple[int, list[str]]]  # (layer index, parameter names) with parameters
    names: list[str]  # each parameter's state key, in the plan's order
    params: list[weakref.ref[np.ndarray]]
    fields: list[dict[str, np.ndarray]]  # the state's buffer dictionaries
    buffers: list[list[weakref.ref[np.ndarray]]]  # per parameter, one per field
    groups: list[_Group]

    def gradients(self, layers: Sequence[Any]) -> list[np.ndarray] | None:
        """The gradients of ``layers`` in the plan's order, or None if anything differs
        from the planned structure (the full path then takes the step)."""
        out: list[np.ndarray] = []
        planned = iter(self.layers)
        index, names = next(planned, (-1, []))
        for position, layer in enumerate(layers):
            params = getattr(layer, "params", None)
            if params is None:
                if position == index or hasattr(layer, "params"):
                    return None
                continue
            if position != index or type(params) is not dict or len(params) != len(names):
                return None
            for name, pair in zip(names, params.items(), strict=True):
                if pair[0] != name or type(pair[1]) not in (tuple, list) or len(pair[1]) != 2:
                    return None
                p, g = pair[1]
                planned_p = self.params[len(out)]()
                if planned_p is None or p is not planned_p:
                    return None
                if (
                    type(g) is not np.ndarray
                    or g.shape != planned_p.shape
                    or g.dtype != planned_p.dtype
                    or not planned_p.flags.writeable
                ):
                    return None
                out.append(g)
            index, names = next(planned, (-1, []))
        if index != -1:
            return None
        for name, refs in zip(self.names, self.buffers, strict=True):
            for field, ref in zip(self.fields, refs, strict=True):
                if field.get(name) is not ref():
                    return None
        return out

    def run(self, gradients: list[np.ndarray], shared: Mapping[str, Any]) -> bool:
        """Step every parameter with ``gradients``; False, with nothing done, if a
        gradient's memory layout differs from its parameter's or a hyperparameter's truth
        value differs from the one a group's kernel was traced for (everything is checked
        before the first kernel runs: never half a step)."""
        from .numba_support import address_and_layout

        try:
            arguments = [
                group.kernel.arguments({**shared, **group.scalars}) for group in self.groups
            ]
        except GuardFailed:
            return False
        tables = []
        for group in self.groups:
            table = group.table.copy()
            for row, (position, layout) in enumerate(
                zip(group.positions, group.layouts, strict=True)
            ):
                address, gradient_layout = address_and_layout(gradients[position])
                if not gradient_layout & layout:
                    return False
                table[row, 1] = address
            tables.append(table)
        for group, table, args in zip(self.groups, tables, arguments, strict=True):
            launch(group.kernel, table, group.sizes, args, self.options)
        return True


def build(
    rule: Callable[..., Any],
    key: Hashable,
    state: Any,
    options: ExecutionOptions,
    layers: Sequence[Any],
    items: Sequence[Item],
    shared: Mapping[str, Any],
    fields: Sequence[dict[str, np.ndarray]],
) -> StepPlan | None:
    """A plan for stepping ``layers`` as the full path just did, or None if the plan
    could not reproduce it (no kernel for a group, a strided array, an empty one).

    Args:
        rule: the rule the full path ran.
        key: the optimizer's hyperparameters (the plan is valid while they compare equal).
        state: the optimizer's state object after the step.
        options: the execution options in force.
        layers: the layers just stepped (a list or tuple).
        items: each parameter, in the order of the layers: the parameter and its state
            buffers, its gradient and its per-parameter scalars.
        shared: the scalars common to all parameters at that step (for the kernels'
            signatures; their values are taken anew at each step).
        fields: the state's buffer dictionaries (``state.momentums``, ...), in the
            order of each item's buffers.
    """
    if not (options.fast and options.compile) or NUMBA_MISSING is not None:
        return None
    from .numba_support import address_and_layout

    planned_layers = []
    for index, layer in enumerate(layers):
        params = getattr(layer, "params", None)
        if params is not None:
            if type(params) is not dict:
                return None
            planned_layers.append((index, list(params)))
    groups: dict[Hashable, list[int]] = {}
    for position, item in enumerate(items):
        if any(type(a) is not np.ndarray or not a.size for a in item.arrays):
            return None
        groups.setdefault(group_key(item.arrays[0].dtype, item.scalars), []).append(position)
    planned_groups = []
    for positions in groups.values():
        first = items[positions[0]]
        roles = len(first.arrays) + 1
        kernel = numba_kernel(rule, roles, first.arrays[0].dtype, {**shared, **first.scalars})
        if isinstance(kernel, NoKernel):
            return None
        rows, layouts, sizes = [], [], []
        for position in positions:
            item = items[position]
            row = [0] * roles
            common = 3
            for role, a in zip((0, *range(2, roles)), item.arrays, strict=True):
                row[role], layout = address_and_layout(a)
                common &= layout
            if not common:
                return None
            rows.append(row)
            layouts.append(common)
            sizes.append(item.arrays[0].size)
        planned_groups.append(
            _Group(
                kernel=kernel,
                scalars=dict(first.scalars),
                positions=positions,
                layouts=layouts,
                table=np.array(rows, dtype=np.intp),
                sizes=np.array(sizes, dtype=np.intp),
            )
        )
    return StepPlan(
        rule=rule,
        key=key,
        state=state,
        options=options,
        layers=planned_layers,
        names=[item.name for item in items],
        params=[weakref.ref(item.arrays[0]) for item in items],
        fields=list(fields),
        buffers=[[weakref.ref(b) for b in item.arrays[1:]] for item in items],
        groups=planned_groups,
    )
