"""Flat state: the buffers of small NumPy parameters laid side by side in one array.

`zeros_state` lays the state of parameters smaller than a block out in one flat buffer
per dtype, in the order in which the fast paths group them, so that a group's state is
one contiguous span: the blocked path then steps it through one view, the compiled path
through one segment table.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from .._compat import Array, Namespace
from .options import current_options

#: id(view) -> (weak reference to the view, its flat base, its offset in the base), for
#: the state views made by `zeros_state`. A group of small parameters whose state
#: views lie side by side in one base is updated through one view of the base, no copy.
_SPANS: dict[int, tuple[weakref.ref[np.ndarray], np.ndarray, int]] = {}


def register(view: np.ndarray, base: np.ndarray, offset: int) -> None:
    key = id(view)

    def forget(ref: weakref.ref[np.ndarray], key: int = key) -> None:
        entry = _SPANS.get(key)
        if entry is not None and entry[0] is ref:
            _SPANS.pop(key, None)

    _SPANS[key] = (weakref.ref(view, forget), base, offset)


def span(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """One writeable 1-D view covering ``arrays`` if they lie side by side, in order, in one
    registered flat buffer; else None."""
    first = _SPANS.get(id(arrays[0]))
    if first is None:
        return None
    base, start = first[1], first[2]
    end = start
    for a in arrays:
        entry = _SPANS.get(id(a))
        if entry is None or entry[1] is not base or entry[2] != end or entry[0]() is not a:
            return None
        end += a.size
    if not base.flags.writeable:
        return None
    return base[start:end]


def is_large(size: int, block_size: int) -> bool:
    """Whether a parameter is updated through views of its own arrays (else gathered with
    other small parameters into one block)."""
    return size >= block_size // 2


def group_key(dtype: Any, scalars: Mapping[str, Any]) -> tuple[Any, Hashable]:
    # One optimizer always builds these dicts in the same key order.
    return (dtype, tuple(scalars.items()))


def zeros_state(
    params: Mapping[str, Array],
    count: int,
    scalars: Callable[[str], Mapping[str, Any]],
    xp: Namespace,
) -> list[dict[str, Array]]:
    """``count`` dicts of zero buffers shaped like ``params`` (an optimizer's state).

    For plain NumPy parameters (fast path on), the buffers of parameters smaller than a
    block are views into one flat buffer per dtype, laid out in the order in which
    `run_rule` groups them (by dtype and rule scalars, ``scalars(name)``), so that a
    group's state is one contiguous span. Other buffers come from ``xp.zeros_like``
    (keeping shape, dtype, device and, for Dask, chunks).
    """
    options = current_options()
    if not (options.fast and all(type(p) is np.ndarray for p in params.values())):
        return [{name: xp.zeros_like(p) for name, p in params.items()} for _ in range(count)]
    made: list[dict[str, Array]] = [{} for _ in range(count)]
    buckets: dict[tuple[Any, Hashable], list[str]] = {}
    for name, p in params.items():
        if p.size == 0 or is_large(p.size, options.block_elements(p.dtype)):
            for buffers in made:
                buffers[name] = np.zeros_like(p)
        else:
            buckets.setdefault(group_key(p.dtype, scalars(name)), []).append(name)
    by_dtype: dict[Any, list[str]] = {}
    for (dtype, _), names in buckets.items():
        by_dtype.setdefault(dtype, []).extend(names)
    for dtype, names in by_dtype.items():
        total = sum(params[name].size for name in names)
        for buffers in made:
            flat = np.zeros(total, dtype=dtype)
            offset = 0
            for name in names:
                p = params[name]
                view = flat[offset : offset + p.size].reshape(p.shape)
                register(view, flat, offset)
                buffers[name] = view
                offset += p.size
    return [{name: buffers[name] for name in params} for buffers in made]


def relayout_state(
    params: Mapping[str, Array],
    state: Sequence[Mapping[str, Array]],
    scalars: Callable[[str], Mapping[str, Any]],
    xp: Namespace,
) -> list[dict[str, Array]]:
    """``state`` (buffers made elsewhere: loaded, unpickled) copied into the memory layout
    of `zeros_state` where the fast path would use one, else returned as it is.

    Plain NumPy only: a loaded state then steps as fast as a new one (a state of separate
    arrays gives the same results, through the slower gathered path).
    """
    if not state or not all(type(p) is np.ndarray for p in params.values()):
        return [dict(buffers) for buffers in state]
    layout = zeros_state(params, len(state), scalars, xp)
    for new, old in zip(layout, state, strict=True):
        for name, b in new.items():
            np.copyto(b, old[name])
    return layout
