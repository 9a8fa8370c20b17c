"""How an update rule is executed on a given backend: the one backend-aware module.

The rules in `xpoptim._rules` are pure math. This module decides, per array, how
they run: on the plain path from the capabilities that array-api-compat reports, on the
fast path for plain ``numpy.ndarray`` arrays only (`run_rule`):

* **in place** -- eager, writeable arrays (NumPy, CuPy, PyTorch, array-api-strict): the
  rule's in-place operators update the parameter and state buffers where they are;
* **rebinding** -- arrays whose type has no in-place operators (JAX, Dask): the same
  statements build new arrays (for Dask, a lazy graph: nothing is computed here);
* **on a copy** -- eager arrays that have in-place operators but are read-only (a NumPy
  view of a read-only buffer): the rule runs on a private copy, so the caller's array is
  never written;
* **blocked** (the fast path) -- plain, writeable NumPy arrays: the same rule runs over
  cache-sized blocks (views of the flattened arrays) with its in-place operators, from a
  few threads (NumPy releases the GIL in its loops). Parameters smaller than a block are
  packed into groups with identical rule scalars: their parameters and gradients are
  gathered into a per-thread, block-sized scratch buffer (the state already lies side by
  side in one flat buffer per dtype, laid out by `zeros_state`), so one rule call
  covers many parameters. Every element goes through the same operations in the same
  order as on the plain path, so the results are bit-identical; temporaries are at most
  block-sized, and memory is streamed about once per step.

Gradients are inputs only: no rule writes to them. Parameters (and state buffers) must
not overlap one another: tied weights are passed once.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ._compat import (
    Array,
    Namespace,
    device,
    is_lazy_array,
    is_torch_array,
    is_writeable_array,
    to_device,
)
from ._threads import (
    ENV_VAR,
    POOL,
    TUNER,
    available_cpus,
    default_num_threads,
    in_pool_thread,
)

Rule = Callable[..., tuple[Array, ...]]


def updates_in_place(x: Array) -> bool:
    """Whether a rule run on ``x`` changes ``x`` itself (eager and writeable)."""
    return bool(is_writeable_array(x)) and not bool(is_lazy_array(x))


def _has_inplace_operators(x: Array) -> bool:
    return hasattr(type(x), "__iadd__")


def owned(x: Array, xp: Namespace) -> Array:
    """``x`` in a form the rule may update: itself, or a private copy if it is read-only.

    PyTorch tensors that require grad are updated through ``detach()`` (same storage).
    Lazy arrays (checked first: Dask arrays also report themselves writeable) and arrays
    without in-place operators are returned as they are, since the rule's augmented
    assignments rebind them instead of writing.
    """
    if is_torch_array(x) and x.requires_grad:
        # A leaf tensor of an autograd graph: update its data, as torch.optim does
        # under ``no_grad`` (``detach`` shares the storage).
        return x.detach()
    if is_lazy_array(x) or not _has_inplace_operators(x) or is_writeable_array(x):
        return x
    return xp.asarray(x, copy=True)


def apply_rule(
    rule: Callable[..., tuple[Array, ...]],
    updated: tuple[Array, ...],
    gradient: Array,
    *,
    xp: Namespace,
    **hyper: Any,
) -> tuple[Array, ...]:
    """Run ``rule(p, g, *buffers, xp=xp, **hyper)`` and return its results.

    Args:
        rule: an elementwise update rule from `xpoptim._rules`.
        updated: the parameter followed by its state buffers, in the rule's order.
        gradient: the gradient; never written.
        xp: the namespace of all arrays.
        **hyper: the rule's Python-scalar hyperparameters.

    Returns:
        The rule's results: the same objects as ``updated`` where the arrays were updated
        in place, new arrays otherwise.
    """
    mine = [owned(x, xp) for x in updated]
    results = rule(mine[0], gradient, *mine[1:], xp=xp, **hyper)
    out = []
    for old, given, new in zip(updated, mine, results, strict=True):
        if not updates_in_place(old):
            out.append(new)
            continue
        if new is not given:
            # The rule rebound this array (``v = xp.maximum(v, w)``) where it could have
            # written it: put the value where the caller's array lives.
            given[...] = new
        # The caller's own object (for a PyTorch leaf tensor the rule saw its alias).
        out.append(old)
    return tuple(out)


def select(flag: Array, new: Any, old: Any, xp: Namespace) -> Any:
    """``new`` where the 0-d boolean ``flag`` holds, else ``old``, over nested state.

    Lazy and traceable (``xp.where``): how Dask and ``jax.jit`` keep a data-dependent
    choice without reading ``flag``. ``None`` entries (unused state fields) stay ``None``.
    """
    if new is None:
        return None
    if isinstance(new, Mapping):
        return {k: select(flag, new[k], old[k], xp) for k in new}
    if isinstance(new, tuple):
        parts = [select(flag, n, o, xp) for n, o in zip(new, old, strict=True)]
        return type(new)(*parts) if hasattr(new, "_fields") else tuple(parts)
    return xp.where(flag, new, old)


def scalars_like(scalars: dict[str, Any], p: Array, xp: Namespace) -> dict[str, Any]:
    """``scalars`` with each array among them cast to ``p``'s dtype (Python scalars kept).

    Per-step scalars become 0-d arrays when the step counter is an array (traced by
    ``jax.jit``, or selected lazily by ``nonfinite="skip"``); a float64 0-d array would
    promote float32 parameters and state under NumPy's rules (Dask follows them).
    """
    return {
        key: xp.astype(value, p.dtype)
        if hasattr(value, "dtype") and value.dtype != p.dtype
        else value
        for key, value in scalars.items()
    }


def values_readable(x: Array) -> bool:
    """Whether ``bool(x)``/``int(x)`` on ``x`` is cheap and possible (not lazy, not traced)."""
    return not bool(is_lazy_array(x))


def to_host(x: Array) -> np.ndarray[Any, Any]:
    """``x`` as a NumPy array in host memory (computing it if it is lazy).

    The result may share memory with ``x``: copy it before ``x`` can change.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_torch_array(x):
        x = x.detach()  # DLPack refuses tensors that require grad
    attempts = (
        # CPU arrays of every backend, array-api-strict's emulated devices too: no copy.
        lambda: np.from_dlpack(x),
        # Device arrays (CuPy, CUDA tensors: a copy to the host); Dask: computed.
        lambda: np.asarray(to_device(x, "cpu")),
        # Anything else NumPy can convert (JAX on an accelerator).
        lambda: np.asarray(x),
    )
    errors = []
    for attempt in attempts:
        try:
            return np.asarray(attempt())
        except Exception as exc:  # each library raises its own kind
            errors.append(f"{type(exc).__name__}: {exc}")
    raise TypeError(
        f"cannot bring a {type(x).__module__}.{type(x).__name__} to host memory: "
        + "; ".join(errors)
    )


def place(
    x: Array, xp: Namespace, *, dtype: Any = None, device: Any = None, like: Array = None
) -> Array:
    """A new array of namespace ``xp`` with the values of ``x``, which may come from any backend.

    Args:
        x: an array of any namespace (or NumPy).
        xp: the target namespace.
        dtype: the target dtype (``x``'s own by default, as ``xp`` spells it).
        device: the target device (``xp``'s default by default).
        like: an array of ``xp`` whose chunks to copy where arrays are chunked (Dask).

    Returns:
        An array that shares no memory with ``x``.
    """
    host = to_host(x)
    if dtype is None:
        out = xp.asarray(host, copy=True, device=device)
    else:
        out = xp.asarray(host, dtype=dtype, copy=True, device=device)
    chunks = getattr(like, "chunks", None)
    if chunks is not None and hasattr(out, "rechunk"):
        out = out.rechunk(chunks)
    return out


# -- lazy (Dask) graphs: one step, then commit ---------------------------------------------

#: A lazy parameter whose graph has more layers than this makes ``update`` warn: 30 to 40
#: chained Adam steps (13 to 17 layers each), well below the ~90 where Dask fails.
MAX_LAZY_LAYERS = 512


class LazyGraphWarning(UserWarning):
    """Lazy steps are being chained without committing them (see `persist`)."""


def _graph_layers(x: Array) -> int:
    """Layers of ``x``'s task graph, through the Dask collection protocol; 0 if eager."""
    graph = getattr(x, "__dask_graph__", None)
    if graph is None or not is_lazy_array(x):
        return 0
    return len(getattr(graph(), "layers", ()))


def warn_if_deep(params: Mapping[str, Array]) -> None:
    """Warn when the returned parameters carry a graph of many chained lazy steps.

    Looks at the first parameter only (all are stepped together): one attribute lookup.
    """
    first = next(iter(params.values()), None)
    layers = 0 if first is None else _graph_layers(first)
    if layers > MAX_LAZY_LAYERS:
        import warnings

        warnings.warn(
            f"a lazy parameter's graph has {layers} layers: update() has been chained without "
            "computing. Each lazy step adds ~14 tasks per chunk and Dask fails near 90 steps; "
            "commit every step with `params, state = xpoptim.persist(params, state)` (or use "
            "xpoptim.OutOfCore for parameters that do not fit in memory)",
            LazyGraphWarning,
            stacklevel=3,
        )


def persist(params: Any, state: Any) -> tuple[Any, Any]:
    """Compute the lazy arrays of ``(params, state)`` once and keep the results.

    Call it after each `xpoptim.Optimizer.update` on Dask arrays: the next step
    then starts from a graph of one task per chunk instead of the whole history. The
    parameters and every state buffer are computed together, so shared work runs once;
    with a ``dask.distributed`` client active the results stay in the cluster's memory.
    Eager arrays are returned as they are.

    Args:
        params: name -> array, as returned by ``update``.
        state: the optimizer state NamedTuple returned by ``update``.

    Returns:
        ``(params, state)`` with the same structure.
    """
    if not any(is_lazy_array(x) for x in _leaves((params, state))):
        return params, state
    # Only lazy arrays get here, and Dask's are the lazy arrays xpoptim runs. Dask walks
    # dicts and (named) tuples itself, so the nested states of wrappers (MultiSteps,
    # ParamGroups) are persisted too, all in one computation.
    dask: Any = importlib.import_module("dask")
    new_params, new_state = dask.persist(params, state)
    return new_params, new_state


def _leaves(tree: Any) -> Iterator[Any]:
    """The leaves of nested dicts and (named) tuples: arrays, counters, ``None``."""
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, tuple | list):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


# -- the blocked fast path: options ------------------------------------------------------

#: Bytes per block and array by default (65536 float32 or 32768 float64 elements). A
#: block of Adam's working set (p, g, m, v and the rule's few live temporaries) then stays
#: in the L2/L3 caches, so memory is streamed once per step; each of the rule's ~13 NumPy
#: calls does several microseconds of work, which keeps the per-call overhead and the GIL
#: handovers between threads small; and the temporaries stay far below the sizes at which
#: glibc's malloc returns memory to the system on every free (measured here: 1 MiB
#: blocks took ~70000 page faults per 1e8-element step, 256 KiB ones none).
DEFAULT_BLOCK_BYTES = 256 * 1024
_MIN_BLOCK_SIZE = 64


@dataclasses.dataclass(frozen=True)
class ExecutionOptions:
    """How eager NumPy steps run. See `execution_options`.

    Attributes:
        fast: use the blocked, threaded fast path for plain writeable NumPy arrays.
        num_threads: threads for the fast path. ``None``: ``XPOPTIM_NUM_THREADS`` if set,
            else chosen per kind of step between 1 and a cap (``OMP_NUM_THREADS`` or every
            CPU) by timing steps (`xpoptim._threads.ThreadTuner`). Always capped
            by the CPUs the process may use.
        block_size: elements per block (and per group of small parameters); ``None``:
            ``DEFAULT_BLOCK_BYTES`` worth of the parameter's dtype.
    """

    fast: bool = True
    num_threads: int | None = None
    block_size: int | None = None

    def threads(self) -> int:
        """The most threads a step may use, caps applied."""
        default = default_num_threads()
        if self.num_threads is None:
            return default
        return max(1, min(self.num_threads, available_cpus()))

    def tuned(self) -> bool:
        """Whether the thread count is left to `xpoptim._threads.ThreadTuner`
        (nobody set it: no ``num_threads``, no ``XPOPTIM_NUM_THREADS``)."""
        return self.num_threads is None and not os.environ.get(ENV_VAR, "").strip()

    def block_elements(self, dtype: Any) -> int:
        """Elements per block for arrays of ``dtype``."""
        if self.block_size is not None:
            return self.block_size
        return max(_MIN_BLOCK_SIZE, DEFAULT_BLOCK_BYTES // int(np.dtype(dtype).itemsize))


_GLOBAL_OPTIONS = ExecutionOptions()
_OPTIONS: contextvars.ContextVar[ExecutionOptions | None] = contextvars.ContextVar(
    "xpoptim_execution_options", default=None
)


def current_options() -> ExecutionOptions:
    """The options in force in this context."""
    return _OPTIONS.get() or _GLOBAL_OPTIONS


def _updated_options(
    base: ExecutionOptions, fast: bool | None, num_threads: int | None, block_size: int | None
) -> ExecutionOptions:
    changes: dict[str, Any] = {}
    if fast is not None:
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be True or False, got {fast!r}")
        changes["fast"] = fast
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
        changes["num_threads"] = num_threads
    if block_size is not None:
        if (
            isinstance(block_size, bool)
            or not isinstance(block_size, int)
            or block_size < _MIN_BLOCK_SIZE
        ):
            raise ValueError(
                f"block_size must be an integer >= {_MIN_BLOCK_SIZE}, got {block_size!r}"
            )
        changes["block_size"] = block_size
    return dataclasses.replace(base, **changes)


@contextlib.contextmanager
def execution_options(
    *, fast: bool | None = None, num_threads: int | None = None, block_size: int | None = None
) -> Iterator[ExecutionOptions]:
    """Change how eager NumPy steps run, inside a ``with`` block (this context only).

    Arguments left as ``None`` keep their current value. Results never depend on these
    options: the fast path is bit-identical to the plain one.

    Examples:
        >>> import xpoptim
        >>> with xpoptim.execution_options(num_threads=1, block_size=16384) as options:
        ...     options.threads()
        1
    """
    token = _OPTIONS.set(_updated_options(current_options(), fast, num_threads, block_size))
    try:
        yield current_options()
    finally:
        _OPTIONS.reset(token)


def set_execution_options(
    *, fast: bool | None = None, num_threads: int | None = None, block_size: int | None = None
) -> ExecutionOptions:
    """Change the process-wide defaults of `execution_options`; return them."""
    global _GLOBAL_OPTIONS
    _GLOBAL_OPTIONS = _updated_options(_GLOBAL_OPTIONS, fast, num_threads, block_size)
    return _GLOBAL_OPTIONS


# -- flat state ---------------------------------------------------------------------------

#: id(view) -> (weak reference to the view, its flat base, its offset in the base), for
#: the state views made by `zeros_state`. A group of small parameters whose state
#: views lie side by side in one base is updated through one view of the base, no copy.
_SPANS: dict[int, tuple[weakref.ref[np.ndarray], np.ndarray, int]] = {}


def _register(view: np.ndarray, base: np.ndarray, offset: int) -> None:
    key = id(view)

    def forget(ref: weakref.ref[np.ndarray], key: int = key) -> None:
        entry = _SPANS.get(key)
        if entry is not None and entry[0] is ref:
            _SPANS.pop(key, None)

    _SPANS[key] = (weakref.ref(view, forget), base, offset)


def _span(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
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


def _plain(arrays: Sequence[Array]) -> bool:
    """Whether every array is a plain NumPy array."""
    return {*map(type, arrays)} <= {np.ndarray}


def _blockable(arrays: Sequence[Array]) -> bool:
    """Whether the fast path takes these arrays: plain NumPy arrays, not empty."""
    for a in arrays:
        if type(a) is not np.ndarray:
            return False
    return bool(arrays[0].size)


def same_device(a: Array, b: Array) -> bool:
    """Whether two arrays of one namespace are on the same device (fast for NumPy, which
    has only the CPU)."""
    if type(a) is np.ndarray and type(b) is np.ndarray:
        return True
    return bool(device(a) == device(b))


def _is_large(size: int, block_size: int) -> bool:
    """Whether a parameter is updated through views of its own arrays (else gathered with
    other small parameters into one block)."""
    return size >= block_size // 2


def _group_key(dtype: Any, scalars: Mapping[str, Any]) -> tuple[Any, Hashable]:
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
        if p.size == 0 or _is_large(p.size, options.block_elements(p.dtype)):
            for buffers in made:
                buffers[name] = np.zeros_like(p)
        else:
            buckets.setdefault(_group_key(p.dtype, scalars(name)), []).append(name)
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
                _register(view, flat, offset)
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


# -- running a step -------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Item:
    """One parameter on the fast path: (parameter, *state buffers), its gradient, and the
    rule scalars of this parameter (those shared by all come separately)."""

    arrays: Sequence[np.ndarray]
    gradient: np.ndarray
    scalars: Mapping[str, Any]


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

    Plain writeable NumPy arrays take the blocked fast path; every other array runs the
    rule through `apply_rule` (in place, rebinding, or on a copy).

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
    if options.fast and all(_plain(column) for column in (gradients, *columns)):
        # The common case, every array on the fast path: column-wise bookkeeping.
        # Read-only inputs are updated on a private copy (same memory layout).
        columns = [
            [a if a.flags.writeable else a.copy(order="K") for a in column] for column in columns
        ]
        items = [
            _Item(arrays, gradient, scalars[name])
            for name, gradient, *arrays in zip(names, gradients, *columns, strict=True)
            if arrays[0].size
        ]
        _run_tasks(rule, items, shared, options, xp)
        return dict(zip(names, columns[0], strict=True)), [
            dict(zip(names, column, strict=True)) for column in columns[1:]
        ]
    new_params: dict[str, Array] = {}
    new_state: list[dict[str, Array]] = [{} for _ in state]
    fast: list[_Item] = []
    use_fast = options.fast
    for name, p in params.items():
        updated = (p, *[buffers[name] for buffers in state])
        gradient = grads[name]
        if use_fast and type(gradient) is np.ndarray and _blockable(updated):
            # Read-only inputs are updated on a private copy (same memory layout).
            results: Sequence[Array] = [
                a if a.flags.writeable else a.copy(order="K") for a in updated
            ]
            fast.append(_Item(results, gradient, scalars[name]))
        else:
            results = apply_rule(rule, updated, gradient, xp=xp, **shared, **scalars[name])
        new_params[name] = results[0]
        for buffers, new in zip(new_state, results[1:], strict=True):
            buffers[name] = new
    if fast:
        _run_tasks(rule, fast, shared, options, xp)
    return new_params, new_state


def _run_tasks(
    rule: Rule,
    items: Sequence[_Item],
    shared: Mapping[str, Any],
    options: ExecutionOptions,
    xp: Namespace,
) -> None:
    """Run the fast path's tasks from the pool, with the thread count tuned if not set."""
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
    items: Sequence[_Item],
    shared: Mapping[str, Any],
    options: ExecutionOptions,
    xp: Namespace,
) -> list[Callable[[], None]]:
    """Independent tasks that together apply the rule to every item once."""
    tasks: list[Callable[[], None]] = []
    groups: dict[Hashable, list[_Item]] = {}
    blocks: dict[Any, int] = {}
    for item in items:
        p = item.arrays[0]
        block_size = blocks.get(p.dtype) or blocks.setdefault(
            p.dtype, options.block_elements(p.dtype)
        )
        if _is_large(p.size, block_size):
            scalars = {**shared, **item.scalars}
            tasks.extend(_block_tasks(rule, item, scalars, block_size, xp))
        else:
            groups.setdefault(_group_key(p.dtype, item.scalars), []).append(item)
    for members in groups.values():
        scalars = {**shared, **members[0].scalars}
        block_size = options.block_elements(members[0].arrays[0].dtype)
        packed: list[_Item] = []
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
    rule: Rule, item: _Item, scalars: Mapping[str, Any], block_size: int, xp: Namespace
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
    items: Sequence[_Item],
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
        span = _span(arrays)
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
