"""The Icechunk engine: every step one atomic commit, on local disk or object storage.

`Icechunk <https://icechunk.io>`_ is a transactional storage engine for Zarr: a commit
replaces any number of arrays at once (serializable isolation), a writer whose base
snapshot is no longer the branch tip is refused (conflict detection), every commit is a
snapshot that can be read, tagged or restored, and old snapshots expire and are
garbage-collected. xpoptim uses it rather than extending the directory engine's pointer
file, which needs a POSIX rename and one machine.

Layout of a store (an Icechunk repository; branch ``main``)::

    zarr.json (root group)     attributes["xpoptim"]: format, format version 3, engine,
                               optimizer type, state fields, arrays, keep_steps
    params/{name}              the parameters
    {field}/{name}             the state buffers (``momentums``, ...)
    commit metadata            {"xpoptim_step": k, "optimizer": config} on every step's commit

`create` makes two commits: the layout (no ``xpoptim_step``: not a step, never opened)
and step 0 with the initial values. Each `IcechunkStore.step` reads the arrays of the
branch tip's snapshot, writes every chunk of every output into a new session (forked to
the Dask workers, merged back) and commits it with the step's metadata:

* a crash at any moment leaves the branch on the last committed step (the chunks written
  by the killed step are never referenced, and are garbage-collected later);
* a second writer is refused: on local disk at once by the directory engine's ``flock``
  (Icechunk's local storage is not safe for concurrent commits), on object storage by the
  conflict check of its commit (`ConcurrentWriterError`), after which nothing of its step
  is visible;
* readers read one snapshot, never a half step.

After each commit, snapshots older than the ``keep_steps``-th latest expire (tagged ones
stay readable) and their objects are garbage-collected, so storage stays at about
``keep_steps + 1`` versions. Every chunk carries a CRC-32C checksum, as in the directory
engine; the number of chunks of each array is checked against its shape before a step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import _validation as check
from .._optimizers import Optimizer
from .chunk_step import (
    _OPTIMIZERS,
    StepSummary,
    _as_dask,
    _check_elementwise,
    _check_policy,
    _lazy,
    _phase,
    _progress_default,
    _regular_chunks,
    check_grads,
    resolve_optimizer,
    step_graph,
)
from .errors import ConcurrentWriterError, StoreError
from .layout import (
    FORMAT,
    check_chunk_bytes,
    check_names,
    check_storable_config,
    describe_entries,
    meta_problem,
    nbytes,
)
from .location import Location
from .lock import writer_lock
from .store import Commit, OutOfCore

__all__ = ["BRANCH", "FORMAT_VERSION", "IcechunkStore"]

#: The branch every step commits to.
BRANCH = "main"
#: The format version of an xpoptim store kept in Icechunk.
FORMAT_VERSION = 3
#: Commit metadata key holding the step count after the commit.
STEP_KEY = "xpoptim_step"
#: How often `IcechunkStore.read` starts again when garbage collection removed the
#: snapshot it was reading (a writer committed ``keep_steps`` steps meanwhile).
READ_ATTEMPTS = 5


def storage(where: Location) -> Any:
    """The Icechunk ``Storage`` of a location (credentials from the options or the
    environment)."""
    ic = _lazy("icechunk")
    if where.path is not None:
        if "ICECHUNK_LOG" not in os.environ:
            # Icechunk warns that its local storage is not safe for concurrent commits:
            # xpoptim holds the directory engine's writer lock around every commit.
            ic.set_logs_filter("warn,icechunk::storage::object_store=error")
        return ic.local_filesystem_storage(str(where.path.resolve()))
    options = dict(where.options)
    prefix = where.prefix or None
    if where.scheme == "s3":
        if not {"access_key_id", "anonymous"} & set(options):
            options["from_env"] = True
        return ic.s3_storage(bucket=where.bucket, prefix=prefix, **options)
    if where.scheme == "gs":
        credentials = {"service_account_file", "service_account_key", "application_credentials"}
        if not (credentials | {"bearer_token", "anonymous"}) & set(options):
            options["from_env"] = True
        return ic.gcs_storage(bucket=where.bucket, prefix=prefix, **options)
    account = options.pop("account")
    if not {"access_key", "sas_token", "bearer_token"} & set(options):
        options["from_env"] = True
    return ic.azure_storage(account=account, container=where.bucket, prefix=where.prefix, **options)


def _icechunk_error(exc: BaseException) -> bool:
    ic = _lazy("icechunk")
    return isinstance(exc, ic.IcechunkError)


class IcechunkStore(OutOfCore):
    """An out-of-core store kept in an Icechunk repository (see the module docstring).

    Made by `OutOfCore.create` and `OutOfCore.open` for an object-store URL, or for a
    local path with ``engine="icechunk"``.
    """

    engine = "icechunk"

    def __init__(
        self,
        where: Location,
        repo: Any,
        optimizer: Optimizer,
        num_workers: int | None,
        meta: Mapping[str, Any],
        pinned: str | None = None,
    ) -> None:
        _check_elementwise(optimizer)
        _check_policy(optimizer)
        self._where = where
        self.location = where.text
        self._repo = repo
        self.optimizer = optimizer
        self.num_workers = num_workers
        self._arrays = {n: dict(m) for n, m in meta["arrays"].items()}
        self._fields = list(meta["fields"])
        self.keep_steps = int(meta["keep_steps"])
        #: The snapshot a read-only store was opened at (``open(step=...)``, ``tag=``).
        self._pinned = pinned
        self._check_fields(where)

    # -- construction ---------------------------------------------------------------------

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
    ) -> IcechunkStore:
        _check_elementwise(optimizer)
        if not isinstance(optimizer, Optimizer) or type(optimizer).__name__ not in _OPTIMIZERS:
            raise TypeError(
                f"optimizer must be one of xpoptim's elementwise optimizers "
                f"({', '.join(sorted(_OPTIMIZERS))}), got {optimizer!r}"
            )
        _check_policy(optimizer)
        if not isinstance(params, Mapping) or not params:
            raise ValueError("params must be a non-empty mapping from names to arrays")
        check_names(params)
        check_chunk_bytes(chunk_bytes)
        check_storable_config(optimizer.get_config())
        zarr = _lazy("zarr")
        _lazy("dask.array")
        sources = {
            name: _as_dask(value, name, chunks, chunk_bytes) for name, value in params.items()
        }
        check.params(sources)
        fields = list(optimizer._buffer_fields())
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "engine": "icechunk",
            "optimizer": type(optimizer).__name__,
            "fields": fields,
            "arrays": {
                name: {
                    "shape": list(x.shape),
                    "dtype": str(x.dtype),
                    "chunks": list(_regular_chunks(x.chunks) or ()),
                }
                for name, x in sources.items()
            },
            "keep_steps": keep_steps,
        }
        if note is not None:
            meta["note"] = note
        # Icechunk creates a repository only in an empty prefix (and refuses a second
        # creator), so the writer lock file comes after it.
        repo = _repository_for_create(where, overwrite)
        with _local_lock(where):
            # Commit 1: the layout (arrays without chunks). Icechunk forks a session to
            # the workers only from a committed state; a tip without a step is never
            # opened ("creation did not finish").
            session = repo.writable_session(BRANCH)
            root = zarr.group(store=session.store, overwrite=True, attributes={"xpoptim": meta})
            for key in _keys(sources, fields):
                m = meta["arrays"][key.split("/", 1)[1]]
                root.create_array(
                    key,
                    shape=tuple(m["shape"]),
                    chunks=tuple(m["chunks"]),
                    dtype=m["dtype"],
                    fill_value=0,
                    compressors=_lazy("xpoptim._outofcore.chunks").CODECS,
                    config={"write_empty_chunks": True},
                )
            _commit(session, "xpoptim: create the layout", {"xpoptim_layout": True}, where)
            store = cls(where, repo, optimizer, num_workers, meta)
            initial = state if state is not None else optimizer.init(sources)._asdict()
            outputs = {n: [sources[n], *(initial[f][n] for f in fields)] for n in sources}
            store._write_step(
                outputs, step, client, progress, num_workers, start=time.perf_counter()
            )
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
    ) -> IcechunkStore:
        ic = _lazy("icechunk")
        if where.path is not None and not where.path.is_dir():
            raise FileNotFoundError(f"no out-of-core store at {where}: not a directory")
        if step is not None and tag is not None:
            raise ValueError("give step or tag, not both")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int, got {step!r}")
        if tag is not None and not isinstance(tag, str):
            raise TypeError(f"tag must be a str, got {tag!r}")
        try:
            exists = ic.Repository.exists(storage(where))
            repo = ic.Repository.open(storage(where)) if exists else None
        except ic.IcechunkError as exc:
            raise StoreError(f"cannot reach the store at {where}: {exc}") from exc
        if repo is None:
            raise StoreError(f"{where} holds no xpoptim store (no Icechunk repository there)")
        meta = _read_meta(repo, where, repo.lookup_branch(BRANCH))
        pinned = None
        if tag is not None:
            pinned = _tag_snapshot(repo, where, tag)
        elif step is not None:
            pinned = _step_snapshot(repo, where, step)
        snapshot = pinned or repo.lookup_branch(BRANCH)
        info = repo.lookup_snapshot(snapshot)
        if STEP_KEY not in info.metadata:
            raise StoreError(
                f"{where} has no committed step: its creation did not finish; create it "
                "again with overwrite=True"
            )
        if pinned is not None:
            meta = _read_meta(repo, where, pinned)
        optimizer = resolve_optimizer(
            where, meta["optimizer"], info.metadata["optimizer"], optimizer, reconfigure
        )
        store = cls(where, repo, optimizer, num_workers, meta, pinned=pinned)
        store._open_arrays(snapshot)  # every array as described, every chunk present
        return store

    # -- what is committed ----------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """The committed step count (of the branch tip; of the pinned step if opened at one)."""
        snapshot = self._pinned or self._repo.lookup_branch(BRANCH)
        return int(self._repo.lookup_snapshot(snapshot).metadata[STEP_KEY])

    @property
    def read_only(self) -> bool:
        """True when opened at an earlier step or a tag (`OutOfCore.open`)."""
        return self._pinned is not None

    def arrays(self) -> tuple[dict[str, Any], Any]:
        """The committed parameters and state as read-only Zarr arrays of one snapshot.

        They keep reading that snapshot after later steps commit, until it expires and
        its chunks are garbage-collected (``keep_steps`` steps later; a tag keeps it).
        """
        snapshot = self._pinned or self._repo.lookup_branch(BRANCH)
        step = int(self._repo.lookup_snapshot(snapshot).metadata[STEP_KEY])
        arrays = self._open_arrays(snapshot)
        params = {n: arrays[f"params/{n}"] for n in self._arrays}
        buffers = {f: {n: arrays[f"{f}/{n}"] for n in self._arrays} for f in self._fields}
        return params, self.optimizer.State(step, **buffers)

    def read(self) -> tuple[dict[str, Any], Any]:
        """The committed parameters and state loaded as NumPy arrays, from one snapshot.

        Raises:
            StoreError: a missing or corrupt chunk (or the snapshot kept expiring).
        """
        for attempt in range(READ_ATTEMPTS):
            try:
                params, state = self.arrays()
                buffers = {
                    f: {n: a[...] for n, a in getattr(state, f).items()} for f in self._fields
                }
                return {n: a[...] for n, a in params.items()}, self.optimizer.State(
                    state.step, **buffers
                )
            except Exception as exc:
                if not _icechunk_error(exc) or self._pinned or attempt + 1 == READ_ATTEMPTS:
                    raise _as_store_error(exc, self._where) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def history(self) -> list[Commit]:
        """The committed steps still readable, newest first: the branch's last
        ``keep_steps`` steps and every tagged step."""
        tags: dict[str, list[str]] = {}
        for name in sorted(self._repo.list_tags()):
            tags.setdefault(self._repo.lookup_tag(name), []).append(name)
        commits: dict[str, Commit] = {}
        infos = list(self._repo.ancestry(branch=BRANCH))
        infos += [self._repo.lookup_snapshot(s) for s in tags if s not in {i.id for i in infos}]
        for info in infos:
            if STEP_KEY in info.metadata and info.id not in commits:
                commits[info.id] = Commit(
                    int(info.metadata[STEP_KEY]),
                    info.id,
                    info.written_at,
                    tuple(tags.get(info.id, ())),
                )
        return sorted(commits.values(), key=lambda c: (c.written_at or 0, c.step), reverse=True)

    def tag(self, name: str, *, step: int | None = None) -> Commit:
        """Name a committed step (default: the latest): it stays readable, whatever expires.

        Raises:
            StoreError: the name is taken, or ``step`` is not in `history`.
        """
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"tag must be a non-empty name without '/', got {name!r}")
        if step is None:
            snapshot = self._pinned or self._repo.lookup_branch(BRANCH)
        else:
            snapshot = _step_snapshot(self._repo, self._where, step)
        if name in self._repo.list_tags():
            raise StoreError(f"{self._where} already has a tag {name!r}; nothing was changed")
        self._repo.create_tag(name, snapshot)
        return self._commit_of(snapshot)

    def rollback(self, *, step: int | None = None, tag: str | None = None) -> Commit:
        """Make an earlier step (one still in `history`, or a tagged one) the committed step.

        The steps after it leave the branch (a tag keeps any of them readable) and are
        garbage-collected by the steps that follow. Refused with `ConcurrentWriterError`
        if another writer commits meanwhile.
        """
        if (step is None) == (tag is None):
            raise ValueError("give exactly one of step or tag")
        if self._pinned is not None:
            raise StoreError(f"this store was opened read-only at an earlier step: {self}")
        if tag is not None:
            target = _tag_snapshot(self._repo, self._where, tag)
        else:
            assert step is not None
            target = _step_snapshot(self._repo, self._where, step)
        with _local_lock(self._where):
            tip = self._repo.lookup_branch(BRANCH)
            try:
                self._repo.reset_branch(BRANCH, target, from_snapshot_id=tip)
            except Exception as exc:
                if _icechunk_error(exc):
                    raise ConcurrentWriterError(
                        f"{self._where}: another writer committed while rolling back; "
                        f"nothing was changed by the rollback ({exc})"
                    ) from exc
                raise
        return self._commit_of(target)

    # -- one step -------------------------------------------------------------------------------

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
        """Apply one optimizer step as one Icechunk commit.

        Everything is checked before anything is written: the arguments, the committed
        arrays and the presence of every chunk (each chunk's checksum is checked as it is
        read; a mismatch fails the step, which is then never committed). The new chunks
        are written by the Dask tasks (on the workers of ``client`` if given) into a
        session forked from the branch tip, merged and committed at once.

        Args:
            grads: name -> gradient (Dask, Zarr or NumPy) with the parameter's shape,
                dtype and, for Dask and Zarr, chunks.
            step: the step this gradient is for (``k+1``): if already committed nothing is
                done (``summary.skipped``); a gap raises.
            client: a ``dask.distributed`` client to run the step on.
            num_workers: threads of the local scheduler (default: the store's).
            rechunk: rechunk gradients whose chunks differ from the parameters'.
            progress: show Dask's progress bar; None: where stderr is a terminal.

        Raises:
            ConcurrentWriterError: another writer holds the store (local) or committed a
                step first (object storage); nothing of this step was committed.
            StoreError: opened read-only, or a missing or corrupt chunk.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int, got {step!r}")
        if self._pinned is not None:
            raise StoreError(
                f"{self._where} was opened read-only at step {self.step_count}; to continue "
                "from there, open it normally and call rollback(step=...)"
            )
        start = time.perf_counter()
        with _local_lock(self._where):
            _phase("locked")
            base = self._repo.lookup_branch(BRANCH)
            committed = int(self._repo.lookup_snapshot(base).metadata[STEP_KEY])
            if step is not None:
                if step <= committed:
                    return StepSummary(committed, True, 0, 0, 0, time.perf_counter() - start, 0.0)
                if step != committed + 1:
                    raise ValueError(
                        f"step={step} but the store has committed {committed} steps: "
                        f"the next step is {committed + 1}"
                    )
            self.optimizer._validate_hyperparameters()
            check_storable_config(self.optimizer.get_config())
            old = self._open_arrays(base)
            gradients = check_grads(self._arrays, grads, rechunk)
            outputs = step_graph(
                self.optimizer, self._arrays, self._fields, old, gradients, committed + 1
            )
            return self._write_step(
                outputs, committed + 1, client, progress, num_workers, start=start, base=base
            )

    # -- internals ------------------------------------------------------------------------------

    def _write_step(
        self,
        outputs: Mapping[str, list[Any]],
        step: int,
        client: Any,
        progress: bool | None,
        num_workers: int | None,
        *,
        start: float,
        base: str | None = None,
    ) -> StepSummary:
        """Write ``outputs`` (name -> [param, *buffers], Dask) and commit them as ``step``."""
        zarr, dask = _lazy("zarr"), _lazy("dask")
        ic_dask = _lazy("icechunk.dask")

        session = self._repo.writable_session(BRANCH)
        if base is not None and session.snapshot_id != base:
            raise ConcurrentWriterError(
                f"{self._where}: another writer committed while this step was prepared; "
                "nothing of this step was committed: open the store again and continue"
            )
        fork = session.fork()
        sources: list[Any] = []
        targets: list[Any] = []
        for n, values in outputs.items():
            keys = [f"params/{n}", *(f"{f}/{n}" for f in self._fields)]
            for key, value in zip(keys, values, strict=True):
                sources.append(value)
                # Every chunk is written, zeros included: a missing chunk is an error.
                target = zarr.open_array(fork.store, path=key, mode="r+")
                targets.append(target.with_config({"write_empty_chunks": True}))
        workers = num_workers or self.num_workers
        # A client is made current rather than put in dask.config: the global config is
        # pickled into every worker process a Nanny (re)starts, and a Client cannot be, so
        # a LocalCluster's worker killed during the step would never come back.
        scheduler: dict[str, Any] = {"scheduler": "threads"}
        current: Any = contextlib.nullcontext()
        if client is not None:
            scheduler["scheduler"] = "dask.distributed"
            current = client.as_current()
        elif workers:
            scheduler["num_workers"] = workers
        bar: Any = contextlib.nullcontext()
        if _progress_default(progress):
            bar = _lazy("dask.diagnostics").ProgressBar() if client is None else bar
        _phase("opened")
        try:
            with current, dask.config.set(**scheduler), bar:
                merged = ic_dask.store_dask(sources=sources, targets=targets)
        except Exception as exc:
            raise _as_store_error(exc, self._where) from exc
        _phase("stored")
        session.merge(merged)
        commit_start = time.perf_counter()
        _commit(
            session,
            f"xpoptim step {step}",
            {STEP_KEY: step, "optimizer": self.optimizer.get_config()},
            self._where,
        )
        commit_s = time.perf_counter() - commit_start
        _phase("committed")
        self._expire()
        _phase("collected")
        nbytes_all = sum(nbytes(a) for a in self._arrays.values())
        buffers = 1 + len(self._fields)
        return StepSummary(
            step=step,
            skipped=False,
            bytes_read=nbytes_all * buffers if base is not None else 0,
            bytes_gradient=nbytes_all if base is not None else 0,
            bytes_written=nbytes_all * buffers,
            elapsed_s=time.perf_counter() - start,
            flush_s=commit_s,
        )

    def _expire(self) -> None:
        """Expire the snapshots before the ``keep_steps``-th latest step and collect their
        objects (tagged snapshots stay)."""
        steps = [i for i in self._repo.ancestry(branch=BRANCH) if STEP_KEY in i.metadata]
        if len(steps) <= self.keep_steps:
            return
        oldest_kept, newest_expired = steps[self.keep_steps - 1], steps[self.keep_steps]
        self._repo.expire_snapshots(older_than=oldest_kept.written_at)
        # Only objects written before the newest expired step's commit: the chunks of a
        # step still being written by another writer are newer, and stay.
        self._repo.garbage_collect(newest_expired.written_at)

    def _open_arrays(self, snapshot: str) -> dict[str, Any]:
        """The arrays of ``snapshot``, read-only, checked against the description; every
        chunk present in the manifest (Icechunk would read a missing one as zeros)."""
        zarr = _lazy("zarr")
        chunks = _lazy("xpoptim._outofcore.chunks")

        try:
            session = self._repo.readonly_session(snapshot_id=snapshot)
        except Exception as exc:
            raise _as_store_error(exc, self._where) from exc
        arrays = {}
        for key in _keys(self._arrays, self._fields):
            meta = self._arrays[key.split("/", 1)[1]]
            where = f"{self._where} (snapshot {snapshot}): {key}"
            try:
                a = zarr.open_array(session.store, path=key, mode="r")
            except Exception as exc:
                raise StoreError(f"the committed array {where} is missing: {exc}") from exc
            got = {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
            if got != meta:
                raise StoreError(f"the committed array {where} is {got}, the store says {meta}")
            if not any(isinstance(c, chunks.Crc32cCodec) for c in a.compressors):
                raise StoreError(f"the committed array {where} has no chunk checksums")
            present = _count_chunks(session.store, key)
            expected = a.nchunks
            if present != expected:
                raise chunks.CorruptChunkError(
                    f"the committed array {where} has {present} of its {expected} chunks: the "
                    "store was altered outside xpoptim (a missing chunk is never read as zeros)"
                )
            arrays[key] = a
        return arrays

    def _commit_of(self, snapshot: str) -> Commit:
        info = self._repo.lookup_snapshot(snapshot)
        tags = tuple(
            sorted(t for t in self._repo.list_tags() if self._repo.lookup_tag(t) == snapshot)
        )
        return Commit(int(info.metadata[STEP_KEY]), info.id, info.written_at, tags)

    def __str__(self) -> str:
        return self.location


# -- helpers ------------------------------------------------------------------------------------


def _keys(arrays: Mapping[str, Any], fields: list[str]) -> Iterator[str]:
    for n in arrays:
        yield f"params/{n}"
        yield from (f"{f}/{n}" for f in fields)


def _commit(session: Any, message: str, metadata: dict[str, Any], where: Location) -> str:
    ic = _lazy("icechunk")
    try:
        return str(session.commit(message, metadata=metadata))
    except ic.ConflictError as exc:
        raise ConcurrentWriterError(
            f"{where}: another writer committed first ({exc}); nothing of this step was "
            "committed: open the store again to continue from the other writer's step"
        ) from exc


def _count_chunks(store: Any, key: str) -> int:
    """How many chunk keys the snapshot's manifest lists for the array ``key``."""
    sync = _lazy("zarr.core.sync").sync

    async def count() -> int:
        chunk = f"{key}/c"
        return sum([1 async for k in store.list_prefix(f"{key}/") if k.startswith(chunk)])

    return int(sync(count()))


def _read_meta(repo: Any, where: Location, snapshot: str) -> dict[str, Any]:
    zarr = _lazy("zarr")
    try:
        root = zarr.open_group(repo.readonly_session(snapshot_id=snapshot).store, mode="r")
        meta = root.attrs.get("xpoptim")
    except Exception as exc:
        raise StoreError(
            f"{where} is an Icechunk repository but not an xpoptim store: {exc}"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{where} is an Icechunk repository but not an xpoptim store")
    if meta.get("format_version") != FORMAT_VERSION or meta.get("engine") != "icechunk":
        raise StoreError(
            f"{where} has out-of-core format version {meta.get('format_version')!r}; this "
            f"xpoptim reads version {FORMAT_VERSION} in Icechunk"
        )
    if meta.get("optimizer") not in _OPTIMIZERS:
        raise StoreError(f"{where} holds an unknown optimizer {meta.get('optimizer')!r}")
    keep = meta.get("keep_steps")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise StoreError(f"{where} has a malformed keep_steps {keep!r}")
    bad = meta_problem(meta)
    if bad:
        raise StoreError(f"{where} has a malformed xpoptim description: {bad}")
    return dict(meta)


def _step_snapshot(repo: Any, where: Location, step: int) -> str:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {step!r}")
    candidates = list(repo.ancestry(branch=BRANCH))
    candidates += [repo.lookup_snapshot(repo.lookup_tag(t)) for t in sorted(repo.list_tags())]
    for info in candidates:
        if info.metadata.get(STEP_KEY) == step:
            return str(info.id)
    kept = sorted({int(i.metadata[STEP_KEY]) for i in candidates if STEP_KEY in i.metadata})
    raise StoreError(
        f"{where} does not hold step {step} any more (readable steps: {kept}); keep more "
        "with keep_steps=, or tag a step to keep it"
    )


def _tag_snapshot(repo: Any, where: Location, tag: str) -> str:
    if tag not in repo.list_tags():
        raise StoreError(f"{where} has no tag {tag!r} (tags: {sorted(repo.list_tags())})")
    return str(repo.lookup_tag(tag))


def _repository_for_create(where: Location, overwrite: bool) -> Any:
    """A new repository at ``where``, or with ``overwrite`` the xpoptim one there."""
    ic = _lazy("icechunk")
    if where.path is not None:
        path = where.path
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} exists and is not a directory; nothing was changed")
        path.mkdir(parents=True, exist_ok=True)
        others = [e.name for e in path.iterdir()]
        if others and not (path / "refs").is_dir():
            raise StoreError(
                f"{path} is not empty and not an Icechunk store ({describe_entries(others)}): "
                "nothing was deleted"
            )
    try:
        exists = ic.Repository.exists(storage(where))
        if not exists:
            return ic.Repository.create(storage(where))
        repo = ic.Repository.open(storage(where))
    except ic.IcechunkError as exc:
        raise StoreError(f"cannot create a store at {where}: {exc}") from exc
    _read_meta(repo, where, repo.lookup_branch(BRANCH))  # an xpoptim store, or refused
    if not overwrite:
        raise FileExistsError(
            f"{where} already holds an xpoptim out-of-core store; pass overwrite=True to "
            "replace it (its steps stay in the history until they expire)"
        )
    return repo


@contextlib.contextmanager
def _local_lock(where: Location) -> Iterator[None]:
    """The directory engine's ``flock`` for a local repository (Icechunk's local storage
    is not safe for concurrent commits); object storage relies on the commit's conflict
    check."""
    if where.path is None:
        yield
        return
    with writer_lock(Path(where.path)):
        yield


def _as_store_error(exc: BaseException, where: Location) -> BaseException:
    """A checksum mismatch or an Icechunk read error as a `StoreError`; others unchanged."""
    chunks = _lazy("xpoptim._outofcore.chunks")
    if isinstance(exc, StoreError):
        return exc
    text = str(exc)
    if "checksum" in text.lower():
        error: BaseException = chunks.CorruptChunkError(
            f"a chunk of {where} fails its checksum ({text}): the store was altered outside "
            "xpoptim; nothing was committed"
        )
        return error
    if _icechunk_error(exc):
        return StoreError(f"{where}: the store could not be read: {text}")
    return exc


_ = datetime  # the type of Commit.written_at
