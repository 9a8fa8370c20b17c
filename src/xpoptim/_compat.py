"""The one import site for array-api-compat.

Everything else in xpoptim imports the namespace helpers from here, so that a
change of helper library (or a vendored copy) touches one file.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_cupy_array,
    is_dask_array,
    is_lazy_array,
    is_torch_array,
    is_writeable_array,
    to_device,
)

#: Any array object that follows the Python Array API standard.
Array: TypeAlias = Any
#: An array namespace (``array_namespace(x)``).
Namespace: TypeAlias = Any

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
