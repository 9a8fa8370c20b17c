"""Reading a directory store's committed step for `OutOfCore.upgrade` (formats 1 and 2).

`OutOfCore.upgrade` copies it into a new store of any engine; this module only reads
(format 2 through the checksums, format 1 as it is: it had none).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from .._optimizers import Optimizer
from . import layout
from .chunk_step import _OPTIMIZERS, _lazy
from .errors import StoreError
from .layout import FORMAT_VERSION, LOCK, POINTER
from .location import Location

__all__ = ["Upgrade", "read_for_upgrade"]


class Upgrade(NamedTuple):
    """A directory store's committed step, read lazily for `OutOfCore.upgrade`."""

    optimizer: Optimizer
    params: dict[str, Any]
    state: dict[str, dict[str, Any]] | None
    step: int
    chunks: dict[str, tuple[int, ...]]


def read_for_upgrade(source: str | os.PathLike[str], where: Location) -> Upgrade:
    """The committed step of the directory store ``source`` (format 1 or 2), lazily,
    for `OutOfCore.upgrade` to write at ``where``. Checks that ``where`` is new."""
    da, zarr = _lazy("dask.array"), _lazy("zarr")
    integrity = _lazy("xpoptim._outofcore.chunks")

    source = Path(source)
    destination = where.path
    if destination is not None:
        if destination.resolve() == source.resolve():
            raise ValueError("upgrade writes a new store: destination must not be source")
        if destination.is_dir() and any(e.name != LOCK for e in destination.iterdir()):
            raise StoreError(f"{destination} is not empty: upgrade writes a new store")
    found = layout.read_meta(source, _OPTIMIZERS, any_version=True).get("format_version")
    fmt = 1 if found == 1 else FORMAT_VERSION
    meta = layout.read_meta(source, _OPTIMIZERS, version=fmt)
    pointer = layout.read_pointer(source, version=fmt)
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
    if step > 0 or fmt > 1:  # version 1 left the zero state of step 0 off the disk
        keys.update({f"{f}/{n}": m for f in fields for n, m in arrays.items()})
    integrity.check_chunks_present(source / version, keys)
    # Version 2 chunks are read through their checksums; version 1 has none.
    reader = (
        integrity.CheckedStore(source, read_only=True)
        if fmt > 1
        else zarr.storage.LocalStore(source, read_only=True)
    )

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
    if step > 0 or fmt > 1:
        state = {f: {n: load(f"{f}/{n}") for n in arrays} for f in fields}
    chunks = {n: tuple(m["chunks"]) for n, m in arrays.items()}
    return Upgrade(optimizer, params, state, step, chunks)
