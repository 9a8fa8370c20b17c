"""Compiled kernels, cached per (rule, dtype, hyperparameter signature).

`numba_kernel` traces a rule, emits its numba source, writes it once into the kernel
cache directory (named by the hash of the source, so the file is the cache key) and
imports it; numba's own disk cache (``cache=True``) keeps the machine code beside it, so
a second process loads the kernel instead of compiling it. In the process, kernels are
kept in a dictionary keyed by ``(rule, roles, dtype, names, types and truth values of the
hyperparameters)``: a step whose learning rate or bias correction changed reuses its
kernel, with the new values as arguments.

The cache directory is ``XPOPTIM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/xpoptim``
(``~/.cache/xpoptim``); where it cannot be written, a private temporary directory (no
reuse across processes).

Where there is no kernel, `NoKernel` says why (cached too, and logged once at DEBUG
level on the ``xpoptim`` logger), and whether the rule itself is the reason: a rule the
tracer cannot follow may not be elementwise (a reduction, a matmul), so it must run on
whole arrays (the plain path), while an elementwise rule without a kernel (no numba,
NumPy-scalar hyperparameters) may still run blocked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .ir import Graph, GuardFailed
from .numba_emit import EMITTER_VERSION, numba_source
from .trace import Untraceable, trace

LOG = logging.getLogger("xpoptim")

#: Why there is no compiled NumPy path, or None. numba is a dependency of the default
#: install, and xpoptim runs without it (the blocked path). Importing numba takes about
#: half a second, so it is imported when the first kernel is built, not with xpoptim.
NUMBA_MISSING: str | None = (
    None if importlib.util.find_spec("numba") else "numba is not installed: pip install numba"
)


def _numba() -> Any:
    """The numba module (imported on first use); sets `NUMBA_MISSING` if it fails."""
    global NUMBA_MISSING
    try:
        import numba
    except ImportError as exc:  # installed but broken (e.g. built for another NumPy)
        NUMBA_MISSING = f"numba cannot be imported ({exc})"
        raise
    return numba


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One compiled rule for one dtype.

    Attributes:
        graph: the traced rule.
        dtype: the arrays' dtype.
        source: the generated source (also in the file at ``path``).
        path: the generated module's file.
        in_place: ``in_place(table, sizes, *scalars)``.
        out_of_place: ``out_of_place(table, sizes, *scalars)``.
        compile_seconds: time to compile (or load from the disk cache) ``in_place``.
    """

    graph: Graph
    dtype: np.dtype[Any]
    source: str
    path: Path
    in_place: Callable[..., None]
    out_of_place: Callable[..., None]
    compile_seconds: float

    def arguments(self, scalars: Mapping[str, Any]) -> list[Any]:
        """The kernel's scalar arguments, each cast to the arrays' dtype as NumPy casts a
        Python scalar that meets an array.

        Raises:
            GuardFailed: the hyperparameters' truth values differ from the traced ones.
        """
        return self.graph.kernel_arguments(scalars, self.dtype.type)


@dataclasses.dataclass(frozen=True)
class NoKernel:
    """Why a rule has no compiled kernel.

    Attributes:
        reason: what stood in the way, for `xpoptim.explain`.
        untraceable: the rule itself could not be traced (it may not be elementwise).
    """

    reason: str
    untraceable: bool = False


_KERNELS: dict[Hashable, list[Kernel] | NoKernel] = {}
_LOCK = threading.RLock()
_DIRECTORY: Path | None = None


def python_numbers(scalars: Mapping[str, Any]) -> NoKernel | None:
    """Why ``scalars`` cannot be kernel arguments, or None if they can.

    Only Python's own ``bool``, ``int`` and ``float``: NumPy scalars (``np.float64``
    subclasses ``float``) and 0-d arrays promote a float32 step where a Python float
    does not, so a kernel would not give the plain path's bits.
    """
    for name, value in scalars.items():
        if type(value) not in (bool, int, float):
            return NoKernel(
                f"hyperparameter {name!r} is a {type(value).__module__}.{type(value).__name__}, "
                "not a Python number (a traced or lazily selected step counter)"
            )
    return None


def cache_directory() -> Path:
    """Where generated kernels (and numba's machine code) are kept."""
    global _DIRECTORY
    if _DIRECTORY is None:
        base = os.environ.get("XPOPTIM_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xpoptim"
        )
        path = Path(base) / f"kernels-numba{_numba().__version__}-e{EMITTER_VERSION}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError:
            path = Path(tempfile.mkdtemp(prefix="xpoptim-kernels-"))
        _DIRECTORY = path
    return _DIRECTORY


def _signature_key(
    rule: Callable[..., Any], roles: int, dtype: Any, scalars: Mapping[str, Any]
) -> Hashable:
    return (
        rule,
        roles,
        np.dtype(dtype).str,
        tuple((name, type(value), bool(value)) for name, value in scalars.items()),
    )


def numba_kernel(
    rule: Callable[..., Any], roles: int, dtype: Any, scalars: Mapping[str, Any]
) -> Kernel | NoKernel:
    """The numba kernel of ``rule`` for arrays of ``dtype``, or why there is none.

    Args:
        rule: an update rule, called as ``rule(p, g, *buffers, xp=xp, **scalars)``.
        roles: ``2 + len(buffers)``.
        dtype: the dtype of every array (parameter, gradient and state share it).
        scalars: the hyperparameters of this call, Python numbers.
    """
    refusal = elementwise(rule, roles, scalars)
    if refusal is not None:
        return refusal
    if NUMBA_MISSING is not None:
        return NoKernel(NUMBA_MISSING)
    if np.dtype(dtype).kind != "f":
        return NoKernel(f"dtype {np.dtype(dtype)} (kernels are compiled for floating dtypes)")
    reason = python_numbers(scalars)
    if reason is not None:
        return reason
    key = _signature_key(rule, roles, dtype, scalars)
    found = _KERNELS.get(key)
    if isinstance(found, NoKernel):
        return found
    for kernel in found or ():
        try:
            kernel.graph.kernel_arguments(scalars)
        except GuardFailed:
            continue
        return kernel
    with _LOCK:
        try:
            graph = trace(rule, roles, scalars)
        except Untraceable as exc:
            refusal = untraceable(rule, exc)
            LOG.debug("xpoptim: %s; it runs on the plain path", refusal.reason)
            _KERNELS[key] = refusal
            return refusal
        try:
            kernel = _build(graph, np.dtype(dtype))
        except ImportError:
            return NoKernel(str(NUMBA_MISSING))
        existing = _KERNELS.get(key)
        _KERNELS[key] = [*(existing if isinstance(existing, list) else []), kernel]
        return kernel


_TRACED: dict[Hashable, NoKernel | None] = {}


def elementwise(
    rule: Callable[..., Any], roles: int, scalars: Mapping[str, Any]
) -> NoKernel | None:
    """None if ``rule`` traces (it is elementwise, so it may also run in blocks), else why
    it does not (it must then see whole arrays: the plain path).

    Needs no numba: the blocked path asks too, so that a reduction never runs per block.
    """
    # Only numbers are read: a lazy or traced scalar (a Dask or JAX 0-d array) would be
    # computed by bool(). Whether a rule is elementwise does not depend on such values, so
    # it is traced with a stand-in.
    readable = {
        name: value if isinstance(value, int | float | np.generic) else 1.0
        for name, value in scalars.items()
    }
    key = (rule, roles, tuple((name, type(v), bool(v)) for name, v in readable.items()))
    if key not in _TRACED:
        try:
            trace(rule, roles, readable)
        except Untraceable as exc:
            refusal = untraceable(rule, exc)
            LOG.debug("xpoptim: %s; it runs on the plain path", refusal.reason)
            _TRACED[key] = refusal
        else:
            _TRACED[key] = None
    return _TRACED[key]


def untraceable(rule: Callable[..., Any], exc: Untraceable) -> NoKernel:
    """The refusal for a rule the tracer could not follow."""
    name = getattr(rule, "__name__", repr(rule))
    return NoKernel(f"the rule {name!r} cannot be compiled: {exc}", untraceable=True)


def _build(graph: Graph, dtype: np.dtype[Any]) -> Kernel:
    source = numba_source(graph, dtype.name)
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    name = f"xpoptim_kernel_{digest}"
    path = cache_directory() / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        # Atomic: another process may be importing the same kernel right now.
        temporary = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_text(source)
        os.replace(temporary, path)
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    numba = _numba()
    scalar_type = numba.from_dtype(dtype)
    signature = (
        numba.types.Array(numba.types.intp, 2, "C"),
        numba.types.Array(numba.types.intp, 1, "C"),
        *[scalar_type] * len(graph.kernel_scalars()),
    )
    start = time.perf_counter()
    module.in_place.compile(signature)
    seconds = time.perf_counter() - start
    LOG.debug("xpoptim: kernel for %s (%s) ready in %.3f s: %s", graph.rule, dtype, seconds, path)
    return Kernel(
        graph=graph,
        dtype=dtype,
        source=source,
        path=path,
        in_place=module.in_place,
        out_of_place=module.out_of_place,
        compile_seconds=seconds,
    )


def compiled_kernels() -> list[Kernel]:
    """Every kernel built in this process (for the benchmark's compile times)."""
    return [k for found in list(_KERNELS.values()) if isinstance(found, list) for k in found]
