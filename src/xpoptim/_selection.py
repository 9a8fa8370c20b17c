"""Selecting parameters by name: for weight decay (``no_decay``) and parameter groups.

A *selector* is either a sequence of name patterns or a predicate ``name -> bool``. A
pattern with a wildcard (``*``, ``?`` or ``[``) is matched against the whole name with
`fnmatch.fnmatchcase`; any other pattern matches names that contain it, which is
the seed's rule (``"bias"`` matches ``"0.bias"`` and ``"dense.bias_hh"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

Selector = Sequence[str] | Callable[[str], bool]

_WILDCARDS = frozenset("*?[")


def check_selector(value: Any, name: str) -> Any:
    """``value`` as a selector: a callable as it is, a sequence of strings as a tuple.

    Raises:
        TypeError: neither a callable nor a sequence of strings (a lone string is refused,
            since it would be read as a sequence of one-letter patterns).
    """
    if callable(value):
        return value
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a sequence of name patterns or a callable name -> bool, got {value!r}"
        )
    patterns = tuple(value)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} patterns must be strings, got {pattern!r}")
    return patterns


def matches(name: str, selector: Any) -> bool:
    """Whether parameter ``name`` is selected by ``selector``."""
    if callable(selector):
        return bool(selector(name))
    return any(
        fnmatchcase(name, pattern) if _WILDCARDS & set(pattern) else pattern in name
        for pattern in selector
    )
