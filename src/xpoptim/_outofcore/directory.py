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

import datetime
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .._atomic import fsync_path, is_temporary, replace_atomically
from .._optimizers import Optimizer
from . import layout
from .chunk_step import (
    _OPTIMIZERS,
    DEFAULT_CHUNK_BYTES,
    MissingDependencyError,
    StepSummary,
    _check_elementwise,
    _check_policy,
    _lazy,
    _phase,
    _progress_default,
    check_create,
    check_grads,
    compute,
    resolve_optimizer,
    step_graph,
)
from .layout import FORMAT, FORMAT_VERSION, LOCK, POINTER, StoreError
from .location import Location
from .lock import writer_lock
from .store import Commit, OutOfCore

#: How often `OutOfCore.read` starts again when a commit replaced the version it read.
READ_ATTEMPTS = 5

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


class DirectoryStore(OutOfCore):
    """The directory engine: a store in a local directory, format 2 (the module docstring).

    Made by `OutOfCore.create` and `OutOfCore.open` for a local path (the default engine).
    Each step is crash-safe and idempotent, one process steps a store at a time, and every
    chunk is checksummed.

    Args (of the constructor):
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
        self.location = str(directory)
        self.optimizer = optimizer
        self.num_workers = num_workers
        meta = layout.read_meta(self.directory, _OPTIMIZERS)
        self._arrays = meta["arrays"]
        self._fields = meta["fields"]
        self._check_fields(self.directory)

    engine = "directory"

    @classmethod
    def _create_at(
        cls,
        where: Location,
        optimizer: Optimizer,
        params: Mapping[str, Any],
        *,
        chunks: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None,
        chunk_bytes: int,
        overwrite: bool,
        num_workers: int | None,
        client: Any,
        progress: bool | None,
        keep_steps: int,
        note: str | None,
        state: Mapping[str, Mapping[str, Any]] | None = None,
        step: int = 0,
    ) -> DirectoryStore:
        assert where.path is not None
        assert keep_steps == 1
        return cls._create(
            where.path,
            optimizer,
            params,
            chunks=chunks,
            chunk_bytes=chunk_bytes,
            overwrite=overwrite,
            num_workers=num_workers,
            client=client,
            progress=progress,
            note=note,
            state=state,
            step=step,
        )

    # -- construction --------------------------------------------------------------------

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
    ) -> DirectoryStore:
        """`OutOfCore.create`, recording ``note`` in the store's description (the demo marks the
        stores it made, so that it replaces only those); with ``state`` (field -> name
        -> Dask array, the parameters' chunks), committed as step ``step`` (`upgrade`)."""
        sources, arrays = check_create(optimizer, params, chunks, chunk_bytes)
        da, zarr = _lazy("dask.array"), _lazy("zarr")
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
            compute(
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
    def _open_at(
        cls,
        where: Location,
        optimizer: Optimizer | None,
        *,
        reconfigure: bool,
        num_workers: int | None,
        step: int | None,
        tag: str | None,
    ) -> DirectoryStore:
        """`OutOfCore.open` for a directory store. Nothing on disk changes; no lock."""
        assert where.path is not None
        directory = where.path
        if step is not None or tag is not None:
            raise StoreError(
                f"{directory} is a directory store, which keeps only its committed step: "
                "opening an earlier step or a tag needs an Icechunk store "
                "(engine='icechunk'; OutOfCore.upgrade copies this one into one)"
            )
        if not directory.is_dir():
            raise FileNotFoundError(f"no out-of-core store at {directory}: not a directory")
        meta = layout.read_meta(directory, _OPTIMIZERS)
        pointer = layout.read_pointer(directory)
        optimizer = resolve_optimizer(
            directory, meta["optimizer"], pointer["optimizer"], optimizer, reconfigure
        )
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

    def history(self) -> list[Commit]:
        """The committed step alone: a directory store keeps no history (Icechunk does)."""
        pointer = layout.read_pointer(self.directory)
        when = datetime.datetime.fromtimestamp(
            (self.directory / POINTER).stat().st_mtime, tz=datetime.UTC
        )
        return [Commit(int(pointer["step"]), str(pointer["version"]), when)]

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
        gradients = check_grads(self._arrays, grads, rechunk)
        outputs = step_graph(
            self.optimizer, self._arrays, self._fields, old, gradients, committed + 1
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
            compute(stored, client, progress=_progress_default(progress), num_workers=workers)
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
