"""`OutOfCore`, the public front: an optimizer whose parameters and state live in a store.

`OutOfCore.create` and `OutOfCore.open` parse the location (`xpoptim._outofcore.location`)
and hand it to an engine, a subclass of `OutOfCore`:

* `xpoptim._outofcore.directory.DirectoryStore` (``engine="directory"``, the default for a
  local path): today's format 2, one committed step, one writer by ``flock``;
* `xpoptim._outofcore.transactional.IcechunkStore` (``engine="icechunk"``, the only one for
  object storage): each step one Icechunk commit, concurrent writers refused by conflict
  detection, history with tags and rollback, expiry and garbage collection.

Both run the same per-chunk step (`xpoptim._outofcore.chunk_step`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._optimizers import Optimizer
from .chunk_step import DEFAULT_CHUNK_BYTES, StepSummary
from .errors import StoreError
from .location import Location, parse

__all__ = ["Commit", "OutOfCore"]


@dataclass(frozen=True)
class Commit:
    """One committed step in a store's history (`OutOfCore.history`).

    Attributes:
        step: the step count after this commit (0: the initial values).
        snapshot: the engine's identifier (an Icechunk snapshot id; the version
            directory ``v{k}`` for the directory engine).
        written_at: when it was committed (None where the engine does not record it).
        tags: the tags naming this commit.
    """

    step: int
    snapshot: str
    written_at: datetime.datetime | None
    tags: tuple[str, ...] = ()


class OutOfCore:
    """An optimizer whose parameters and state live in Zarr arrays, stepped chunk by chunk.

    Make one with `create` (new store) or `open` (existing store), then call `step`
    once per gradient. Every step is atomic (a crash leaves the last committed step),
    idempotent with ``step=``, and refused rather than interleaved when another writer
    is at work; every chunk is checksummed (see ``docs/out-of-core.md``).

    Examples:
        >>> import numpy as np, tempfile, xpoptim
        >>> d = tempfile.mkdtemp()
        >>> store = xpoptim.OutOfCore.create(
        ...     d, xpoptim.Adam(0.1, regularization=None), {"w": np.ones((4, 3), "f4")},
        ...     chunks=(2, 3))
        >>> summary = store.step({"w": np.full((4, 3), 0.5, "f4")})
        >>> store.step_count, round(float(store.read()[0]["w"][0, 0]), 6)  # 1 - 0.1
        (1, 0.9)
    """

    #: The engine's name (``"directory"`` or ``"icechunk"``).
    engine: ClassVar[str] = ""
    #: The location as given (a path or a URL).
    location: str
    optimizer: Optimizer
    num_workers: int | None
    _arrays: dict[str, dict[str, Any]]
    _fields: list[str]

    # -- construction (dispatch to an engine) ----------------------------------------------

    @classmethod
    def create(
        cls,
        location: str | os.PathLike[str],
        optimizer: Optimizer,
        params: Mapping[str, Any],
        *,
        chunks: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        overwrite: bool = False,
        num_workers: int | None = None,
        client: Any = None,
        progress: bool | None = None,
        engine: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        keep_steps: int | None = None,
    ) -> OutOfCore:
        """Create a store holding ``params`` and the optimizer's initial state, as step 0.

        Every argument is checked before anything is written.

        Args:
            location: a local directory (new, empty, or with ``overwrite`` a store to
                replace), or an object-store URL (``s3://bucket/prefix``, ``gs://...``,
                ``az://container/prefix``). A URL is never taken for a local path; an
                unknown scheme is a `ValueError`.
            optimizer: an elementwise xpoptim optimizer (SGD, RMSprop, Adam, AdamW,
                Adagrad, Adadelta, Adamax, NAdam, RAdam, Rprop, Lion, ScheduleFreeAdamW)
                with a config that JSON can store; LAMB, LARS, Adafactor and Muon are
                refused (each chunk is stepped on its own).
            params: name -> initial values: NumPy, Dask or Zarr arrays of a real floating
                dtype (a Dask array is computed chunk by chunk, so it may be larger than
                memory). Names become paths: no ``/``, ``\\``, NUL, ``.`` or ``..``, at
                most 255 UTF-8 bytes, no two equal after case folding and normalisation.
            chunks: Zarr chunk shape (positive ints), for all parameters or per name.
                None: a Dask or Zarr input keeps its (regular) chunks, others get chunks
                of about ``chunk_bytes``.
            chunk_bytes: the target chunk size (> 0) when chunks are chosen automatically.
            overwrite: replace an existing xpoptim store at ``location``; anything that
                is not recognisably such a store is refused, and nothing is deleted.
            num_workers: threads used by this and later steps (local scheduler).
            client: a ``dask.distributed`` client to write the initial values with.
            progress: show a progress bar; None (default): where stderr is a terminal.
            engine: None (``"directory"`` for a local path, ``"icechunk"`` for a URL) or
                ``"icechunk"`` for a local Icechunk repository (history, tags).
            storage_options: object storage only: ``endpoint_url``, ``region``,
                ``access_key_id``, ``secret_access_key``, ``allow_http``, ... (see
                `xpoptim._outofcore.location.STORAGE_OPTIONS`); credentials default to
                the environment.
            keep_steps: Icechunk only: how many of the latest committed steps stay
                readable (default 1; tagged steps are kept too). Older steps expire and
                their chunks are garbage-collected after each step, so storage stays at
                about ``keep_steps + 1`` versions.

        Returns:
            The store, at step 0.

        Raises:
            StoreError: the location holds something else (or a store, without
                ``overwrite``), or another writer holds it.
            ValueError, TypeError: a bad location, name, chunk shape, array or optimizer.
        """
        where = parse(location, engine=engine, storage_options=storage_options)
        engine_type = _engine(where)
        return engine_type._create_at(
            where,
            optimizer,
            params,
            chunks=chunks,
            chunk_bytes=chunk_bytes,
            overwrite=overwrite,
            num_workers=num_workers,
            client=client,
            progress=progress,
            keep_steps=_check_keep_steps(keep_steps, where),
            note=None,
        )

    @classmethod
    def open(
        cls,
        location: str | os.PathLike[str],
        optimizer: Optimizer | None = None,
        *,
        reconfigure: bool = False,
        num_workers: int | None = None,
        engine: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        step: int | None = None,
        tag: str | None = None,
    ) -> OutOfCore:
        """Open an existing store. Nothing in the store changes; no lock is taken.

        Args:
            location: as for `create`. A local directory is opened by the engine that
                wrote it (an Icechunk repository or a directory store), whatever ``engine``.
            optimizer: the optimizer to step with; None rebuilds the committed one from its
                stored configuration. It must be of the stored type, and configured as
                committed unless ``reconfigure`` (e.g. a learning-rate schedule).
            reconfigure: accept an ``optimizer`` whose hyperparameters differ from the
                committed ones; the next step commits the new configuration.
            num_workers: threads of the local scheduler for the steps.
            engine: None, or the engine expected (a check).
            storage_options: object storage only, as for `create`.
            step: open, read-only, the store as it was after this step (Icechunk: any
                step still in `history`). Use `rollback` to continue from there.
            tag: open, read-only, the step a `tag` names (Icechunk).

        Raises:
            StoreError: not an xpoptim store, another format version, another optimizer,
                no committed step, a damaged description, array or chunk, or a ``step``
                or ``tag`` the history does not hold.
            TypeError: ``reconfigure`` with a config that cannot be stored.
        """
        where = parse(location, engine=engine, storage_options=storage_options)
        if where.is_local and engine is None:
            where = _detect_local_engine(where)
        return _engine(where)._open_at(
            where, optimizer, reconfigure=reconfigure, num_workers=num_workers, step=step, tag=tag
        )

    @classmethod
    def upgrade(
        cls,
        source: str | os.PathLike[str],
        destination: str | os.PathLike[str],
        *,
        num_workers: int | None = None,
        progress: bool | None = None,
        engine: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        keep_steps: int | None = None,
    ) -> OutOfCore:
        """Copy the committed step of a directory store into a new store.

        ``source`` is a directory store of format version 1 (no chunk checksums) or 2
        (today's); ``destination`` is a new location of any engine: this is how a
        directory store moves to Icechunk (history, object storage). Parameters, state,
        step count and optimizer config are copied chunk by chunk; ``source`` is only
        read, and can be deleted once the new store is checked. A version 1 store could
        not detect a corrupt chunk: the copy is only as good as the data it read.

        Args:
            source: a directory store.
            destination: a new location (a new or empty directory, or a URL).
            num_workers: as for `create`.
            progress: as for `create`.
            engine: as for `create`.
            storage_options: as for `create`.
            keep_steps: as for `create`.

        Raises:
            StoreError: ``source`` is not a complete directory store (a missing chunk
                included), or ``destination`` is not new or empty.
        """
        from .migrate import read_for_upgrade

        where = parse(destination, engine=engine, storage_options=storage_options)
        copy = read_for_upgrade(source, where)
        return _engine(where)._create_at(
            where,
            copy.optimizer,
            copy.params,
            chunks=copy.chunks,
            chunk_bytes=DEFAULT_CHUNK_BYTES,
            overwrite=False,
            num_workers=num_workers,
            client=None,
            progress=progress,
            keep_steps=_check_keep_steps(keep_steps, where),
            note=None,
            state=copy.state,
            step=copy.step,
        )

    # -- what an engine implements -----------------------------------------------------------

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
    ) -> OutOfCore:
        raise NotImplementedError

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
    ) -> OutOfCore:
        raise NotImplementedError

    @property
    def step_count(self) -> int:
        """The number of committed steps (read from the store)."""
        raise NotImplementedError

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
        """Apply one optimizer step to the store, atomically (see the engine's `step`)."""
        raise NotImplementedError

    def arrays(self) -> tuple[dict[str, Any], Any]:
        """The committed parameters and state as read-only Zarr arrays."""
        raise NotImplementedError

    def read(self) -> tuple[dict[str, Any], Any]:
        """The committed parameters and state loaded as NumPy arrays (small stores only)."""
        raise NotImplementedError

    def history(self) -> list[Commit]:
        """The committed steps still readable, newest first.

        The directory engine keeps only the committed step; an Icechunk store keeps its
        last ``keep_steps`` steps and every tagged one.
        """
        raise NotImplementedError

    def tag(self, name: str, *, step: int | None = None) -> Commit:
        """Name a committed step (default: the latest), so it never expires (Icechunk)."""
        raise StoreError(
            f"{self.location} is a {self.engine} store, which keeps only its committed step: "
            "tags need a store created with engine='icechunk' (OutOfCore.upgrade copies "
            "this one into such a store)"
        )

    def rollback(self, *, step: int | None = None, tag: str | None = None) -> Commit:
        """Make an earlier step (or a tagged one) the committed step again (Icechunk)."""
        raise StoreError(
            f"{self.location} is a {self.engine} store, which keeps only its committed step: "
            "rollback needs a store created with engine='icechunk' (OutOfCore.upgrade "
            "copies this one into such a store)"
        )

    # -- shared --------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The parameter names."""
        return list(self._arrays)

    @property
    def layout(self) -> dict[str, dict[str, Any]]:
        """name -> ``{"shape", "dtype", "chunks"}`` of each parameter (and its state)."""
        return {name: dict(meta) for name, meta in self._arrays.items()}

    def _check_fields(self, where: object) -> None:
        if self._fields != list(self.optimizer._buffer_fields()):
            raise StoreError(
                f"{where} holds the state {self._fields}, but this optimizer keeps "
                f"{list(self.optimizer._buffer_fields())}: a store cannot change which state "
                "buffers its optimizer has (e.g. RMSprop's momentum or centered)"
            )

    def __repr__(self) -> str:
        return (
            f"<OutOfCore {self.engine} store at {self.location!r}: "
            f"{type(self.optimizer).__name__}, {len(self._arrays)} parameters>"
        )


def _engine(where: Location) -> type[OutOfCore]:
    if where.engine == "directory":
        from .directory import DirectoryStore

        return DirectoryStore
    from .transactional import IcechunkStore

    return IcechunkStore


def _detect_local_engine(where: Location) -> Location:
    """A local store is opened by the engine that wrote it: an Icechunk repository has a
    ``repo`` file or ``refs`` folder at its root, a directory store a ``zarr.json``."""
    from dataclasses import replace

    assert where.path is not None
    icechunk = (where.path / "repo").exists() or (where.path / "refs").is_dir()
    return replace(where, engine="icechunk" if icechunk else "directory")


def _check_keep_steps(keep_steps: int | None, where: Location) -> int:
    if keep_steps is None:
        return 1
    if isinstance(keep_steps, bool) or not isinstance(keep_steps, int) or keep_steps < 1:
        raise ValueError(f"keep_steps must be a positive int, got {keep_steps!r}")
    if where.engine != "icechunk" and keep_steps != 1:
        raise ValueError(
            "keep_steps applies to Icechunk stores (engine='icechunk'); a directory store "
            "keeps only its committed step"
        )
    return keep_steps
