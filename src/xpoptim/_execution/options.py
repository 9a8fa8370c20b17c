"""Execution options: which path eager steps take, with how many threads and blocks."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .threads import ENV_VAR, available_cpus, default_num_threads

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
    """Which path a step takes, and with how many threads. See `execution_options`.

    Attributes:
        fast: use a fast path (compiled or blocked) where one applies; ``False`` runs
            every step on the plain path, the rule once per whole array.
        num_threads: threads for the NumPy fast paths. ``None``: ``XPOPTIM_NUM_THREADS``
            if set, else chosen per kind of step between 1 and a cap
            (``OMP_NUM_THREADS`` or every CPU) by timing steps
            (`xpoptim._execution.threads.ThreadTuner`). Always capped by the CPUs the
            process may use.
        block_size: elements per block of the blocked path (and per group of small
            parameters); ``None``: ``DEFAULT_BLOCK_BYTES`` worth of the parameter's dtype.
        compile: with ``fast``, step through one fused kernel compiled from the rule
            (numba for NumPy and Dask chunks, CUDA for CuPy) where the rule can be
            compiled; ``False`` keeps the blocked path for NumPy and the plain path
            elsewhere.
    """

    fast: bool = True
    num_threads: int | None = None
    block_size: int | None = None
    compile: bool = True

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
    base: ExecutionOptions,
    fast: bool | None,
    num_threads: int | None,
    block_size: int | None,
    compile: bool | None,
) -> ExecutionOptions:
    changes: dict[str, Any] = {}
    for name, flag in (("fast", fast), ("compile", compile)):
        if flag is not None:
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
            changes[name] = flag
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
    *,
    fast: bool | None = None,
    num_threads: int | None = None,
    block_size: int | None = None,
    compile: bool | None = None,
) -> Iterator[ExecutionOptions]:
    """Change how steps run, inside a ``with`` block (this context only).

    Arguments left as ``None`` keep their current value. Results never depend on these
    options: the compiled and blocked paths are bit-identical to the plain one.
    `xpoptim.explain` says which path each parameter takes, and why.

    Examples:
        >>> import xpoptim
        >>> with xpoptim.execution_options(num_threads=1, block_size=16384) as options:
        ...     options.threads()
        1
    """
    token = _OPTIONS.set(
        _updated_options(current_options(), fast, num_threads, block_size, compile)
    )
    try:
        yield current_options()
    finally:
        _OPTIONS.reset(token)


def set_execution_options(
    *,
    fast: bool | None = None,
    num_threads: int | None = None,
    block_size: int | None = None,
    compile: bool | None = None,
) -> ExecutionOptions:
    """Change the process-wide defaults of `execution_options`; return them."""
    global _GLOBAL_OPTIONS
    _GLOBAL_OPTIONS = _updated_options(_GLOBAL_OPTIONS, fast, num_threads, block_size, compile)
    return _GLOBAL_OPTIONS
