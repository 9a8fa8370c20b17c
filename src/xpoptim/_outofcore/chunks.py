"""Chunk integrity for the out-of-core store: checksums, and a missing chunk is an error.

Every array of a store (format version 2) ends its codec chain with Zarr v3's
``crc32c`` codec: each chunk file carries a CRC-32C of its bytes, which Zarr checks when
it decodes the chunk. Zarr itself reads a chunk file that does not exist as the fill
value (zeros), which would silently step and commit zeros; and its checksum error does
not say which chunk. So the store reads through `CheckedStore`, a Zarr ``LocalStore``
that raises `CorruptChunkError` naming the chunk for both: a missing chunk file and one
whose checksum does not match. `check_chunks_present` also lists a version's chunk files
before a step starts, so a deleted chunk is reported before anything is written.

Imports Zarr: load it only when the store is used.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from .layout import StoreError

# Zarr's own CRC-32C implementation (a dependency of zarr), untyped.
google_crc32c: Any = importlib.import_module("google_crc32c")

#: The bytes-to-bytes codecs of every array: no compression (float state barely
#: compresses and it costs time on every step), a CRC-32C checksum per chunk.
CODECS = (Crc32cCodec(),)

_CHUNK_KEY = re.compile(r"(?:^|/)c(?:/[0-9]+)*\Z")


class CorruptChunkError(StoreError):
    """A chunk of a committed array is missing or fails its checksum."""


class CheckedStore(zarr.storage.LocalStore):  # type: ignore[misc,unused-ignore]
    """A Zarr ``LocalStore`` whose chunk reads fail loudly instead of reading zeros.

    A chunk key (``.../c/i/j``) whose file is missing raises `CorruptChunkError` instead
    of returning None (which Zarr turns into the fill value); a chunk whose trailing
    CRC-32C does not match its bytes raises it too, naming the file. Metadata reads are
    unchanged.
    """

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        buffer = await super().get(key, prototype, byte_range)
        if byte_range is not None or not _CHUNK_KEY.search(key):
            return buffer
        if buffer is None:
            raise CorruptChunkError(
                f"the chunk file {self.root / key} is missing: the store was altered outside "
                "xpoptim (a missing chunk is never read as zeros); restore it from a backup"
            )
        data = buffer.as_numpy_array()
        stored = bytes(data[-4:])
        computed = np.uint32(google_crc32c.value(data[:-4])).tobytes()
        if len(data) < 4 or stored != computed:
            raise CorruptChunkError(
                f"the chunk file {self.root / key} fails its CRC-32C checksum (stored "
                f"{stored.hex()}, computed {computed.hex()}): its bytes changed on disk after "
                "they were written; restore the store from a backup"
            )
        return buffer


def check_chunks_present(version_dir: Path, keys: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise `CorruptChunkError` if a chunk file of any array of a version is missing.

    Args:
        version_dir: ``DIR/v{k}``.
        keys: array key (``params/w``) -> its description (``shape``, ``chunks``).
    """
    for key, meta in keys.items():
        grid = [math.ceil(n / c) for n, c in zip(meta["shape"], meta["chunks"], strict=True)]
        if math.prod(grid) == 0:
            continue
        base = version_dir / key / "c"
        found: set[str] = set()
        if base.is_file():
            found.add("")
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, base).replace(os.sep, "/")
            found.update(f if rel == "." else f"{rel}/{f}" for f in files)
        for index in itertools.product(*(range(n) for n in grid)):
            if "/".join(map(str, index)) not in found:
                where = base.joinpath(*map(str, index))
                raise CorruptChunkError(
                    f"the chunk file {where} is missing ({len(found)} of {math.prod(grid)} "
                    f"chunks of {version_dir.name}/{key} present): the store was altered "
                    "outside xpoptim (a missing chunk is never read as zeros); restore it "
                    "from a backup"
                )
