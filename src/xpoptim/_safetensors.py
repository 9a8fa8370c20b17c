"""The safetensors file format, written and read with every size checked first.

The published format (https://huggingface.co/docs/safetensors/ , "Format")::

    8 bytes      N, the header's size: an unsigned little-endian 64-bit integer
    N bytes      the header: a UTF-8 JSON object, starting with "{", which may be
                 padded with trailing spaces:
                 {"__metadata__": {str: str, ...},
                  name: {"dtype": "F32", "shape": [4, 3], "data_offsets": [begin, end]},
                  ...}
    the rest     the byte buffer: each tensor's bytes, little-endian, C order, at
                 [begin, end) of the buffer; the tensors cover it exactly (no holes, no
                 overlap), and an empty buffer is allowed

No compression, no pickle, one level of JSON for the tensors. A reader therefore knows
every size before it allocates anything: `read_header` checks the header's size against
the file, each tensor's offsets against its dtype and shape and against the file, and
`read_tensor` allocates exactly the bytes the file holds. Only the dtypes xpoptim stores
are read (float16/32/64, uint8); anything else is refused.

The module is independent of xpoptim's checkpoint layout (see ``_checkpoint``), and written
here instead of taken from the ``safetensors`` package so that xpoptim's only dependencies
stay NumPy and array-api-compat; the tests read its files with that package and it reads
theirs.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Mapping
from typing import IO, Any, NamedTuple

import numpy as np

#: Refused beyond this header size (the reference implementation's limit).
MAX_HEADER_BYTES = 100_000_000
#: The buffer starts at a multiple of this (the header is padded with spaces).
ALIGNMENT = 8
#: The dtypes this module reads and writes, by their safetensors code.
DTYPES: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U8": np.dtype("u1"),
}
_CODES = {(dt.kind, dt.itemsize): code for code, dt in DTYPES.items()}
METADATA = "__metadata__"
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
#: More dimensions than NumPy allows is refused before any product is taken.
_MAX_DIMS = 64


class FormatError(ValueError):
    """A file that is not a well-formed safetensors file (the message says why)."""


class Entry(NamedTuple):
    """One tensor of a file: where its bytes are, and how to read them."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def code_of(dtype: np.dtype[Any]) -> str:
    """The safetensors dtype code of a NumPy dtype this module writes.

    Raises:
        ValueError: a dtype other than float16/32/64 or uint8.
    """
    code = _CODES.get((dtype.kind, dtype.itemsize))
    if code is None:
        raise ValueError(
            f"dtype {dtype} cannot be stored (supported: float16, float32, float64, uint8)"
        )
    return code


def write(
    f: IO[bytes], tensors: Mapping[str, np.ndarray[Any, Any]], metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` (host arrays of a supported dtype) and ``metadata`` to ``f``."""
    header: dict[str, Any] = {METADATA: dict(metadata)}
    offset = 0
    for name, a in tensors.items():
        header[name] = {
            "dtype": code_of(a.dtype),
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    blob += b" " * (-(8 + len(blob)) % ALIGNMENT)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in tensors.values():
        if a.size:
            f.write(little_endian_bytes(a))


def little_endian_bytes(a: np.ndarray[Any, Any]) -> memoryview:
    """``a``'s data as bytes in the file's byte order (C order, little-endian; no copy
    when ``a`` already is)."""
    target = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
    return np.ascontiguousarray(a, dtype=target).reshape(-1).view(np.uint8).data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = sorted({k for k, _ in pairs if k in seen or seen.add(k)})  # type: ignore[func-returns-value]
        raise FormatError(f"the header names {twice} twice")
    return out


def _refuse_constant(name: str) -> Any:
    raise FormatError(f"the header holds {name}, which is not JSON")


def parse_json(data: bytes, what: str) -> Any:
    """``data`` as JSON, every decoding failure (deep nesting too) a `FormatError`."""
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_refuse_constant,
        )
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply to be ours") from None
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not UTF-8: {exc}") from None
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, and integers of too many digits
        raise FormatError(f"{what} is not valid JSON: {exc}") from None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, spec: Any, data_start: int) -> Entry:
    where = f"tensor {name!r}"
    if not isinstance(spec, dict) or set(spec) != _ENTRY_KEYS:
        raise FormatError(f"{where} must be an object with keys {sorted(_ENTRY_KEYS)}")
    code = spec["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise FormatError(f"{where} has dtype {code!r}; this reader takes {sorted(DTYPES)}")
    shape = spec["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(_int(n) and n >= 0 for n in shape)
    ):
        raise FormatError(f"{where} has shape {shape!r}: not a list of integers >= 0")
    offsets = spec["data_offsets"]
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_int(n) for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise FormatError(
            f"{where} has data_offsets {offsets!r}: not [begin, end] with 0 <= begin <= end"
        )
    dtype = DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if offsets[1] - offsets[0] != nbytes:
        raise FormatError(
            f"{where} declares shape {tuple(shape)} of {code} ({nbytes} bytes) but "
            f"data_offsets {offsets} ({offsets[1] - offsets[0]} bytes)"
        )
    return Entry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_header(f: io.BufferedIOBase, size: int) -> tuple[dict[str, str], dict[str, Entry]]:
    """The metadata and the tensors of the file ``f`` (of ``size`` bytes, read from 0).

    Reads only the header, whose size is checked against ``size`` first.

    Raises:
        FormatError: anything that is not a well-formed file; the tensors' offsets are
            checked to cover exactly the rest of the file.
    """
    prefix = f.read(8)
    if len(prefix) < 8:
        raise FormatError(f"{size} bytes is too short for the 8-byte header size")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"the header size {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > size:
        raise FormatError(f"the header size {n} runs past the end of the file ({size} bytes)")
    blob = f.read(n)
    if len(blob) != n:
        raise FormatError(f"the header ends after {len(blob)} of its {n} bytes")
    if not blob.startswith(b"{"):
        raise FormatError("the header does not start with '{'")
    header = parse_json(blob.rstrip(b" "), "the header")
    if not isinstance(header, dict):
        raise FormatError("the header is not a JSON object")
    metadata = header.pop(METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"the header's {METADATA!r} must map strings to strings")
    data_start = 8 + n
    entries = {name: _entry(name, spec, data_start) for name, spec in header.items()}
    position = data_start
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != position:
            gap = (
                "overlaps the previous tensor" if e.begin < position else "leaves a hole before it"
            )
            raise FormatError(f"tensor {name!r} starts at byte {e.begin - data_start} and {gap}")
        position = e.end
    if position != size:
        raise FormatError(
            f"the tensors end at byte {position} of the file, which has {size} bytes "
            "(truncated, or data beyond the tensors)"
        )
    return metadata, entries


def read_tensor(f: io.BufferedIOBase, entry: Entry) -> np.ndarray[Any, Any]:
    """The tensor at ``entry`` (from `read_header`), as a new native-byte-order array."""
    out = np.empty(entry.shape, dtype=entry.dtype)
    if out.size:
        f.seek(entry.begin)
        got = f.readinto(out.reshape(-1).view(np.uint8).data)
        if got != entry.end - entry.begin:
            raise FormatError(
                f"the file ended inside a tensor ({got} of {entry.end - entry.begin} bytes)"
            )
    return out.astype(entry.dtype.newbyteorder("="), copy=False)
