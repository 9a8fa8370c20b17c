"""Icechunk repository access for the Icechunk engine: storage, metadata, snapshots.

What `xpoptim._outofcore.transactional.IcechunkStore` needs from a repository, apart
from the step itself: the ``Storage`` of a location, the store's description, commits
with their step metadata, the snapshot of a step or a tag, creation, the local writer
lock, and the mapping of Icechunk's errors to xpoptim's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .chunk_step import _OPTIMIZERS, _lazy
from .errors import ConcurrentWriterError, StoreError
from .layout import FORMAT, describe_entries, meta_problem
from .location import Location
from .lock import writer_lock

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


def is_icechunk_error(exc: BaseException) -> bool:
    ic = _lazy("icechunk")
    return isinstance(exc, ic.IcechunkError)


def array_keys(arrays: Mapping[str, Any], fields: list[str]) -> Iterator[str]:
    for n in arrays:
        yield f"params/{n}"
        yield from (f"{f}/{n}" for f in fields)


def commit(session: Any, message: str, metadata: dict[str, Any], where: Location) -> str:
    ic = _lazy("icechunk")
    try:
        return str(session.commit(message, metadata=metadata))
    except ic.ConflictError as exc:
        raise ConcurrentWriterError(
            f"{where}: another writer committed first ({exc}); nothing of this step was "
            "committed: open the store again to continue from the other writer's step"
        ) from exc


def count_chunks(store: Any, key: str) -> int:
    """How many chunk keys the snapshot's manifest lists for the array ``key``."""
    sync = _lazy("zarr.core.sync").sync

    async def count() -> int:
        chunk = f"{key}/c"
        return sum([1 async for k in store.list_prefix(f"{key}/") if k.startswith(chunk)])

    return int(sync(count()))


def read_meta(repo: Any, where: Location, snapshot: str) -> dict[str, Any]:
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


def step_snapshot(repo: Any, where: Location, step: int) -> str:
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


def tag_snapshot(repo: Any, where: Location, tag: str) -> str:
    if tag not in repo.list_tags():
        raise StoreError(f"{where} has no tag {tag!r} (tags: {sorted(repo.list_tags())})")
    return str(repo.lookup_tag(tag))


def repository_for_create(where: Location, overwrite: bool) -> Any:
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
        raise StoreError(f"cannot create a store at {where}: {reason(exc)}") from exc
    read_meta(repo, where, repo.lookup_branch(BRANCH))  # an xpoptim store, or refused
    if not overwrite:
        raise FileExistsError(
            f"{where} already holds an xpoptim out-of-core store; pass overwrite=True to "
            "replace it (its steps stay in the history until they expire)"
        )
    return repo


@contextlib.contextmanager
def local_lock(where: Location) -> Iterator[None]:
    """The directory engine's ``flock`` for a local repository (Icechunk's local storage
    is not safe for concurrent commits); object storage relies on the commit's conflict
    check."""
    if where.path is None:
        yield
        return
    with writer_lock(Path(where.path)):
        yield


def as_store_error(exc: BaseException, where: Location) -> BaseException:
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
    if is_icechunk_error(exc):
        return StoreError(f"{where}: the store could not be read: {reason(exc)}")
    return exc


#: Object-store error codes that mean the credentials were refused.
_AUTH_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken")


def reason(exc: BaseException) -> str:
    """Icechunk's error in one readable line first (its full text after it).

    A refused credential says so and where credentials come from; a missing bucket says
    that; anything else gives Icechunk's first line.
    """
    text = str(exc)
    lines = [line.strip(" |x`->") for line in text.splitlines()]
    first = next((line for line in lines if line), type(exc).__name__)
    code = next((c for c in _AUTH_CODES if c in text), None)
    if code is not None:
        first = (
            f"the object store refused the credentials ({code}): check storage_options "
            "access_key_id/secret_access_key (or the environment, AWS_* variables or a "
            "profile, when none are given)"
        )
    elif "NoSuchBucket" in text:
        first = "the bucket does not exist (NoSuchBucket): create it first"
    return f"{first}\n(Icechunk: {text.strip()})"
