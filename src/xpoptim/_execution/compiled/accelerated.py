"""The compiled path for one parameter held by Dask (NumPy chunks), CuPy or PyTorch (CPU).

* **Dask** -- one task per chunk runs the rule's numba kernel (``out_of_place``: Dask
  chunks may be shared, so they are never written) and returns every result; each
  result array takes its item from that task. Nothing is computed here, and the results
  keep the parameter's chunks. The task carries the rule and its scalars, not the
  kernel: a ``dask.distributed`` worker builds (or loads from its disk cache) its own.
* **CuPy** -- one ``cupy.ElementwiseKernel`` launch generated from the same trace
  (`cuda_emit`), updating the parameter and buffers in place.
* **PyTorch on the CPU** -- the numba kernel, in place, on NumPy views of the tensors'
  memory (DLPack: no copy). It pays off: torch runs the rule one operator at a time
  (about 13 passes over memory for Adam), the kernel in one (measured in
  docs/performance.md). Like torch.optim under ``no_grad``, it bypasses autograd; unlike
  it, it does not bump the tensors' version counters.
"""

from __future__ import annotations

import functools
import importlib
import operator
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..._compat import Array, is_cupy_array, is_dask_array, is_torch_array
from .cuda_emit import NVRTC_OPTIONS, cuda_source
from .kernels import NoKernel, numba_kernel, python_numbers, untraceable
from .trace import Untraceable, trace


def step(
    rule: Callable[..., Any],
    updated: tuple[Array, ...],
    gradient: Array,
    scalars: Mapping[str, Any],
) -> tuple[Array, ...] | NoKernel:
    """The rule's results for one parameter through a compiled kernel, or why not."""
    arrays = (updated[0], gradient, *updated[1:])
    if all(is_dask_array(a) for a in arrays):
        return _dask_step(rule, arrays, scalars)
    if all(is_cupy_array(a) for a in arrays):
        return _cupy_step(rule, arrays, scalars)
    if all(is_torch_array(a) for a in arrays):
        return _torch_cpu_step(rule, arrays, scalars)
    kinds = sorted({f"{type(a).__module__}.{type(a).__name__}" for a in arrays})
    return NoKernel(f"no compiled path for {', '.join(kinds)} (NumPy, Dask and CuPy have one)")


def _dask_step(
    rule: Callable[..., Any], arrays: tuple[Array, ...], scalars: Mapping[str, Any]
) -> tuple[Array, ...] | NoKernel:
    # Imported as Any: typed where Dask is installed, absent where it is not (lint).
    da: Any = importlib.import_module("dask.array")
    tokenize: Any = importlib.import_module("dask.base").tokenize

    p = arrays[0]
    if not all(type(getattr(a, "_meta", None)) is np.ndarray for a in arrays):
        return NoKernel("Dask arrays whose chunks are not NumPy arrays")
    if len({a.shape for a in arrays}) != 1 or len({a.dtype for a in arrays}) != 1:
        return NoKernel("arrays of different shapes or dtypes")
    kernel = numba_kernel(rule, len(arrays), p.dtype, scalars)
    if isinstance(kernel, NoKernel):
        return kernel
    index = tuple(range(p.ndim))
    meta = np.empty((0,) * p.ndim, dtype=p.dtype)
    pairs = [part for a in arrays for part in (a, index)]
    results = da.blockwise(
        _chunk_step,
        index,
        *pairs,
        rule=rule,
        scalars=dict(scalars),
        dtype=p.dtype,
        meta=meta,
        # A key of its own per step: the same name for two steps would merge their graphs.
        name=f"xpoptim-{getattr(rule, '__name__', 'rule')}-{tokenize(rule, scalars, *arrays)}",
    )
    return tuple(
        results.map_blocks(operator.getitem, k, dtype=p.dtype, meta=meta)
        for k in range(len(arrays) - 1)
    )


def _chunk_step(
    *blocks: np.ndarray, rule: Callable[..., Any], scalars: Mapping[str, Any]
) -> tuple[np.ndarray, ...]:
    """One Dask task: the rule's results for one chunk of each array (inputs untouched)."""
    blocks = tuple(np.asarray(b, order="C") for b in blocks)  # keeps 0-d chunks 0-d
    p = blocks[0]
    outputs = tuple(np.empty_like(p) for _ in blocks[1:])
    if p.size == 0:
        return outputs
    kernel = numba_kernel(rule, len(blocks), p.dtype, scalars)
    if isinstance(kernel, NoKernel):  # the caller checked; a worker without numba lands here
        raise RuntimeError(f"xpoptim: no kernel on this worker: {kernel.reason}")
    from .numba_support import addresses

    row, _ = addresses([*blocks, *outputs])
    table = np.array([row], dtype=np.intp)
    kernel.out_of_place(table, np.array([p.size], dtype=np.intp), *kernel.arguments(scalars))
    return outputs


def _torch_cpu_step(
    rule: Callable[..., Any], arrays: tuple[Array, ...], scalars: Mapping[str, Any]
) -> tuple[Array, ...] | NoKernel:
    devices = {a.device.type for a in arrays}
    if devices != {"cpu"}:
        return NoKernel(f"torch tensors on {', '.join(sorted(devices))} (compiled: CPU only)")
    views = [np.from_dlpack(a.detach()) for a in arrays]  # the tensors' own memory
    if not all(v.flags.writeable for v in views):
        return NoKernel("a tensor whose memory is read-only")
    kernel = numba_kernel(rule, len(arrays), views[0].dtype, scalars)
    if isinstance(kernel, NoKernel):
        return kernel
    from .numba_support import addresses

    row, layout = addresses(views)
    if not layout or len({v.shape for v in views}) != 1:
        return NoKernel("parameter, gradient and state do not share one contiguous memory layout")
    if views[0].size:
        table = np.array([row], dtype=np.intp)
        sizes = np.array([views[0].size], dtype=np.intp)
        kernel.in_place(table, sizes, *kernel.arguments(scalars))
    return (arrays[0], *arrays[2:])


_CUPY_KERNELS: dict[Any, Any] = {}
_CUPY_LOCK = threading.Lock()


def _cupy_step(
    rule: Callable[..., Any], arrays: tuple[Array, ...], scalars: Mapping[str, Any]
) -> tuple[Array, ...] | NoKernel:
    p = arrays[0]
    if len({a.dtype for a in arrays}) != 1 or p.dtype.kind != "f":
        return NoKernel("arrays of different or non-floating dtypes")
    reason = python_numbers(scalars)
    if reason is not None:
        return reason
    found = _cupy_kernel(rule, len(arrays), scalars)
    if isinstance(found, NoKernel):
        return found
    graph, kernel = found
    arguments = graph.kernel_arguments(scalars, p.dtype.type)
    g, written = arrays[1], (arrays[0], *arrays[2:])
    kernel(g, *arguments, *written)
    return written


def _cupy_kernel(
    rule: Callable[..., Any], roles: int, scalars: Mapping[str, Any]
) -> tuple[Any, Any] | NoKernel:
    key = (rule, roles, tuple((k, type(v), bool(v)) for k, v in scalars.items()))
    found = _CUPY_KERNELS.get(key)
    if found is None:
        with _CUPY_LOCK:
            try:
                graph = trace(rule, roles, scalars)
            except Untraceable as exc:
                found = untraceable(rule, exc)
            else:
                found = (graph, _elementwise_kernel(graph))
            _CUPY_KERNELS[key] = found
    return found


@functools.cache
def _elementwise_kernel_for(in_params: str, out_params: str, operation: str, name: str) -> Any:
    import cupy

    return cupy.ElementwiseKernel(in_params, out_params, operation, name, options=NVRTC_OPTIONS)


def _elementwise_kernel(graph: Any) -> Any:
    source = cuda_source(graph)
    return _elementwise_kernel_for(
        source.in_params, source.out_params, source.operation, source.name
    )
