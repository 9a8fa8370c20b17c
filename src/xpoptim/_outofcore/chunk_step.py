"""What every out-of-core engine shares: the per-chunk step task, checks, scheduling.

A step is the same Dask graph whatever the engine: one task per chunk reads the chunk of
the parameter and of each state buffer, takes the gradient chunk and runs the optimizer's
own `xpoptim.Optimizer.update` on these NumPy arrays (`_update_chunk`). The engines
(`xpoptim._outofcore.directory`, `xpoptim._outofcore.transactional`) differ only in where
the chunks are read from and written to, and in how a step is committed.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import _validation as check
from .._execution import execution_options
from .._optimizers import OPTIMIZERS, Optimizer
from . import layout
from .errors import StoreError

#: Default target size of one chunk when the chunks are chosen automatically.
DEFAULT_CHUNK_BYTES = 16 * 2**20

#: The optimizers a store can name: every elementwise one (`_check_elementwise` refuses
#: the others, which need a whole parameter at once).
_OPTIMIZERS: dict[str, type[Optimizer]] = {
    name: cls for name, cls in OPTIMIZERS.items() if cls.elementwise
}

#: Test hook: called with the name of each phase of a step (``"locked"``, ``"created"``,
#: ``"stored"``, ``"flushed"``, ``"committed"``, ``"collected"``). The crash tests kill the
#: process there; the two-writer tests hold the lock there.
_phase_hook: Callable[[str], None] | None = None


class MissingDependencyError(ImportError):
    """An optional dependency of the out-of-core store (Dask, Zarr) is not installed."""


def _lazy(module: str) -> Any:
    """Import an optional dependency (Dask, Zarr) when first needed, untyped.

    Raises:
        MissingDependencyError: it is not installed (says to install ``xpoptim[dask]``).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in ("dask", "zarr", "distributed", "google_crc32c"):
            raise
        raise MissingDependencyError(
            f"the out-of-core store needs {top} ({exc.name} is not installed): "
            "pip install 'xpoptim[dask]'"
        ) from exc


def _progress_default(progress: bool | None) -> bool:
    """``progress=None``: a progress bar where a terminal shows it (stderr is a tty)."""
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return bool(progress)


def _phase(name: str) -> None:
    """Call the test hook `_phase_hook` (if set) with the phase a step has reached."""
    if _phase_hook is not None:
        _phase_hook(name)


@dataclass(frozen=True)
class StepSummary:
    """What one `OutOfCore.step` did.

    Attributes:
        step: the committed step count after the call.
        skipped: True when the step had already been committed (an idempotent re-run).
        bytes_read: bytes of parameters and state read from the store (at step 1 the
            zero state is Zarr's fill value: not on disk, not actually read).
        bytes_gradient: bytes of gradient consumed (read from Zarr or computed by Dask).
        bytes_written: bytes of parameters and state written.
        elapsed_s: wall time of the whole step (compute, write, flush, commit, cleanup).
        flush_s: the part of ``elapsed_s`` spent in ``fsync``.
    """

    step: int
    skipped: bool
    bytes_read: int
    bytes_gradient: int
    bytes_written: int
    elapsed_s: float
    flush_s: float

    @property
    def bytes_moved(self) -> int:
        """Store bytes read plus written (the gradient excluded)."""
        return self.bytes_read + self.bytes_written

    @property
    def gb_per_s(self) -> float:
        """Store throughput: :attr:`bytes_moved` / :attr:`elapsed_s`, in GB/s (1e9 bytes)."""
        return self.bytes_moved / self.elapsed_s / 1e9 if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        if self.skipped:
            return f"step {self.step}: already committed, nothing done"
        return (
            f"step {self.step}: read {self.bytes_read / 1e9:.3f} GB "
            f"(+ {self.bytes_gradient / 1e9:.3f} GB gradient), "
            f"wrote {self.bytes_written / 1e9:.3f} GB in {self.elapsed_s:.2f} s "
            f"({self.gb_per_s:.2f} GB/s; fsync {self.flush_s:.2f} s)"
        )


# -- small file-system helpers ------------------------------------------------------------


def _regular_chunks(chunks: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | None:
    """The Zarr chunk shape of Dask ``chunks``, or None if they are not regular."""
    shape = []
    for dim in chunks:
        size = dim[0] if dim else 0
        if any(c != size for c in dim[:-1]) or (dim and dim[-1] > size):
            return None
        shape.append(max(size, 1))
    return tuple(shape)


# -- the store ----------------------------------------------------------------------------------


def _check_elementwise(optimizer: Any) -> None:
    """Refuse an optimizer whose update is not elementwise (``elementwise = False``: LAMB,
    LARS, Adafactor, Muon): it needs a whole parameter, but every chunk is stepped alone."""
    if isinstance(optimizer, Optimizer) and not optimizer.elementwise:
        raise TypeError(
            f"OutOfCore cannot step {type(optimizer).__name__}: its update is not elementwise "
            "(it takes norms, means or matrix products over a whole parameter), and OutOfCore "
            "steps each chunk on its own. Keep these parameters in memory, or step Dask "
            "arrays with optimizer.update (lazily, whole parameters)"
        )


def _check_policy(optimizer: Optimizer) -> None:
    """Refuse ``nonfinite="skip"``: chunks are stepped one by one, so one chunk's NaN
    could not skip the others' update ("raise" fails the step, which is never committed)."""
    if optimizer.nonfinite == "skip":
        raise ValueError(
            "OutOfCore steps every chunk on its own, so nonfinite='skip' cannot skip a whole "
            "step; use 'raise' (the step fails and the committed version stays) or "
            "'propagate'"
        )


def _update_chunk(
    p: Any, g: Any, *buffers: Any, optimizer: Optimizer, param: str, step: int
) -> tuple[Any, ...]:
    """Step ``step`` of ``optimizer`` on one chunk of parameter ``param`` and its state.

    The optimizer's public ``update`` on NumPy chunks (elementwise rules: a chunk can be
    stepped alone). It may update ``p`` and ``buffers`` in place: they are chunks this
    step's task read from the store for itself. ``g`` is never written.
    """
    fields = optimizer._buffer_fields()
    state = optimizer.State(
        step - 1, **{f: {param: b} for f, b in zip(fields, buffers, strict=True)}
    )
    # Dask runs several of these tasks at once: one thread each, never a pool per task.
    with execution_options(num_threads=1):
        new_params, new_state = optimizer.update({param: p}, {param: g}, state)
    return (new_params[param], *(getattr(new_state, f)[param] for f in fields))


def _describe_chunks(chunks: tuple[tuple[int, ...], ...]) -> str:
    regular = _regular_chunks(chunks)
    return str(regular) if regular is not None else f"irregular {chunks}"


def _as_dask(value: Any, name: str, chunks: Any, chunk_bytes: int) -> Any:
    """``value`` as a Dask array with regular chunks (Zarr's requirement)."""
    da = _lazy("dask.array")

    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"params[{name!r}] is not an array: {type(value).__name__}")
    wanted = chunks.get(name) if isinstance(chunks, Mapping) else chunks
    if wanted is not None:
        wanted = layout.check_chunks(wanted, name, len(value.shape))
    if isinstance(value, da.Array):
        x = value
    elif type(value).__module__.startswith("zarr"):
        x = da.from_zarr(value)
    else:
        auto = da.core.normalize_chunks("auto", value.shape, limit=chunk_bytes, dtype=value.dtype)
        x = da.from_array(value, chunks=wanted or auto)
    if wanted is None and _regular_chunks(x.chunks) is None:
        wanted = tuple(max(dim) if dim else 1 for dim in x.chunks)
    return x if wanted is None else x.rechunk(wanted)


def check_grads(
    arrays: Mapping[str, Mapping[str, Any]], grads: Mapping[str, Any], rechunk: bool
) -> dict[str, Any]:
    """Gradients as Dask arrays with the parameters' chunks; raises on any mismatch."""
    da = _lazy("dask.array")

    if not isinstance(grads, Mapping):
        raise TypeError(f"grads must be a mapping from names to arrays, got {type(grads)!r}")
    missing = sorted(set(arrays) - set(grads))
    extra = sorted(set(grads) - set(arrays))
    if missing or extra:
        raise ValueError(
            f"grads do not match the parameter names: missing {missing}, unexpected {extra}"
        )
    out = {}
    for name, meta in arrays.items():
        g = grads[name]
        label = f"grads[{name!r}]"
        shape, dtype = tuple(meta["shape"]), meta["dtype"]
        if not hasattr(g, "shape") or not hasattr(g, "dtype"):
            raise TypeError(f"{label} is not an array: {type(g).__name__}")
        if tuple(g.shape) != shape:
            raise ValueError(f"{label} has shape {tuple(g.shape)}, the parameter {shape}")
        if str(g.dtype) != dtype:
            raise TypeError(f"{label} has dtype {g.dtype}, the parameter {dtype}")
        want = da.core.normalize_chunks(tuple(meta["chunks"]), shape)
        if isinstance(g, da.Array):
            dg = g
        elif type(g).__module__.startswith("zarr"):
            dg = da.from_zarr(g)
        else:
            dg = da.from_array(g, chunks=want)
        if dg.chunks != want:
            if not rechunk:
                raise ValueError(
                    f"{label} has chunks {_describe_chunks(dg.chunks)}, the parameter "
                    f"{tuple(meta['chunks'])}; rechunk it or pass rechunk=True"
                )
            dg = dg.rechunk(want)
        out[name] = dg
    return out


def compute(stored: Any, client: Any, *, progress: bool, num_workers: int | None = None) -> None:
    """Compute ``stored`` on ``client`` (distributed) or the local threaded scheduler."""
    dask = _lazy("dask")

    if client is not None:
        futures = client.compute(stored)
        if progress:
            _lazy("distributed").progress(futures)
        client.gather(futures)
        return
    bar: Any = contextlib.nullcontext()
    if progress:
        bar = _lazy("dask.diagnostics").ProgressBar(out=sys.stderr)
    with bar:
        dask.compute(stored, scheduler="threads", num_workers=num_workers)


def resolve_optimizer(
    where: object,
    kind: str,
    committed: Mapping[str, Any],
    optimizer: Optimizer | None,
    reconfigure: bool,
) -> Optimizer:
    """The optimizer to step a store with, checked against the committed one.

    Args:
        where: the file or store holding ``committed`` (for messages).
        kind: the committed optimizer's type name.
        committed: the committed configuration.
        optimizer: the one given to `OutOfCore.open` (None: rebuild the committed one).
        reconfigure: accept other hyperparameters (they must be storable).

    Raises:
        StoreError: another type, other hyperparameters without ``reconfigure``, or a
            committed configuration the type refuses.
    """
    if optimizer is None:
        try:
            return _OPTIMIZERS[kind].from_config(dict(committed))
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreError(
                f"{where} holds an optimizer config that {kind} refuses: {exc}"
            ) from exc
    if type(optimizer).__name__ != kind:
        raise StoreError(
            f"{where} was written by the optimizer {kind}, not {type(optimizer).__name__}"
        )
    if not reconfigure and optimizer.get_config() != committed:
        raise StoreError(
            f"{where} was committed with {dict(committed)}, but the optimizer given is "
            f"configured {optimizer.get_config()}; pass reconfigure=True to continue with the "
            "new hyperparameters"
        )
    layout.check_storable_config(optimizer.get_config())
    return optimizer


def step_graph(
    optimizer: Optimizer,
    arrays: Mapping[str, Any],
    fields: list[str],
    committed: Mapping[str, Any],
    gradients: Mapping[str, Any],
    step: int,
) -> dict[str, Any]:
    """The lazy outputs of step ``step``: name -> (new param, *new state buffers), Dask.

    One Dask task per chunk runs the optimizer's own update on the NumPy chunks it read
    (`_update_chunk`): the same rule as in memory, in place on buffers the task owns.
    (Running update() on the Dask arrays also works, but builds ~14 tasks per chunk and a
    temporary per operation: 1.2-1.8x slower in our measurements.)

    Args:
        optimizer: the store's optimizer.
        arrays: the store's description of each parameter.
        fields: the state buffer names.
        committed: ``"params/{name}"`` and ``"{field}/{name}"`` -> the committed Zarr array.
        gradients: name -> Dask gradient with the parameter's chunks (`check_grads`).
        step: the step being computed (committed + 1).
    """
    da = _lazy("dask.array")

    # A copy for the tasks, sharing the learning-rate schedule object itself: a
    # ReduceOnPlateau the user observes keeps its reductions.
    config = optimizer.get_config()
    config["learning_rate"] = optimizer.learning_rate
    task_optimizer = type(optimizer).from_config(config)
    outputs = {}
    for n in arrays:
        inputs = [da.from_zarr(committed[f"params/{n}"]), gradients[n]]
        inputs += [da.from_zarr(committed[f"{f}/{n}"]) for f in fields]
        outputs[n] = da.apply_gufunc(
            _update_chunk,
            ",".join(["()"] * len(inputs)) + "->" + ",".join(["()"] * (len(inputs) - 1)),
            *inputs,
            output_dtypes=[inputs[0].dtype] * (len(inputs) - 1),
            optimizer=task_optimizer,
            param=n,
            step=step,
        )
    return outputs


def check_create(
    optimizer: Optimizer,
    params: Mapping[str, Any],
    chunks: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None,
    chunk_bytes: int,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Check the arguments of `OutOfCore.create`, before anything is written.

    Returns:
        ``(sources, arrays)``: name -> the initial values as a Dask array with regular
        chunks, and name -> ``{"shape", "dtype", "chunks"}`` (the store's description).

    Raises:
        TypeError, ValueError: not an elementwise xpoptim optimizer, a config JSON cannot
            store, an empty mapping, a bad name, chunk shape or array.
    """
    _check_elementwise(optimizer)
    if not isinstance(optimizer, Optimizer) or type(optimizer).__name__ not in _OPTIMIZERS:
        raise TypeError(
            f"optimizer must be one of xpoptim's elementwise optimizers "
            f"({', '.join(sorted(_OPTIMIZERS))}), got {optimizer!r}"
        )
    _check_policy(optimizer)
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty mapping from names to arrays")
    layout.check_names(params)
    layout.check_chunk_bytes(chunk_bytes)
    # Every commit stores the config: check it can, before writing anything.
    layout.check_storable_config(optimizer.get_config())
    sources = {name: _as_dask(value, name, chunks, chunk_bytes) for name, value in params.items()}
    check.params(sources)  # real floating dtypes, one namespace
    arrays = {
        name: {
            "shape": list(x.shape),
            "dtype": str(x.dtype),
            "chunks": list(_regular_chunks(x.chunks) or ()),
        }
        for name, x in sources.items()
    }
    return sources, arrays
