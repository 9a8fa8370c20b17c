"""What the generated numba kernels and their callers share: raw addresses of arrays.

A kernel that covers many parameters in one call takes a table of addresses (one row per
segment, one column per array role) instead of the arrays themselves: numba would
otherwise compile one specialisation per number of arrays, and unbox every array at each
call. `addresses` reads them at about 0.1 us per array; `pointer` turns an address
back into a pointer inside a kernel, for ``numba.carray``.

Only imported where numba is installed (`xpoptim._execution.compiled.kernels` checks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def pointer(typingctx: Any, address: Any) -> Any:
    """The ``void*`` at integer ``address`` (inside a kernel)."""
    signature = types.voidptr(types.intp)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return signature, codegen


@njit(cache=True)
def _address_and_layout(a: Any) -> tuple[int, int]:
    # bit 1: C-contiguous, bit 2: Fortran-contiguous (both for 1-D and 0-d arrays)
    layout = (1 if a.flags.c_contiguous else 0) | (2 if a.flags.f_contiguous else 0)
    return a.ctypes.data, layout


def address_and_layout(a: np.ndarray[Any, Any]) -> tuple[int, int]:
    """The data address of ``a``, and its memory layout: bit 1 set if it is
    C-contiguous, bit 2 if Fortran-contiguous (both for 1-D arrays), 0 if neither."""
    address, layout = _address_and_layout(a)
    return int(address), int(layout)


def addresses(arrays: list[np.ndarray[Any, Any]]) -> tuple[list[int], int]:
    """The data addresses of ``arrays``, and the memory layouts they all share (bits as
    for `address_and_layout`; 0: they cannot be walked in one common order)."""
    out = []
    common = 3
    for a in arrays:
        address, layout = _address_and_layout(a)
        out.append(address)
        common &= layout
    return out, common
