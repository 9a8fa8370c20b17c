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
import time
from collections.abc import Mapping
from typing import Any

from .._optimizers import Optimizer
from .chunk_step import (
    StepSummary,
    _check_elementwise,
    _check_policy,
    _lazy,
    _phase,
    _progress_default,
    check_create,
    check_grads,
    resolve_optimizer,
    step_graph,
)
from .errors import ConcurrentWriterError, StoreError
from .layout import (
    FORMAT,
    check_storable_config,
    nbytes,
)
from .location import Location
from .repository import (
    BRANCH,
    FORMAT_VERSION,
    READ_ATTEMPTS,
    STEP_KEY,
    array_keys,
    as_store_error,
    commit,
    count_chunks,
    is_icechunk_error,
    local_lock,
    read_meta,
    reason,
    repository_for_create,
    step_snapshot,
    storage,
    tag_snapshot,
)
from .store import Commit, OutOfCore

__all__ = ["IcechunkStore"]


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
        sources, arrays = check_create(optimizer, params, chunks, chunk_bytes)
        zarr = _lazy("zarr")
        fields = list(optimizer._buffer_fields())
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "engine": "icechunk",
            "optimizer": type(optimizer).__name__,
            "fields": fields,
            "arrays": arrays,
            "keep_steps": keep_steps,
        }
        if note is not None:
            meta["note"] = note
        # Icechunk creates a repository only in an empty prefix (and refuses a second
        # creator), so the writer lock file comes after it.
        repo = repository_for_create(where, overwrite)
        with local_lock(where):
            # Commit 1: the layout (arrays without chunks). Icechunk forks a session to
            # the workers only from a committed state; a tip without a step is never
            # opened ("creation did not finish").
            session = repo.writable_session(BRANCH)
            root = zarr.group(store=session.store, overwrite=True, attributes={"xpoptim": meta})
            for key in array_keys(sources, fields):
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
            commit(session, "xpoptim: create the layout", {"xpoptim_layout": True}, where)
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
            raise StoreError(f"cannot reach the store at {where}: {reason(exc)}") from exc
        if repo is None:
            raise StoreError(f"{where} holds no xpoptim store (no Icechunk repository there)")
        meta = read_meta(repo, where, repo.lookup_branch(BRANCH))
        pinned = None
        if tag is not None:
            pinned = tag_snapshot(repo, where, tag)
        elif step is not None:
            pinned = step_snapshot(repo, where, step)
        snapshot = pinned or repo.lookup_branch(BRANCH)
        info = repo.lookup_snapshot(snapshot)
        if STEP_KEY not in info.metadata:
            raise StoreError(
                f"{where} has no committed step: its creation did not finish; create it "
                "again with overwrite=True"
            )
        if pinned is not None:
            meta = read_meta(repo, where, pinned)
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
                if not is_icechunk_error(exc) or self._pinned or attempt + 1 == READ_ATTEMPTS:
                    raise as_store_error(exc, self._where) from exc
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
            snapshot = step_snapshot(self._repo, self._where, step)
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
            target = tag_snapshot(self._repo, self._where, tag)
        else:
            assert step is not None
            target = step_snapshot(self._repo, self._where, step)
        with local_lock(self._where):
            tip = self._repo.lookup_branch(BRANCH)
            try:
                self._repo.reset_branch(BRANCH, target, from_snapshot_id=tip)
            except Exception as exc:
                if is_icechunk_error(exc):
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
        with local_lock(self._where):
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
            if base is not None and is_icechunk_error(exc) and self._moved_from(base):
                # Another writer committed, and its garbage collection removed chunks of
                # our base step (keep_steps=1) while this step was still reading them.
                raise ConcurrentWriterError(
                    f"{self._where}: another writer committed while this step was computed "
                    f"(and collected the chunks it was reading: {exc}); nothing of this step "
                    "was committed: open the store again and continue"
                ) from exc
            raise as_store_error(exc, self._where) from exc
        _phase("stored")
        session.merge(merged)
        commit_start = time.perf_counter()
        commit(
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

    def _moved_from(self, base: str) -> bool:
        """Whether the branch tip is no longer ``base`` (False if it cannot be read)."""
        try:
            return str(self._repo.lookup_branch(BRANCH)) != base
        except Exception:
            return False

    def _expire(self) -> None:
        """Expire the snapshots before the ``keep_steps``-th latest step and collect their
        objects (tagged snapshots stay)."""
        steps = [i for i in self._repo.ancestry(branch=BRANCH) if STEP_KEY in i.metadata]
        if len(steps) <= self.keep_steps:
            return
        oldest_kept = steps[self.keep_steps - 1]
        self._repo.expire_snapshots(older_than=oldest_kept.written_at)
        # Collect the objects no branch or tag reaches that were written before the
        # oldest kept commit: the expired steps' chunks and those of killed or refused
        # steps. A writer that can still commit starts from the tip, after that commit,
        # so its chunks are newer and stay. An object store dates objects to the second
        # (S3's Last-Modified), so there the cutoff goes back to the whole second.
        cutoff = oldest_kept.written_at
        if self._where.path is None:
            cutoff = cutoff.replace(microsecond=0)
        self._repo.garbage_collect(cutoff)

    def _open_arrays(self, snapshot: str) -> dict[str, Any]:
        """The arrays of ``snapshot``, read-only, checked against the description; every
        chunk present in the manifest (Icechunk would read a missing one as zeros)."""
        zarr = _lazy("zarr")
        chunks = _lazy("xpoptim._outofcore.chunks")

        try:
            session = self._repo.readonly_session(snapshot_id=snapshot)
        except Exception as exc:
            raise as_store_error(exc, self._where) from exc
        arrays = {}
        for key in array_keys(self._arrays, self._fields):
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
            present = count_chunks(session.store, key)
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
