"""The blocked path: the unchanged rule over cache-sized blocks, from a few threads.

Plain, writeable NumPy arrays where no compiled kernel is available (numba missing,
``execution_options(compile=False)``, or a rule the tracer cannot compile): the same
rule runs over cache-sized blocks (views of the flattened arrays) with its in-place
operators, from a few threads (NumPy releases the GIL in its loops). Parameters smaller
than a block are packed into groups with identical rule scalars: their parameters and
gradients are gathered into a per-thread, block-sized scratch buffer (the state already
lies side by side in one flat buffer per dtype, laid out by `zeros_state`), so one rule
call covers many parameters. Every element goes through the same operations in the same
order as on the plain path, so the results are bit-identical; temporaries are at most
block-sized, and memory is streamed about once per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .._compat import Array, Namespace
from .flat import group_key, is_large
from .flat import span as flat_span
from .options import ExecutionOptions
from .threads import POOL, TUNER, in_pool_thread

Rule = Callable[..., tuple[Array, ...]]


@dataclasses.dataclass(slots=True)
class Item:
    """One parameter on a NumPy fast path: its name, (parameter, *state buffers), its
    gradient, and the rule scalars of this parameter (those shared by all come
    separately)."""

    name: str
    arrays: Sequence[np.ndarray]
    gradient: np.ndarray
    scalars: Mapping[str, Any]


def run(
    rule: Rule,
    items: Sequence[Item],
    shared: Mapping[str, Any],
    options: ExecutionOptions,
    xp: Namespace,
) -> None:
    """Step ``items`` in place: blocks and groups from the pool, threads tuned if not set."""
    tasks = _tasks(rule, items, shared, options, xp)
    threads = options.threads()
    if len(tasks) < 2 or threads < 2 or not options.tuned() or in_pool_thread():
        POOL.run(tasks, threads)
        return
    elements = sum(item.arrays[0].size for item in items)
    key = (rule, elements.bit_length())  # a kind of step: its rule and size class
    chosen = TUNER.choose(key, threads)
    start = time.perf_counter()
    POOL.run(tasks, chosen)
    TUNER.record(key, chosen, (time.perf_counter() - start) / elements)


def _tasks(
    rule: Rule,
    items: Sequence[Item],
    shared: Mapping[str, Any],
    options: ExecutionOptions,
    xp: Namespace,
) -> list[Callable[[], None]]:
    """Independent tasks that together apply the rule to every item once."""
    tasks: list[Callable[[], None]] = []
    groups: dict[Hashable, list[Item]] = {}
    blocks: dict[Any, int] = {}
    for item in items:
        p = item.arrays[0]
        block_size = blocks.get(p.dtype) or blocks.setdefault(
            p.dtype, options.block_elements(p.dtype)
        )
        if is_large(p.size, block_size):
            scalars = {**shared, **item.scalars}
            tasks.extend(_block_tasks(rule, item, scalars, block_size, xp))
        else:
            groups.setdefault(group_key(p.dtype, item.scalars), []).append(item)
    for members in groups.values():
        scalars = {**shared, **members[0].scalars}
        block_size = options.block_elements(members[0].arrays[0].dtype)
        packed: list[Item] = []
        size = 0
        for item in members:
            n = item.arrays[0].size
            if packed and size + n > block_size:
                tasks.append(functools.partial(_group_task, rule, packed, size, scalars, xp))
                packed, size = [], 0
            packed.append(item)
            size += n
        tasks.append(functools.partial(_group_task, rule, packed, size, scalars, xp))
    return tasks


def _block_tasks(
    rule: Rule, item: Item, scalars: Mapping[str, Any], block_size: int, xp: Namespace
) -> list[Callable[[], None]]:
    """Tasks over blocks of one parameter, each a view of every array (no copies)."""
    every = (*item.arrays, item.gradient)
    if all(a.flags.c_contiguous for a in every):
        flats = [a.reshape(-1) for a in every]
    elif all(a.flags.f_contiguous for a in every):
        flats = [a.T.reshape(-1) for a in every]
    else:
        return [
            functools.partial(_block_task, rule, every, index, scalars, xp)
            for index in _index_blocks(every[0].shape, block_size)
        ]
    n = flats[0].size
    # Near-equal blocks, each a whole number of 64-element (cache-line multiple) chunks,
    # so that two threads never write the same cache line.
    step = 64 * math.ceil(n / math.ceil(n / block_size) / 64)
    return [
        functools.partial(_block_task, rule, flats, slice(start, start + step), scalars, xp)
        for start in range(0, n, step)
    ]


def _index_blocks(shape: tuple[int, ...], block_size: int) -> Iterator[tuple[Any, ...]]:
    """Index tuples splitting an array of ``shape`` into pieces of at most ``block_size``
    elements (or one row of the last axis), whatever its strides; the last index is
    always a slice, so every piece is a view."""
    rest = math.prod(shape[1:])
    if rest <= block_size:
        rows = max(1, block_size // max(rest, 1))
        for start in range(0, shape[0], rows):
            yield (slice(start, start + rows),)
        return
    for i in range(shape[0]):
        for inner in _index_blocks(shape[1:], block_size):
            yield (i, *inner)


def _block_task(
    rule: Rule,
    arrays: Sequence[np.ndarray],
    index: Any,
    scalars: Mapping[str, Any],
    xp: Namespace,
) -> None:
    p, *buffers, gradient = (a[index] for a in arrays)
    _write_back((p, *buffers), rule(p, gradient, *buffers, xp=xp, **scalars))


def _write_back(views: Sequence[np.ndarray], results: Sequence[np.ndarray]) -> None:
    """Copy into ``views`` the results the rule returned as new arrays (it rebound them)."""
    for view, result in zip(views, results, strict=True):
        if result is not view:
            np.copyto(view, result)


_scratch_local = threading.local()


def _scratch(dtype: Any, rows: int, size: int) -> np.ndarray:
    """This thread's reusable ``(rows, >= size)`` buffer of ``dtype`` for gathering."""
    cache: dict[Any, np.ndarray] = _scratch_local.__dict__.setdefault("buffers", {})
    buffer = cache.get(dtype)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] < size:
        rows = max(rows, 0 if buffer is None else buffer.shape[0])
        size = max(size, 0 if buffer is None else buffer.shape[1])
        buffer = cache[dtype] = np.empty((rows, size), dtype=dtype)
    return buffer


def _group_task(
    rule: Rule,
    items: Sequence[Item],
    size: int,
    scalars: Mapping[str, Any],
    xp: Namespace,
) -> None:
    """Apply the rule once to a group of small parameters with identical scalars.

    Each role (parameter, state buffers, gradient) is one contiguous 1-D span: a view of
    the flat state when the group's buffers lie side by side there, else a gather into
    this thread's scratch buffer; gathered parameters and buffers are scattered back.
    """
    roles = len(items[0].arrays) + 1
    scratch = _scratch(items[0].arrays[0].dtype, roles, size)
    spans: list[np.ndarray] = []
    scatter: list[tuple[list[np.ndarray], np.ndarray]] = []
    for role in range(roles):
        if role < roles - 1:
            arrays = [item.arrays[role] for item in items]
        else:
            arrays = [item.gradient for item in items]
        span = flat_span(arrays)
        if span is None:
            span = scratch[role, :size]
            np.concatenate(arrays, axis=None, out=span)
            if role < roles - 1:
                scatter.append((arrays, span))
        spans.append(span)
    p, *buffers, gradient = spans
    _write_back((p, *buffers), rule(p, gradient, *buffers, xp=xp, **scalars))
    for arrays, span in scatter:
        offset = 0
        for a in arrays:
            np.copyto(a, span[offset : offset + a.size].reshape(a.shape))
            offset += a.size
