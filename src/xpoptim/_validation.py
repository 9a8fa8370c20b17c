"""Input checks, run before anything changes.

Every check raises with a message that names the offending argument or parameter and
says what is wrong. They look only at Python values and array metadata (type, shape,
dtype, device), never at array contents, so they are free on lazy (Dask) and traced
(``jax.jit``) arrays.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._compat import Array, Namespace, array_namespace, device, is_array_api_obj
from ._execution import same_device

REGULARIZATIONS = ("L1", "L2", None)


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number!r}")
    return number


def positive(value: Any, name: str) -> float:
    """``value`` as a float, checked to be a finite number > 0."""
    number = _real(value, name)
    if number <= 0.0:
        raise ValueError(f"{name} must be > 0, got {number!r}")
    return number


def non_negative(value: Any, name: str) -> float:
    """``value`` as a float, checked to be a finite number >= 0."""
    number = _real(value, name)
    if number < 0.0:
        raise ValueError(f"{name} must be >= 0, got {number!r}")
    return number


def non_positive(value: Any, name: str) -> float:
    """``value`` as a float, checked to be a finite number <= 0."""
    number = _real(value, name)
    if number > 0.0:
        raise ValueError(f"{name} must be <= 0, got {number!r}")
    return number


def unit_interval(value: Any, name: str) -> float:
    """``value`` as a float, checked to lie in [0, 1)."""
    number = _real(value, name)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {number!r}")
    return number


def counter(value: Any, name: str, *, readable: Callable[[Any], bool]) -> Any:
    """A step counter: a Python int >= 0, or a 0-d integer array.

    A 0-d array whose value ``readable`` says can be read (an eager backend) is returned
    as a Python int, checked >= 0: a NumPy integer or 0-d array would otherwise turn the
    bias corrections into NumPy float64 scalars, which promote float32 state to float64.
    A traced (``jax.jit``) or lazy counter is returned as it is.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if not is_array_api_obj(value):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if getattr(value, "ndim", None) != 0:
            raise TypeError(f"{name} must be a 0-d integer array, got shape {value.shape}")
        if not array_namespace(value).isdtype(value.dtype, "integral"):
            raise TypeError(f"{name} must be an integer, got dtype {value.dtype}")
        if not readable(value):
            return value
    number = int(value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")
    return number


def regularization(value: Any) -> str | None:
    """The regularization kind, checked to be ``"L1"``, ``"L2"`` or ``None``."""
    if value not in REGULARIZATIONS or isinstance(value, bool):
        raise ValueError(
            f"regularization must be 'L1', 'L2' or None, got {value!r} "
            "(mpneuralnetwork silently treated any other value as 'L1')"
        )
    return value  # type: ignore[no-any-return]


def _describe(x: Array) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def params(params: Any, what: str = "params") -> Namespace | None:
    """Check a mapping of names to floating arrays of one namespace; return that namespace.

    Returns ``None`` for an empty mapping.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"{what} must be a mapping from names to arrays, got {type(params)!r}")
    xp: Namespace = None
    first = None
    first_type = None
    floating: list[Any] = []  # dtypes already checked
    for name, p in params.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} keys must be strings, got {name!r}")
        if type(p) is first_type:
            # An array's namespace depends on its type only: skip the (slow) lookups
            # for the many parameters of one type.
            p_xp = xp
        else:
            if not is_array_api_obj(p):
                raise TypeError(f"{what}[{name!r}] is not an array: {_describe(p)}")
            p_xp = array_namespace(p)
        if xp is None:
            first_type = type(p)
            xp, first = p_xp, name
        elif p_xp is not xp:
            raise TypeError(
                f"{what}[{name!r}] belongs to {p_xp.__name__}, but {what}[{first!r}] to "
                f"{xp.__name__}: all parameters must share one array namespace"
            )
        if p.dtype not in floating:
            if not xp.isdtype(p.dtype, "real floating"):
                raise TypeError(
                    f"{what}[{name!r}] has dtype {p.dtype}; a real floating dtype is needed"
                )
            floating.append(p.dtype)
    return xp


def _same_keys(expected: Iterable[str], got: Iterable[str], what: str) -> None:
    expected, got = set(expected), set(got)
    if expected != got:
        missing = sorted(expected - got)
        extra = sorted(got - expected)
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise ValueError(f"{what} do not match the parameter names: " + ", ".join(parts))


def like_params(
    arrays: Any,
    params: Mapping[str, Array],
    xp: Namespace,
    what: str,
    shape: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None,
) -> None:
    """Check that ``arrays`` has the names, namespace, shapes, dtypes and devices of ``params``.

    ``shape``, if given, maps a parameter's shape to the shape its array must have (a state
    buffer that is not shaped like its parameter: Adafactor's row and column factors).
    """
    if not isinstance(arrays, Mapping):
        raise TypeError(f"{what} must be a mapping from names to arrays, got {type(arrays)!r}")
    _same_keys(params.keys(), arrays.keys(), what)
    for name, p in params.items():
        a = arrays[name]
        label = f"{what}[{name!r}]"
        if type(a) is not type(p):  # same type, same namespace: skip the slow lookups
            if not is_array_api_obj(a):
                raise TypeError(f"{label} is not an array: {_describe(a)}")
            a_xp = array_namespace(a)
        else:
            a_xp = xp
        if a_xp is not xp:
            raise TypeError(
                f"{label} belongs to {a_xp.__name__}, but the parameter to {xp.__name__}"
            )
        expected = tuple(p.shape) if shape is None else shape(tuple(p.shape))
        if tuple(a.shape) != expected:
            if shape is None:
                raise ValueError(
                    f"{label} has shape {tuple(a.shape)}, the parameter {tuple(p.shape)}"
                )
            raise ValueError(
                f"{label} has shape {tuple(a.shape)}, not {expected} (the shape it takes for "
                f"a parameter of shape {tuple(p.shape)})"
            )
        if a.dtype != p.dtype:
            if not xp.isdtype(a.dtype, "real floating"):
                raise TypeError(f"{label} has dtype {a.dtype}; a real floating dtype is needed")
            raise TypeError(f"{label} has dtype {a.dtype}, the parameter {p.dtype}")
        if not same_device(a, p):
            raise ValueError(f"{label} is on device {device(a)}, the parameter on {device(p)}")


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def positive_integer(value: Any, name: str) -> int:
    """``value`` as an int, checked to be an integer >= 1."""
    number = _integer(value, name)
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number!r}")
    return number


def non_negative_integer(value: Any, name: str) -> int:
    """``value`` as an int, checked to be an integer >= 0."""
    number = _integer(value, name)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number!r}")
    return number


def flag(value: Any, name: str) -> bool:
    """``value``, checked to be a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
