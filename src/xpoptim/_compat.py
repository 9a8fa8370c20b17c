"""The one import site for array-api-compat.

Everything else in xpoptim imports the namespace helpers from here, so that a
change of helper library (or a vendored copy) touches one file.

Two of its answers are corrected here from what an array type can actually do, so that
array libraries nobody here wrote run correctly (Cubed, ndonnx, the next one):
array-api-compat reports any *unknown* array type writeable (even without
``__setitem__``) and finds out whether it is lazy by reading one element (which, for a
lazy library, computes). See `is_writeable_array` and `is_lazy_array`.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_cupy_array,
    is_dask_array,
    is_torch_array,
    to_device,
)
from array_api_compat import is_lazy_array as _compat_is_lazy_array
from array_api_compat import is_writeable_array as _compat_is_writeable_array

#: Any array object that follows the Python Array API standard.
Array: TypeAlias = Any
#: An array namespace (``array_namespace(x)``).
Namespace: TypeAlias = Any


def is_writeable_array(x: object) -> bool:
    """Whether ``x[...] = value`` can write ``x``: array-api-compat's answer, and a
    ``__setitem__`` on the type.

    array-api-compat answers True for every array type it does not know; Cubed arrays,
    for one, have no item assignment at all.
    """
    return bool(_compat_is_writeable_array(x)) and hasattr(type(x), "__setitem__")


def is_lazy_array(x: object) -> bool:
    """Whether reading ``x``'s values (``bool(x)``, ``int(x)``) may run a computation.

    A type with a ``compute`` method (the collection protocol of Dask, Cubed, Xarray:
    values exist only once computed) is lazy, decided from the type alone. Any other type
    is array-api-compat's answer: known types by name, unknown ones by reading one element,
    which is cheap for an eager array (and would compute a lazy one, hence the first rule).
    """
    if callable(getattr(type(x), "compute", None)):
        return True
    return bool(_compat_is_lazy_array(x))


__all__ = [
    "Array",
    "Namespace",
    "array_namespace",
    "device",
    "is_array_api_obj",
    "is_cupy_array",
    "is_dask_array",
    "is_lazy_array",
    "is_torch_array",
    "is_writeable_array",
    "to_device",
]
