"""Out-of-core optimization: parameters and state in a Zarr group on disk, streamed by Dask.

`OutOfCore` keeps the parameters and every state buffer of an optimizer as Zarr
arrays in one directory, and runs each step as one Dask computation that reads every
chunk once and writes every output chunk once. The math is the optimizer's own
`xpoptim.Optimizer.update` (the rules of `xpoptim._rules`) applied to Dask
arrays that read from Zarr: there is no second copy of the update rules here.

Layout of the directory (a Zarr v3 group; checks in `xpoptim._outofcore.layout`)::

    DIR/zarr.json           root group; attributes["xpoptim"] = format, optimizer type,
                            array names, shapes, dtypes, chunks (written once, at create)
    DIR/v{k}/params/{name}  the parameters after step k
    DIR/v{k}/{field}/{name} the state buffers after step k (``momentums``, ...)
    DIR/xpoptim.json        the commit pointer: {"step": k, "version": "v{k}", optimizer config}
    DIR/xpoptim.lock        the writers' lock file (`xpoptim._outofcore.lock`)

Every chunk is written (zeros included) with a CRC-32C checksum; a missing or corrupt
chunk is an error, never read as zeros (`xpoptim._outofcore.chunks`). One writer at a
time: each step and each create holds an exclusive ``flock`` on the lock file.

Crash safety (the protocol, also in ``docs/out-of-core.md``): step ``k+1`` reads only
``v{k}`` and writes only ``v{k+1}``; the data of ``v{k+1}`` is flushed (``fsync``) before
the pointer is replaced by one atomic ``os.replace`` of a fsynced temporary file. Only
then is ``v{k}`` deleted. A crash at any moment therefore leaves the pointer on a
complete version. Leftovers of an interrupted step are deleted by the next step, which
rewrites them from the committed version: re-running a step gives the same bits, and a
Dask worker that dies mid-step only makes Dask recompute chunks of ``v{k+1}`` from
``v{k}``, which is harmless.

Memory: a step holds a few chunk-sized buffers per running task, so peak memory is
about ``base + threads * chunk_bytes * K`` (``K`` about 10 for Adam, see the docs),
independent of the number or size of the parameters.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _validation as check
from .._atomic import fsync_path, is_temporary, replace_atomically
from .._execution import execution_options
from .._optimizers import OPTIMIZERS, Optimizer
from . import layout
from .layout import FORMAT, FORMAT_VERSION, LOCK, POINTER, StoreError
from .lock import writer_lock

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK",
    "POINTER",
    "MissingDependencyError",
    "OutOfCore",
    "StepSummary",
    "StoreError",
]

#: Default target size of one chunk when the chunks are chosen automatically.
DEFAULT_CHUNK_BYTES = 16 * 2**20
#: How often `OutOfCore.read` starts again when a commit replaced the version it read.
READ_ATTEMPTS = 5

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


def _fsync_tree(root: Path, threads: int) -> None:
    """fsync every file and directory under ``root`` (and ``root`` itself)."""
    paths: list[Path] = []
    for dirpath, _, filenames in os.walk(root):
        paths.extend(Path(dirpath, f) for f in filenames)
        paths.append(Path(dirpath))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(fsync_path, paths))


def _write_json_atomically(path: Path, content: Mapping[str, Any]) -> None:
    """Replace ``path`` by ``content`` in one atomic step: temp file, fsync, rename, fsync dir."""
    data = json.dumps(content, indent=1, sort_keys=True).encode()
    replace_atomically(path, lambda f: f.write(data))


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


class OutOfCore:
    """An optimizer whose parameters and state live in a Zarr group on disk.

    Make one with `create` (new store) or `open` (existing store), then call
    `step` once per gradient. Each step is crash-safe and idempotent, one process
    steps a store at a time, and every chunk is checksummed (see the module docstring
    and ``docs/out-of-core.md``).

    Examples:
        >>> import numpy as np, tempfile, xpoptim
        >>> d = tempfile.mkdtemp()
        >>> store = xpoptim.OutOfCore.create(
        ...     d, xpoptim.Adam(0.1, regularization=None), {"w": np.ones((4, 3), "f4")},
        ...     chunks=(2, 3))
        >>> summary = store.step({"w": np.full((4, 3), 0.5, "f4")})
        >>> store.step_count, round(float(store.read()[0]["w"][0, 0]), 6)  # 1 - 0.1
        (1, 0.9)

    Args (of the constructor, which `create` and `open` call):
        directory: the store's directory.
        optimizer: the optimizer whose rule each step runs.
        num_workers: threads of the local scheduler (None: Dask's default, the CPU count).
    """

    def __init__(
        self, directory: str | os.PathLike[str], optimizer: Optimizer, num_workers: int | None
    ) -> None:
        _check_elementwise(optimizer)
        _check_policy(optimizer)
        self.directory = Path(directory)
        self.optimizer = optimizer
        self.num_workers = num_workers
        meta = layout.read_meta(self.directory, _OPTIMIZERS)
        self._arrays: dict[str, dict[str, Any]] = meta["arrays"]
        self._fields: list[str] = meta["fields"]
        if self._fields != list(optimizer._buffer_fields()):
            raise StoreError(
                f"{self.directory} holds the state {self._fields}, but this optimizer keeps "
                f"{list(optimizer._buffer_fields())}: a store cannot change which state "
                "buffers its optimizer has (e.g. RMSprop's momentum or centered)"
            )

    # -- construction --------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        optimizer: Optimizer,
        params: Mapping[str, Any],
        *,
        chunks: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        overwrite: bool = False,
        num_workers: int | None = None,
        client: Any = None,
        progress: bool | None = None,
    ) -> OutOfCore:
        """Create a store holding ``params`` and zero state, committed as step 0.

        Every argument is checked before anything is written. Holds the store's writer
        lock while it writes.

        Args:
            directory: where to create it: a new or empty directory, or, with
                ``overwrite``, an xpoptim out-of-core store to replace.
            optimizer: an `xpoptim.SGD`, `xpoptim.RMSprop`, `xpoptim.Adam`
                or `xpoptim.AdamW`, with a config that JSON can store. An optimizer that
                is not elementwise (``elementwise = False``: LAMB, LARS, Adafactor, Muon)
                is refused: each chunk is stepped on its own.
            params: name -> initial values: NumPy, Dask or Zarr arrays of a real floating
                dtype (a Dask array is computed chunk by chunk, so it may be larger than
                memory). Names become directories: no ``/``, ``\\``, NUL, ``.`` or
                ``..``, at most 255 UTF-8 bytes, and no two equal after case folding
                and Unicode normalisation.
            chunks: Zarr chunk shape (positive ints), for all parameters or per name.
                None: a Dask or Zarr input keeps its (regular) chunks, others get chunks
                of about ``chunk_bytes``.
            chunk_bytes: the target chunk size (> 0) when chunks are chosen automatically.
            overwrite: replace an existing xpoptim store in ``directory``. Anything that
                is not recognisably such a store (a folder of other files) is refused,
                and nothing is deleted.
            num_workers: threads used by this and later steps (local scheduler).
            client: a ``dask.distributed`` client to write the initial values with.
            progress: show a progress bar; None (default): where stderr is a terminal.

        Returns:
            The store, at step 0.

        Raises:
            StoreError: ``directory`` is not empty and not a store (or ``overwrite`` is
                False), or another writer holds the store's lock.
            ValueError, TypeError: a bad name, chunk shape, array or optimizer.
        """
        return cls._create(
            directory,
            optimizer,
            params,
            chunks=chunks,
            chunk_bytes=chunk_bytes,
            overwrite=overwrite,
            num_workers=num_workers,
            client=client,
            progress=progress,
            note=None,
        )

    @classmethod
    def _create(
        cls,
        directory: str | os.PathLike[str],
        optimizer: Optimizer,
        params: Mapping[str, Any],
        *,
        chunks: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None,
        chunk_bytes: int,
        overwrite: bool,
        num_workers: int | None,
        client: Any,
        progress: bool | None,
        note: str | None,
        state: Mapping[str, Mapping[str, Any]] | None = None,
        step: int = 0,
    ) -> OutOfCore:
        """`create`, recording ``note`` in the store's description (the demo marks the
        stores it made, so that it replaces only those); with ``state`` (field -> name
        -> Dask array, the parameters' chunks), committed as step ``step`` (`upgrade`)."""
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
        # The commit pointer stores the config: check it can, before writing anything.
        layout.check_storable_config(optimizer.get_config())
        da, zarr = _lazy("dask.array"), _lazy("zarr")
        sources = {
            name: _as_dask(value, name, chunks, chunk_bytes) for name, value in params.items()
        }
        check.params(sources)  # real floating dtypes, one namespace
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"{directory} exists and is not a directory; nothing was changed")
        if directory.is_dir():
            layout.check_replaceable(directory)  # refuses a non-store before any write
            if not overwrite and any(e.name != LOCK for e in directory.iterdir()):
                raise FileExistsError(
                    f"{directory} already holds an xpoptim out-of-core store; pass "
                    "overwrite=True to replace it"
                )
        directory.mkdir(parents=True, exist_ok=True)

        fields = list(optimizer._buffer_fields())
        arrays = {
            name: {
                "shape": list(x.shape),
                "dtype": str(x.dtype),
                "chunks": list(_regular_chunks(x.chunks) or ()),
            }
            for name, x in sources.items()
        }
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "optimizer": type(optimizer).__name__,
            "fields": fields,
            "arrays": arrays,
        }
        if note is not None:
            meta["note"] = note
        with writer_lock(directory):
            # Again under the lock: what is there now is what gets replaced (another
            # process may have created a store since the check above).
            existing = layout.check_replaceable(directory)
            if existing and not overwrite:
                raise FileExistsError(
                    f"{directory} already holds an xpoptim out-of-core store; pass "
                    "overwrite=True to replace it"
                )
            layout.clear_store(directory, existing)
            # Not mode="w": Zarr would empty the directory, the lock file included.
            zarr.create_group(zarr.storage.LocalStore(directory), attributes={"xpoptim": meta})
            store = cls(directory, optimizer, num_workers)
            version = f"v{step}"
            targets = store._create_version(version)
            # Every chunk is written, the zero state included: a missing chunk is an error.
            values = list(sources.values())
            destinations = [targets[f"params/{n}"] for n in sources]
            # The optimizer's own initial state, lazily with the parameters' chunks: zeros
            # for most, the learning rate (Rprop's step sizes) or the parameters
            # (schedule-free's z) for some.
            initial = state if state is not None else optimizer.init(sources)._asdict()
            for n in sources:
                for field in fields:
                    values.append(initial[field][n])
                    destinations.append(targets[f"{field}/{n}"])
            store._compute(
                da.store(values, destinations, lock=False, compute=False),
                client,
                progress=_progress_default(progress),
                num_workers=num_workers,
            )
            _fsync_tree(directory / version, num_workers or os.cpu_count() or 1)
            fsync_path(directory / layout.ROOT_META)  # the store's description
            fsync_path(directory)  # the entries v0 and zarr.json, before the pointer names v0
            store._commit(step, version)
        return store

    @classmethod
    def upgrade(
        cls,
        source: str | os.PathLike[str],
        destination: str | os.PathLike[str],
        *,
        num_workers: int | None = None,
        progress: bool | None = None,
    ) -> OutOfCore:
        """Copy a format-version-1 store (no chunk checksums) into a new store.

        The committed step of ``source`` (parameters, state, step count, optimizer
        config) is written to ``destination`` as a store of this version, checksummed;
        ``source`` is only read, and can be deleted once the new store is checked.
        Version 1 could not detect a corrupt chunk: the copy is only as good as the
        data it read. Every chunk version 1 wrote must be present (all but the zero
        state of step 0, which it left as Zarr's fill value).

        Args:
            source: a store written by an xpoptim of format version 1.
            destination: a new or empty directory (not ``source``).
            num_workers: threads for the copy and the new store's steps.
            progress: show a progress bar; None: where stderr is a terminal.

        Returns:
            The new store, at the step ``source`` had committed.

        Raises:
            StoreError: ``source`` is not a complete version 1 store (a missing chunk
                included), or ``destination`` is not new or empty.
        """
        da, zarr = _lazy("dask.array"), _lazy("zarr")
        integrity = _lazy("xpoptim._outofcore.chunks")

        source, destination = Path(source), Path(destination)
        if destination.resolve() == source.resolve():
            raise ValueError("upgrade writes a new store: destination must not be source")
        if destination.is_dir() and any(e.name != LOCK for e in destination.iterdir()):
            raise StoreError(f"{destination} is not empty: upgrade writes a new store")
        meta = layout.read_meta(source, _OPTIMIZERS, version=1)
        pointer = layout.read_pointer(source, version=1)
        kind, fields, arrays = meta["optimizer"], meta["fields"], meta["arrays"]
        try:
            optimizer = _OPTIMIZERS[kind].from_config(dict(pointer["optimizer"]))
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreError(
                f"{source / POINTER} holds an optimizer config that {kind} refuses: {exc}"
            ) from exc
        if fields != list(optimizer._buffer_fields()):
            raise StoreError(f"{source} holds the state {fields}, but {kind} keeps others")
        step, version = pointer["step"], pointer["version"]
        keys = {f"params/{n}": m for n, m in arrays.items()}
        if step > 0:
            keys.update({f"{f}/{n}": m for f in fields for n, m in arrays.items()})
        integrity.check_chunks_present(source / version, keys)
        reader = zarr.storage.LocalStore(source, read_only=True)

        def load(key: str) -> Any:
            where = f"{source}/{version}/{key}"
            try:
                a = zarr.open_array(reader, path=f"{version}/{key}", mode="r")
            except (FileNotFoundError, zarr.errors.BaseZarrError) as exc:
                raise StoreError(f"the committed array {where} is missing: {exc}") from exc
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise StoreError(f"the metadata of {where} is damaged: {exc}") from exc
            want = keys.get(key, arrays[key.split("/", 1)[1]])
            got = {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
            if got != want:
                raise StoreError(f"the committed array {where} is {got}, the store says {want}")
            return da.from_zarr(a)

        params = {n: load(f"params/{n}") for n in arrays}
        state = None
        if step > 0:
            state = {f: {n: load(f"{f}/{n}") for n in arrays} for f in fields}
        return cls._create(
            destination,
            optimizer,
            params,
            chunks={n: tuple(m["chunks"]) for n, m in arrays.items()},
            chunk_bytes=DEFAULT_CHUNK_BYTES,
            overwrite=False,
            num_workers=num_workers,
            client=None,
            progress=progress,
            note=None,
            state=state,
            step=step,
        )

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        optimizer: Optimizer | None = None,
        *,
        reconfigure: bool = False,
        num_workers: int | None = None,
    ) -> OutOfCore:
        """Open an existing store. Nothing on disk changes; no lock is taken.

        Args:
            directory: a directory made by `create`.
            optimizer: the optimizer to step with; None rebuilds the committed one from its
                stored configuration. It must be of the stored type, and configured as
                committed unless ``reconfigure`` (e.g. a learning-rate schedule).
            reconfigure: accept an ``optimizer`` whose hyperparameters differ from the
                committed ones; the next step commits the new configuration (so it must
                be one JSON can store).
            num_workers: threads of the local scheduler for the steps.

        Raises:
            StoreError: not an xpoptim store, another format version, another optimizer,
                no committed step, a malformed pointer or description, or a missing or
                altered array or chunk.
            TypeError: ``reconfigure`` with a config that cannot be stored.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no out-of-core store at {directory}: not a directory")
        meta = layout.read_meta(directory, _OPTIMIZERS)
        pointer = layout.read_pointer(directory)
        kind = meta["optimizer"]
        if optimizer is None:
            try:
                optimizer = _OPTIMIZERS[kind].from_config(dict(pointer["optimizer"]))
            except (TypeError, ValueError, KeyError) as exc:
                raise StoreError(
                    f"{directory / POINTER} holds an optimizer config that {kind} refuses: {exc}"
                ) from exc
        elif type(optimizer).__name__ != kind:
            raise StoreError(
                f"{directory} was written by the optimizer {kind}, not {type(optimizer).__name__}"
            )
        elif not reconfigure and optimizer.get_config() != pointer["optimizer"]:
            raise StoreError(
                f"{directory} was committed with {pointer['optimizer']}, but the optimizer "
                f"given is configured {optimizer.get_config()}; pass reconfigure=True to "
                "continue with the new hyperparameters"
            )
        else:
            layout.check_storable_config(optimizer.get_config())
        store = cls(directory, optimizer, num_workers)
        store._open_version(pointer["version"])  # every array and chunk present, as described
        return store

    # -- what is committed ---------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """The number of committed steps (read from the pointer on disk)."""
        return int(layout.read_pointer(self.directory)["step"])

    @property
    def version(self) -> str:
        """The committed version's group name (``"v{k}"``)."""
        return str(layout.read_pointer(self.directory)["version"])

    @property
    def names(self) -> list[str]:
        """The parameter names."""
        return list(self._arrays)

    @property
    def layout(self) -> dict[str, dict[str, Any]]:
        """name -> ``{"shape", "dtype", "chunks"}`` of each parameter (and its state)."""
        return {name: dict(meta) for name, meta in self._arrays.items()}

    def arrays(self) -> tuple[dict[str, Any], Any]:
        """The committed parameters and state as (read-only) Zarr arrays.

        They read the committed version: once a later step commits, that version is
        deleted and reading them raises a `StoreError` (a missing chunk is never read
        as zeros). Use `read` for a consistent copy while another process steps.

        Returns:
            ``(params, state)``: name -> ``zarr.Array``, and the optimizer's state
            NamedTuple (``step`` a Python int) holding Zarr arrays.
        """
        pointer = layout.read_pointer(self.directory)
        arrays = self._open_version(pointer["version"], mode="r")
        params = {n: arrays[f"params/{n}"] for n in self._arrays}
        buffers = {f: {n: arrays[f"{f}/{n}"] for n in self._arrays} for f in self._fields}
        return params, self.optimizer.State(int(pointer["step"]), **buffers)

    def read(self) -> tuple[dict[str, Any], Any]:
        """The committed parameters and state loaded as NumPy arrays (small stores only).

        Always one committed step, whole, even while another process steps the store:
        if a commit replaces the version being read, the read starts again on the new
        one (up to `READ_ATTEMPTS` times).

        Raises:
            StoreError: a missing or corrupt chunk (or the store kept changing).
        """
        for attempt in range(READ_ATTEMPTS):
            version = self.version
            try:
                params, state = self.arrays()
                buffers = {
                    f: {n: a[...] for n, a in getattr(state, f).items()} for f in self._fields
                }
                loaded = {n: a[...] for n, a in params.items()}
            except (StoreError, FileNotFoundError):
                if attempt + 1 == READ_ATTEMPTS or self.version == version:
                    raise
                continue  # a step committed and deleted what was being read
            return loaded, self.optimizer.State(state.step, **buffers)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- one step -------------------------------------------------------------------------

    def step(
        self,
        grads: Mapping[str, Any],
        *,
        step: int | None = None,
        client: Any = None,
        num_workers: int | None = None,
        rechunk: bool = False,
        progress: bool | None = None,
    ) -> StepSummary:
        """Apply one optimizer step to the store, crash-safely.

        Everything is checked before anything on disk changes: the arguments, the
        committed version's arrays and the presence of every chunk (each chunk's checksum
        is checked as it is read; a mismatch fails the step before the commit). The step
        then writes version ``v{k+1}`` beside the committed ``v{k}``, flushes it, commits
        it by replacing the pointer atomically, and deletes ``v{k}``, all while holding
        the store's writer lock.

        Args:
            grads: name -> gradient: a Dask array (computed chunk by chunk, e.g. streamed
                from elsewhere), a Zarr array or a NumPy array, with the parameter's shape,
                dtype and, for Dask and Zarr, chunks.
            step: the step number this gradient is for (``k+1``), to make re-runs
                idempotent: if step ``step`` is already committed nothing is done
                (``summary.skipped``); a gap raises.
            client: a ``dask.distributed`` client to run the step on (default: the local
                threaded scheduler).
            num_workers: threads of the local scheduler (default: the store's).
            rechunk: rechunk gradients whose chunks differ from the parameters' instead of
                raising.
            progress: show a progress bar (Dask's, on stderr); None (default): where
                stderr is a terminal.

        Returns:
            A `StepSummary` (``str()`` gives a one-line report).

        Raises:
            StoreError: another writer holds the lock, or the committed version is
                damaged (a missing array or chunk, a checksum mismatch).
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int, got {step!r}")
        with writer_lock(self.directory):
            _phase("locked")
            return self._step(grads, step, client, num_workers, rechunk, progress)

    def _step(
        self,
        grads: Mapping[str, Any],
        step: int | None,
        client: Any,
        num_workers: int | None,
        rechunk: bool,
        progress: bool | None,
    ) -> StepSummary:
        da = _lazy("dask.array")

        start = time.perf_counter()
        pointer = layout.read_pointer(self.directory)
        committed = int(pointer["step"])
        if step is not None:
            if step <= committed:
                # Already committed: nothing to do but tidy what a crash after the commit
                # may have left (the previous version, a temporary pointer).
                self._collect_garbage(keep=pointer["version"])
                return StepSummary(committed, True, 0, 0, 0, time.perf_counter() - start, 0.0)
            if step != committed + 1:
                raise ValueError(
                    f"step={step} but the store has committed {committed} steps: "
                    f"the next step is {committed + 1}"
                )
        self.optimizer._validate_hyperparameters()
        layout.check_storable_config(self.optimizer.get_config())
        old = self._open_version(pointer["version"], mode="r")
        gradients = self._check_grads(grads, rechunk)
        # One Dask task per chunk runs the optimizer's own update on the NumPy chunks it
        # read: the same rule as in memory, in place on buffers the task owns. (Running
        # update() on the Dask arrays also works, but builds ~14 tasks per chunk and a
        # temporary per operation: 1.2-1.8x slower in our measurements.)
        # A copy for the tasks, sharing the learning-rate schedule object itself: a
        # ReduceOnPlateau the user observes keeps its reductions.
        config = self.optimizer.get_config()
        config["learning_rate"] = self.optimizer.learning_rate
        optimizer = type(self.optimizer).from_config(config)
        outputs = {}
        for n in self._arrays:
            inputs = [da.from_zarr(old[f"params/{n}"]), gradients[n]]
            inputs += [da.from_zarr(old[f"{f}/{n}"]) for f in self._fields]
            outputs[n] = da.apply_gufunc(
                _update_chunk,
                ",".join(["()"] * len(inputs)) + "->" + ",".join(["()"] * (len(inputs) - 1)),
                *inputs,
                output_dtypes=[inputs[0].dtype] * (len(inputs) - 1),
                optimizer=optimizer,
                param=n,
                step=committed + 1,
            )

        # Nothing has changed on disk so far. From here on, only v{k+1} is written
        # until the pointer flips.
        new_version = f"v{committed + 1}"
        self._collect_garbage(keep=pointer["version"])
        targets = self._create_version(new_version)
        _phase("created")
        sources: list[Any] = []
        destinations: list[Any] = []
        for n in self._arrays:
            sources.extend(outputs[n])
            destinations.extend(targets[key] for key in (f"params/{n}", *self._field_keys(n)))
        stored = da.store(sources, destinations, lock=False, compute=False)
        workers = num_workers or self.num_workers
        try:
            self._compute(stored, client, progress=_progress_default(progress), num_workers=workers)
        except BaseException:
            # A corrupt chunk, a NaN with nonfinite="raise", an interrupt: nothing is
            # committed, and the partial v{k+1} goes now rather than at the next step.
            shutil.rmtree(self.directory / new_version, ignore_errors=True)
            raise
        _phase("stored")
        flush_start = time.perf_counter()
        _fsync_tree(self.directory / new_version, workers or os.cpu_count() or 1)
        fsync_path(self.directory)  # the entry of v{k+1} itself, before the pointer names it
        flush_s = time.perf_counter() - flush_start
        _phase("flushed")
        self._commit(committed + 1, new_version)
        _phase("committed")
        self._collect_garbage(keep=new_version)
        _phase("collected")
        nbytes = sum(layout.nbytes(a) for a in self._arrays.values())
        buffers = 1 + len(self._fields)
        return StepSummary(
            step=committed + 1,
            skipped=False,
            bytes_read=nbytes * buffers,
            bytes_gradient=nbytes,
            bytes_written=nbytes * buffers,
            elapsed_s=time.perf_counter() - start,
            flush_s=flush_s,
        )

    # -- internals -------------------------------------------------------------------------

    def _check_grads(self, grads: Mapping[str, Any], rechunk: bool) -> dict[str, Any]:
        """Gradients as Dask arrays with the parameters' chunks; raises on any mismatch."""
        da = _lazy("dask.array")

        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be a mapping from names to arrays, got {type(grads)!r}")
        missing = sorted(set(self._arrays) - set(grads))
        extra = sorted(set(grads) - set(self._arrays))
        if missing or extra:
            raise ValueError(
                f"grads do not match the parameter names: missing {missing}, unexpected {extra}"
            )
        out = {}
        for name, meta in self._arrays.items():
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

    def _field_keys(self, name: str) -> list[str]:
        return [f"{f}/{name}" for f in self._fields]

    def _paths(self) -> Iterator[str]:
        for n in self._arrays:
            yield f"params/{n}"
            yield from self._field_keys(n)

    def _create_version(self, version: str) -> dict[str, Any]:
        """Empty arrays for ``version`` (replacing leftovers of an interrupted attempt)."""
        zarr = _lazy("zarr")
        chunks = _lazy("xpoptim._outofcore.chunks")

        path = self.directory / version
        if path.exists():
            shutil.rmtree(path)
        root = zarr.open_group(zarr.storage.LocalStore(self.directory), mode="r+")
        group = root.create_group(version)
        arrays = {}
        for key in self._paths():
            meta = self._arrays[key.split("/", 1)[1]]
            arrays[key] = group.create_array(
                key,
                shape=tuple(meta["shape"]),
                chunks=tuple(meta["chunks"]),
                dtype=meta["dtype"],
                fill_value=0,
                # No compression (float state barely compresses; it would cost time),
                # a CRC-32C checksum per chunk.
                compressors=chunks.CODECS,
                # Write every chunk: a missing chunk is an error, never the fill value.
                config={"write_empty_chunks": True},
            )
        return arrays

    def _open_version(self, version: str, mode: str = "r") -> dict[str, Any]:
        """The arrays of ``version``, checked against the store's description, reading
        through `CheckedStore` (a missing or corrupt chunk raises); every chunk file
        must be present."""
        zarr = _lazy("zarr")
        chunks = _lazy("xpoptim._outofcore.chunks")

        store = chunks.CheckedStore(self.directory, read_only=mode == "r")
        arrays = {}
        for key in self._paths():
            where = f"{self.directory}/{version}/{key}"
            try:
                a = zarr.open_array(store, path=f"{version}/{key}", mode=mode)
            except (FileNotFoundError, zarr.errors.BaseZarrError) as exc:
                raise StoreError(f"the committed array {where} is missing: {exc}") from exc
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # Invalid JSON, or metadata Zarr cannot parse (it raises all of these).
                raise StoreError(
                    f"the metadata of the committed array {where} ({where}/zarr.json) is "
                    f"damaged: {type(exc).__name__}: {exc}"
                ) from exc
            meta = self._arrays[key.split("/", 1)[1]]
            got = {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
            if got != meta:
                raise StoreError(f"the committed array {where} is {got}, the store says {meta}")
            if not any(isinstance(c, chunks.Crc32cCodec) for c in a.compressors):
                raise StoreError(
                    f"the committed array {where} has no chunk checksums (codecs "
                    f"{a.compressors}): it was replaced outside xpoptim"
                )
            arrays[key] = a
        described = {key: self._arrays[key.split("/", 1)[1]] for key in self._paths()}
        chunks.check_chunks_present(self.directory / version, described)
        return arrays

    def _commit(self, step: int, version: str) -> None:
        _write_json_atomically(
            self.directory / POINTER,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "step": step,
                "version": version,
                "optimizer": self.optimizer.get_config(),
            },
        )

    def _collect_garbage(self, keep: str) -> None:
        """Delete every version but ``keep``, and temporary files a killed step left."""
        for entry in self.directory.iterdir():
            if entry.is_dir() and layout.VERSION_NAME.fullmatch(entry.name) and entry.name != keep:
                shutil.rmtree(entry, ignore_errors=True)
            elif is_temporary(entry.name, POINTER) or entry.name.endswith(".partial"):
                # A temporary pointer, or a metadata file Zarr was writing (it writes
                # ``*.partial`` and renames it) when the process was killed.
                entry.unlink(missing_ok=True)
        # The root group's metadata lists no members in Zarr v3, so nothing else to fix.

    def _compute(
        self, stored: Any, client: Any, *, progress: bool, num_workers: int | None = None
    ) -> None:
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
