"""Reading the checkpoint files of xpoptim 0.1 (file ``format_version`` 1): ``.npz``.

Such a file is a zip archive of uncompressed ``.npy`` members. ``np.load`` trusts what the
archive declares: a shape allocates before the data is read (``MemoryError``), a DEFLATE
member is expanded whatever its size, an encrypted or oddly compressed member raises
``RuntimeError``/``NotImplementedError``. Here every member is checked first, from the zip
directory and the ``.npy`` header, against the bytes the file holds:

* stored (not compressed), not encrypted, its sizes those of the directory, inside the file;
* a ``.npy`` header of version 1.0 or 2.0 (parsed by NumPy, without pickle), a dtype of
  float16/32/64 (uint8 for the metadata member), and a declared shape whose bytes are
  exactly the member's;

only then is the member read, into an array of that size, and its CRC-32 checked.
"""

from __future__ import annotations

import math
import struct
import zipfile
import zlib
from typing import IO, Any

import numpy as np

from ._safetensors import FormatError

#: The dtypes a version 1 file holds: float arrays, and the uint8 JSON metadata.
_KINDS = {("f", 2), ("f", 4), ("f", 8), ("u", 1)}
_SUFFIX = ".npy"
#: Errors of the zip and .npy readers on malformed input (beyond the checks made first).
_DECODING = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    OverflowError,
    RuntimeError,
    NotImplementedError,
    SyntaxError,
    struct.error,
    UnicodeDecodeError,
)


def read(f: IO[bytes], size: int) -> dict[str, np.ndarray[Any, Any]]:
    """The members of the ``.npz`` file ``f`` (``size`` bytes), by name without ``.npy``.

    Raises:
        FormatError: the archive or a member is malformed, compressed, encrypted, or
            declares more than it holds.
    """
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            names = [info.filename for info in infos]
            if len(set(names)) != len(names):
                raise FormatError("the archive names a member twice")
            for info in infos:
                _check_entry(info, size)
            return {info.filename[: -len(_SUFFIX)]: _member(zf, info) for info in infos}
    except FormatError:
        raise
    except RecursionError:
        raise FormatError("a .npy header is nested too deeply") from None
    except _DECODING as exc:
        raise FormatError(f"not a readable .npz ({type(exc).__name__}: {exc})") from None


def _check_entry(info: zipfile.ZipInfo, size: int) -> None:
    where = f"member {info.filename!r}"
    if not info.filename.endswith(_SUFFIX):
        raise FormatError(f"{where} is not a .npy member")
    if info.flag_bits & 0x1:
        raise FormatError(f"{where} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED:
        raise FormatError(
            f"{where} is compressed (zip method {info.compress_type}); checkpoints are stored "
            "uncompressed"
        )
    if info.compress_size != info.file_size:
        raise FormatError(
            f"{where} is stored but declares {info.compress_size} bytes in the archive and "
            f"{info.file_size} uncompressed"
        )
    if info.header_offset < 0 or info.header_offset + info.compress_size > size:
        raise FormatError(f"{where} declares {info.file_size} bytes, past the end of the file")


def _member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray[Any, Any]:
    where = f"member {info.filename!r}"
    with zf.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise FormatError(f"{where} has .npy version {version}; this reader takes 1.0, 2.0")
        if dtype.hasobject or (dtype.kind, dtype.itemsize) not in _KINDS:
            raise FormatError(f"{where} has dtype {dtype}; a checkpoint holds float16/32/64")
        nbytes = math.prod(shape) * dtype.itemsize
        header = fp.tell()
        if header + nbytes != info.file_size:
            raise FormatError(
                f"{where} declares shape {shape} of {dtype} ({nbytes} bytes) but holds "
                f"{info.file_size - header} bytes of data"
            )
        data = fp.read(nbytes)
        if len(data) != nbytes or fp.read(1):  # reading to the end checks the CRC-32
            raise FormatError(f"{where} does not hold the {nbytes} bytes it declares")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.astype(dtype.newbyteorder("="), copy=True)
