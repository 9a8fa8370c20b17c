"""Moving arrays between backends and devices: to host memory, into a namespace."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._compat import Array, Namespace, device, is_torch_array, to_device


def to_host(x: Array) -> np.ndarray[Any, Any]:
    """``x`` as a NumPy array in host memory (computing it if it is lazy).

    The result may share memory with ``x``: copy it before ``x`` can change.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_torch_array(x):
        x = x.detach()  # DLPack refuses tensors that require grad
    attempts = (
        # CPU arrays of every backend, array-api-strict's emulated devices too: no copy.
        lambda: np.from_dlpack(x),
        # Device arrays (CuPy, CUDA tensors: a copy to the host); Dask: computed.
        lambda: np.asarray(to_device(x, "cpu")),
        # Anything else NumPy can convert (JAX on an accelerator).
        lambda: np.asarray(x),
    )
    errors = []
    for attempt in attempts:
        try:
            return np.asarray(attempt())
        except Exception as exc:  # each library raises its own kind
            errors.append(f"{type(exc).__name__}: {exc}")
    raise TypeError(
        f"cannot bring a {type(x).__module__}.{type(x).__name__} to host memory: "
        + "; ".join(errors)
    )


def place(
    x: Array, xp: Namespace, *, dtype: Any = None, device: Any = None, like: Array = None
) -> Array:
    """A new array of namespace ``xp`` with the values of ``x``, which may come from any backend.

    Args:
        x: an array of any namespace (or NumPy).
        xp: the target namespace.
        dtype: the target dtype (``x``'s own by default, as ``xp`` spells it).
        device: the target device (``xp``'s default by default).
        like: an array of ``xp`` whose chunks to copy where arrays are chunked (Dask).

    Returns:
        An array that shares no memory with ``x``.
    """
    host = to_host(x)
    if dtype is None:
        out = xp.asarray(host, copy=True, device=device)
    else:
        out = xp.asarray(host, dtype=dtype, copy=True, device=device)
    chunks = getattr(like, "chunks", None)
    if chunks is not None and hasattr(out, "rechunk"):
        out = out.rechunk(chunks)
    return out


def same_device(a: Array, b: Array) -> bool:
    """Whether two arrays of one namespace are on the same device (fast for NumPy, which
    has only the CPU)."""
    if type(a) is np.ndarray and type(b) is np.ndarray:
        return True
    return bool(device(a) == device(b))


def zeros_beside(shape: tuple[int, ...], like: Array, xp: Namespace) -> Array:
    """Zeros of ``shape`` with ``like``'s dtype, on ``like``'s device.

    The device is passed only where it is not ``xp``'s default: a JAX array given a device
    is "committed", and ``jax.jit`` would compile again when a state of committed arrays
    follows one of uncommitted ones.
    """
    default = xp.empty((0,), dtype=like.dtype)
    if same_device(default, like):
        return xp.zeros(shape, dtype=like.dtype)
    return xp.zeros(shape, dtype=like.dtype, device=device(like))
