"""The compiled path for NumPy arrays: one fused kernel call per group of parameters.

Parameters whose rule scalars are the same (one optimizer's parameters, but for decay
exclusions) form a group, stepped by one kernel over a table of segments: every small
parameter is one row, so a model of 2000 tensors costs one call, not 2000 rule
evaluations. A step large enough to pay for threads is cut into equal parts (at 64-element
boundaries, so no two threads write one cache line), one kernel call per thread from the
fast path's pool, which releases nothing to Python: the kernels run without the GIL.

Arrays are walked in memory order, so parameter, gradient and buffers must share a
memory layout (all C- or all Fortran-contiguous): others go to the blocked path.

The segment table is the step's plan. Parameters and state buffers are usually the same
arrays step after step (updated in place), so the table of a group is kept, with weak
references to its arrays, and reused while every one of them is still the same object;
only the gradients' addresses are read anew. Weak references, not ``id()``: an id can be
reused by a new array once the old one is gone, a dead weak reference cannot.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ..blocked import Item
from ..flat import group_key
from ..options import ExecutionOptions
from ..threads import POOL, TUNER, in_pool_thread
from .kernels import Kernel, NoKernel, numba_kernel

_STRIDED = NoKernel("parameter, gradient and state do not share one contiguous memory layout")

#: Below this many elements a step runs in the calling thread: starting threads would
#: cost more than they save (measured: about 20 us per handover).
PARALLEL_MIN_ELEMENTS = 1 << 17
#: At most this many pieces per thread (each at least PARALLEL_MIN_ELEMENTS long).
PIECES_PER_THREAD = 4


def run(
    rule: Callable[..., Any],
    items: Sequence[Item],
    shared: Mapping[str, Any],
    options: ExecutionOptions,
) -> dict[int, NoKernel]:
    """Step ``items`` through compiled kernels, in place.

    Returns:
        For each item not stepped (by position in ``items``), why.
    """
    groups: dict[Hashable, list[int]] = {}
    for position, item in enumerate(items):
        groups.setdefault(group_key(item.arrays[0].dtype, item.scalars), []).append(position)
    reasons: dict[int, NoKernel] = {}
    for positions in groups.values():
        first = items[positions[0]]
        scalars = {**shared, **first.scalars}
        roles = len(first.arrays) + 1
        kernel = numba_kernel(rule, roles, first.arrays[0].dtype, scalars)
        if isinstance(kernel, NoKernel):
            reasons.update(dict.fromkeys(positions, kernel))
            continue
        table, sizes, strided = _table(rule, [items[p] for p in positions], roles)
        for index in strided:
            reasons[positions[index]] = _STRIDED
        if len(sizes):
            launch(kernel, rule, table, sizes, kernel.arguments(scalars), options)
    return reasons


@dataclasses.dataclass
class _Plan:
    """A group's segment table, valid while its parameters and buffers are the same."""

    refs: list[list[weakref.ref[np.ndarray]]]  # per item: (p, *buffers)
    layouts: list[int]  # per item: the memory layouts p and its buffers share
    table: np.ndarray  # gradient column left to fill
    sizes: np.ndarray
    rows: list[int]  # the row of each item, or -1 where it cannot be walked


#: Plans of the latest groups stepped, least recently used first.
_PLANS: collections.OrderedDict[Hashable, _Plan] = collections.OrderedDict()
_PLANS_LOCK = threading.Lock()
_MAX_PLANS = 64


def _table(
    rule: Callable[..., Any], items: Sequence[Item], roles: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The segment table (one row per item: the addresses of ``p, g, *buffers``), the
    sizes, and the positions of the items that cannot be walked in one memory order."""
    from .numba_support import address_and_layout

    key = (rule, roles, tuple(item.name for item in items))
    with _PLANS_LOCK:
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
    if plan is None or not all(
        ref() is a
        for refs, item in zip(plan.refs, items, strict=True)
        for ref, a in zip(refs, item.arrays, strict=True)
    ):
        plan = _plan(items, roles)
        with _PLANS_LOCK:
            _PLANS[key] = plan
            while len(_PLANS) > _MAX_PLANS:
                _PLANS.popitem(last=False)
    table = plan.table.copy()
    strided = []
    for position, (item, row, layout) in enumerate(
        zip(items, plan.rows, plan.layouts, strict=True)
    ):
        if row < 0:
            strided.append(position)
            continue
        address, gradient_layout = address_and_layout(item.gradient)
        if not gradient_layout & layout:
            strided.append(position)
        table[row, 1] = address
    if strided:
        skip = set(strided)
        keep = [plan.rows[p] for p in range(len(items)) if p not in skip and plan.rows[p] >= 0]
        return table[keep], plan.sizes[keep], strided
    return table, plan.sizes, strided


def _plan(items: Sequence[Item], roles: int) -> _Plan:
    from .numba_support import address_and_layout

    refs: list[list[weakref.ref[np.ndarray]]] = []
    layouts: list[int] = []
    rows: list[int] = []
    table_rows: list[list[int]] = []
    sizes: list[int] = []
    for item in items:
        refs.append([weakref.ref(a) for a in item.arrays])
        p = item.arrays[0]
        common = 3
        row = [0] * roles
        for role, a in zip((0, *range(2, roles)), item.arrays, strict=True):
            row[role], layout = address_and_layout(a)
            common &= layout
        layouts.append(common)
        if common and p.size:
            rows.append(len(table_rows))
            table_rows.append(row)
            sizes.append(p.size)
        else:
            rows.append(-1)
    return _Plan(
        refs=refs,
        layouts=layouts,
        table=np.array(table_rows, dtype=np.intp).reshape(len(table_rows), roles),
        sizes=np.array(sizes, dtype=np.intp),
        rows=rows,
    )


def launch(
    kernel: Kernel,
    rule: Callable[..., Any],
    table: np.ndarray,
    sizes: np.ndarray,
    arguments: list[Any],
    options: ExecutionOptions,
) -> None:
    """Run ``kernel.in_place`` over the table, from as many threads as pay off."""
    total = int(sizes.sum())
    threads = options.threads()
    if total < PARALLEL_MIN_ELEMENTS or threads < 2 or in_pool_thread():
        kernel.in_place(table, sizes, *arguments)
        return
    key = (rule, "compiled", total.bit_length())
    chosen = TUNER.choose(key, threads) if options.tuned() else threads
    # A few pieces per thread, taken in turn: a thread that loses its core for a while
    # (another job) leaves its remaining pieces to the others instead of holding the step.
    parts = chosen * max(1, min(PIECES_PER_THREAD, total // (PARALLEL_MIN_ELEMENTS * chosen)))
    pieces = partition(table, sizes, parts, kernel.dtype.itemsize)
    start = time.perf_counter()
    tasks = [functools.partial(kernel.in_place, t, s, *arguments) for t, s in pieces]
    POOL.run(tasks, chosen)
    if options.tuned():
        TUNER.record(key, chosen, (time.perf_counter() - start) / total)


def partition(
    table: np.ndarray, sizes: np.ndarray, parts: int, itemsize: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(table, sizes)`` cut into at most ``parts`` pieces of near-equal element counts.

    Cuts fall on multiples of 64 elements of the whole step and may split a segment (its
    addresses are advanced by the offset); each piece is a new, C-contiguous table.
    """
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    target = 64 * -(-total // (parts * 64))
    pieces = []
    row, offset = 0, 0  # where the next piece starts: segment, element within it
    for cut in range(target, total + target, target):
        cut = min(cut, total)
        last = int(np.searchsorted(ends, cut, side="left"))  # the segment holding cut - 1
        t = table[row : last + 1].copy()
        s = sizes[row : last + 1].copy()
        s[-1] = cut - (int(ends[last]) - int(sizes[last]))  # its elements before the cut
        t[0] += offset * itemsize
        s[0] -= offset
        pieces.append((t, s))
        if cut == int(ends[last]):
            row, offset = last + 1, 0
        else:
            row, offset = last, int(s[-1]) + (offset if last == row else 0)
        if cut == total:
            break
    return pieces
