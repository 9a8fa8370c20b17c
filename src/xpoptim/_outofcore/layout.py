"""The on-disk layout of an out-of-core store: names, metadata, pointer, what a store is.

Everything here validates before anything is written, and turns every malformed file
into a `StoreError` that says which file and what is wrong with it (never a raw
KeyError, AttributeError or JSONDecodeError). No Dask or Zarr import: these checks run
before the optional dependencies are needed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .._atomic import is_temporary
from .errors import StoreError as StoreError

#: Identifies an xpoptim out-of-core store (root group attribute ``xpoptim.format``).
FORMAT = "xpoptim.outofcore"
#: Version of the on-disk layout this module reads and writes. Version 2 added a crc32c
#: checksum to every chunk and writes every chunk (the zero state of step 0 included).
FORMAT_VERSION = 2
#: The commit pointer, in the store's root directory.
POINTER = "xpoptim.json"
#: The writers' lock file, in the store's root directory (see `xpoptim._outofcore.lock`).
LOCK = "xpoptim.lock"
#: The root group's metadata (Zarr v3).
ROOT_META = "zarr.json"
#: Longest parameter name, in UTF-8 bytes: a file name component on common file systems.
MAX_NAME_BYTES = 255

VERSION_NAME = re.compile(r"v[0-9]+")


# -- names ------------------------------------------------------------------------------


def check_names(names: Iterable[object]) -> None:
    """Refuse parameter names that a file system or Zarr cannot hold, before any write.

    Each name becomes a directory ``v{k}/{field}/{name}``: it must be a non-empty string
    of at most `MAX_NAME_BYTES` UTF-8 bytes, without ``/``, ``\\``, NUL or other control
    characters, not ``.``/``..`` (nor only dots: Zarr refuses those), not starting with
    ``__`` (reserved by Zarr), not ``zarr.json``; and no two names may be equal after
    Unicode NFKC normalisation and case folding (they would be one directory on macOS or
    Windows file systems, or on a case-insensitive volume).

    Raises:
        ValueError: naming the first bad name and the rule it breaks.
    """
    seen: dict[str, str] = {}
    for name in names:
        problem = _name_problem(name)
        if problem:
            raise ValueError(f"params name {name!r} cannot name a Zarr array: {problem}")
        assert isinstance(name, str)
        key = unicodedata.normalize("NFKC", name).casefold()
        if key in seen:
            raise ValueError(
                f"params names {seen[key]!r} and {name!r} would be the same directory on a "
                "case-insensitive or Unicode-normalising file system: rename one"
            )
        seen[key] = name


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid Unicode (a lone surrogate)"
    if len(encoded) > MAX_NAME_BYTES:
        return f"it is {len(encoded)} bytes long in UTF-8, the limit is {MAX_NAME_BYTES}"
    bad = sorted({c for c in name if c in "/\\" or unicodedata.category(c) == "Cc"})
    if bad:
        return f"it contains {', '.join(repr(c) for c in bad)}"
    if set(name) == {"."}:
        return "a name made of dots only is a special directory"
    if name.startswith("__"):
        return "names starting with '__' are reserved by Zarr"
    if name.casefold() == ROOT_META:
        return f"{ROOT_META!r} is Zarr's metadata file"
    return None


def check_chunks(chunks: object, name: str, ndim: int) -> tuple[int, ...]:
    """``chunks`` as a tuple of positive ints, one per dimension, or a clear ValueError."""
    if isinstance(chunks, int) and not isinstance(chunks, bool):
        chunks = (chunks,) * ndim
    if not isinstance(chunks, tuple | list) or any(
        isinstance(c, bool) or not isinstance(c, int) for c in chunks
    ):
        raise TypeError(f"chunks for {name!r} must be a tuple of ints, got {chunks!r}")
    if len(chunks) != ndim:
        raise ValueError(
            f"chunks for {name!r} has {len(chunks)} dimensions, the parameter {ndim}: {chunks!r}"
        )
    if any(c <= 0 for c in chunks):
        raise ValueError(f"chunks for {name!r} must be positive, got {tuple(chunks)!r}")
    return tuple(chunks)


def check_chunk_bytes(chunk_bytes: object) -> int:
    """``chunk_bytes`` as a positive int, or a clear error."""
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
        raise TypeError(f"chunk_bytes must be an int (bytes), got {chunk_bytes!r}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return chunk_bytes


def check_storable_config(config: Mapping[str, Any]) -> None:
    """The commit pointer stores the optimizer's config as JSON: refuse one it cannot."""
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"the optimizer's config cannot be stored as JSON ({exc}): use a number or "
            "a built-in schedule (xpoptim.schedules) as learning_rate"
        ) from exc


# -- reading and checking the metadata ----------------------------------------------------


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise StoreError(f"{path} ({what}) is not valid JSON: {exc}") from exc
    except IsADirectoryError as exc:
        raise StoreError(f"{path} ({what}) is a directory, not a file") from exc


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_meta(
    directory: Path,
    optimizers: Iterable[str],
    *,
    any_version: bool = False,
    version: int = FORMAT_VERSION,
) -> Any:
    """The store's description (root group attribute ``xpoptim``), fully checked.

    Args:
        directory: the store.
        optimizers: the optimizer type names this xpoptim can step.
        any_version: accept any format version (to recognise a store to overwrite).
        version: the format version expected (1: a store to upgrade).

    Raises:
        StoreError: not a store, another format version, or a malformed description.
    """
    path = directory / ROOT_META
    try:
        root = _load_json(path, "the root group's metadata")
    except FileNotFoundError as exc:
        raise StoreError(
            f"{directory} is not an xpoptim out-of-core store (no {ROOT_META})"
        ) from exc
    attributes = root.get("attributes") if isinstance(root, dict) else None
    meta = attributes.get("xpoptim") if isinstance(attributes, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{directory} is a Zarr group but not an xpoptim out-of-core store")
    if any_version:
        return meta
    found = meta.get("format_version")
    if found != version or not _is_int(found):
        hint = ""
        if found == 1 and version == FORMAT_VERSION:
            hint = (
                " (version 1 stores have no chunk checksums, so their data cannot be "
                "verified: copy it into a new store of this version with "
                "xpoptim.OutOfCore.upgrade(old_directory, new_directory))"
            )
        raise StoreError(
            f"{directory} has out-of-core format version {found!r}; "
            f"this xpoptim reads version {version}{hint}"
        )
    if meta.get("optimizer") not in set(optimizers):
        raise StoreError(f"{directory} holds an unknown optimizer {meta.get('optimizer')!r}")
    bad = meta_problem(meta)
    if bad:
        raise StoreError(f"{path} has a malformed xpoptim description: {bad}")
    return meta


def meta_problem(meta: Mapping[str, Any]) -> str | None:
    """What is wrong with a store description's fields and arrays (None: nothing)."""
    fields, arrays = meta.get("fields"), meta.get("arrays")
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        return f"'fields' must be a list of strings, got {fields!r}"
    if any(_name_problem(f) for f in fields):
        return f"'fields' holds a name that cannot be a directory: {fields!r}"
    if not isinstance(arrays, dict) or not arrays:
        return "'arrays' must be a non-empty object"
    try:
        check_names(arrays)
    except ValueError as exc:
        return str(exc)
    for name, a in arrays.items():
        if not isinstance(a, dict) or set(a) != {"shape", "dtype", "chunks"}:
            return f"arrays[{name!r}] must have exactly 'shape', 'dtype', 'chunks': {a!r}"
        shape, chunks, dtype = a["shape"], a["chunks"], a["dtype"]
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            return f"arrays[{name!r}].shape must be a list of sizes, got {shape!r}"
        if (
            not isinstance(chunks, list)
            or len(chunks) != len(shape)
            or not all(_is_int(c) and c > 0 for c in chunks)
        ):
            return f"arrays[{name!r}].chunks must be {len(shape)} positive ints, got {chunks!r}"
        if dtype not in ("float16", "float32", "float64"):
            return f"arrays[{name!r}].dtype must be a float dtype, got {dtype!r}"
    return None


def read_pointer(directory: Path, *, version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The commit pointer, fully checked: step, version and optimizer config.

    Args:
        directory: the store.
        version: the format version expected (1: a store to upgrade).

    Raises:
        StoreError: missing (creation did not finish), not JSON, or malformed.
    """
    path = directory / POINTER
    try:
        pointer = _load_json(path, "the commit pointer")
    except FileNotFoundError as exc:
        raise StoreError(
            f"{directory} has no committed step ({POINTER} is missing): its creation did not "
            "finish; create it again with overwrite=True"
        ) from exc
    if not isinstance(pointer, dict):
        raise StoreError(f"{path} must hold a JSON object, not {type(pointer).__name__}")
    if pointer.get("format") != FORMAT or pointer.get("format_version") != version:
        raise StoreError(
            f"{path} is not an xpoptim out-of-core pointer of format version {version}: "
            f"format {pointer.get('format')!r}, version {pointer.get('format_version')!r}"
        )
    missing = sorted({"step", "version", "optimizer"} - set(pointer))
    if missing:
        raise StoreError(f"{path} is missing {missing}: it was edited or damaged")
    step, name, config = pointer["step"], pointer["version"], pointer["optimizer"]
    if not _is_int(step) or step < 0:
        raise StoreError(f"{path}: 'step' must be a non-negative integer, got {step!r}")
    if name != f"v{step}":
        raise StoreError(f"{path}: 'version' must be 'v{step}' for step {step}, got {name!r}")
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise StoreError(f"{path}: 'optimizer' must be a JSON object, got {config!r}")
    return pointer


def nbytes(meta: Mapping[str, Any]) -> int:
    """Bytes of one array of this description."""
    itemsize: int = {"float16": 2, "float32": 4, "float64": 8}[meta["dtype"]]
    return int(math.prod(meta["shape"])) * itemsize


# -- what a directory holds: overwrite only a store -------------------------------------------


def store_entry(name: str) -> bool:
    """Whether ``name`` (an entry of a store's root directory) is one a store may hold."""
    return (
        name in (ROOT_META, POINTER, LOCK)
        or VERSION_NAME.fullmatch(name) is not None
        or is_temporary(name, POINTER)
        or (name.startswith(ROOT_META + ".") and name.endswith(".partial"))
    )


def describe_entries(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_replaceable(directory: Path) -> list[Path]:
    """What overwriting ``directory`` would delete, or a StoreError saying what is there.

    Only an xpoptim store is replaced: a root ``zarr.json`` that says so, and nothing
    but the entries a store has (its versions, pointer, lock, temporary files). An
    empty directory (or one holding only the lock file) needs nothing deleted.
    """
    entries = sorted(directory.iterdir())
    if all(e.name == LOCK for e in entries):
        return []
    foreign = [e.name for e in entries if not store_entry(e.name)]
    links = [e.name for e in entries if e.is_symlink()]
    files_as_dirs = [e.name for e in entries if VERSION_NAME.fullmatch(e.name) and not e.is_dir()]
    if foreign or links or files_as_dirs:
        what = foreign or links or files_as_dirs
        raise StoreError(
            f"{directory} is not empty and is not an xpoptim out-of-core store: it holds "
            f"{describe_entries(what)}; overwrite=True replaces only a store, so nothing "
            "was deleted: choose a new or empty directory"
        )
    try:
        read_meta(directory, (), any_version=True)
    except StoreError as exc:
        raise StoreError(
            f"{directory} is not recognisably an xpoptim out-of-core store ({exc}); "
            "overwrite=True replaces only a store, so nothing was deleted"
        ) from exc
    return [e for e in entries if e.name != LOCK]


def clear_store(directory: Path, entries: list[Path]) -> None:
    """Delete a store's ``entries`` (from `check_replaceable`), the pointer first and the
    root metadata last, so that an interrupted overwrite leaves a directory that is
    still recognisably a store (or empty), which a new overwrite accepts."""
    order = sorted(entries, key=lambda e: (e.name != POINTER, e.name == ROOT_META, e.name))
    for entry in order:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    if entries:
        from .._atomic import fsync_directory

        fsync_directory(os.fspath(directory))
