"""An optimizer state split into per-parameter leaves and shared scalars, and joined back.

Frameworks that keep optimizer state per parameter (torch.optim: ``optimizer.state[p]``)
need xpoptim's state, a tree of NamedTuples whose buffers are dicts keyed by parameter
name, in that form. Any optimizer or wrapper's state splits the same way:

* a dict whose keys are all parameter names is a **per-parameter** field: its entries
  go to each parameter under the field's path (``"momentums"``, ``"inner.velocities"``);
* any other leaf (the step counter, ``skipped``, ``mini_step``, ``None``) is a **shared
  scalar**, stored with every parameter under its path (torch.optim's optimizers keep
  ``"step"`` per parameter the same way);
* NamedTuples, tuples and other dicts are structure, kept in a `Spec` to join back.

Nothing here depends on a framework or a backend.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spec:
    """The structure of a state: how to join its per-parameter fields and scalars back.

    Attributes:
        kind: ``"per_param"``, ``"scalar"``, ``"mapping"``, ``"tuple"`` or
            ``"namedtuple"``.
        path: where a leaf is stored (``"inner.momentums"``); ``""`` for structure.
        keys: the names of a per-parameter field, or the keys of a structural dict.
        children: the specs of a structure's entries, in order.
        cls: the NamedTuple class of a ``"namedtuple"``.
    """

    kind: str
    path: str = ""
    keys: tuple[str, ...] = ()
    children: tuple[Spec, ...] = ()
    cls: Any = None


def _join_path(prefix: str, part: str) -> str:
    return f"{prefix}.{part}" if prefix else part


def spec_of(state: Any, names: Collection[str], prefix: str = "") -> Spec:
    """The `Spec` of ``state``, whose per-parameter dicts are keyed by some of ``names``."""
    if isinstance(state, Mapping):
        keys = tuple(state)
        if all(isinstance(k, str) and k in names for k in keys):
            return Spec("per_param", prefix, keys)
        children = tuple(spec_of(state[k], names, _join_path(prefix, str(k))) for k in keys)
        return Spec("mapping", prefix, keys, children)
    if isinstance(state, tuple):
        fields = getattr(state, "_fields", None)
        parts = fields if fields is not None else [str(i) for i in range(len(state))]
        children = tuple(
            spec_of(value, names, _join_path(prefix, part))
            for part, value in zip(parts, state, strict=True)
        )
        if fields is not None:
            return Spec("namedtuple", prefix, children=children, cls=type(state))
        return Spec("tuple", prefix, children=children)
    return Spec("scalar", prefix)


def split(spec: Spec, state: Any) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``(per_param, scalars)`` of ``state``: ``per_param[name][path]`` and ``scalars[path]``."""
    per_param: dict[str, dict[str, Any]] = {}
    scalars: dict[str, Any] = {}

    def walk(node: Spec, value: Any) -> None:
        if node.kind == "per_param":
            for name in node.keys:
                per_param.setdefault(name, {})[node.path] = value[name]
        elif node.kind == "scalar":
            scalars[node.path] = value
        elif node.kind == "mapping":
            for key, child in zip(node.keys, node.children, strict=True):
                walk(child, value[key])
        else:
            for child, item in zip(node.children, value, strict=True):
                walk(child, item)

    walk(spec, state)
    return per_param, scalars


def join(spec: Spec, per_param: Mapping[str, Mapping[str, Any]], scalars: Mapping[str, Any]) -> Any:
    """The state of ``spec`` from ``per_param[name][path]`` and ``scalars[path]``.

    A scalar path missing from ``scalars`` is ``None`` (the ``None`` leaves of a state,
    its unused fields, need not be stored).
    """
    if spec.kind == "per_param":
        return {name: per_param[name][spec.path] for name in spec.keys}
    if spec.kind == "scalar":
        return scalars.get(spec.path)  # a missing scalar is None (an unused field)
    parts = [join(child, per_param, scalars) for child in spec.children]
    if spec.kind == "mapping":
        return dict(zip(spec.keys, parts, strict=True))
    if spec.kind == "namedtuple":
        return spec.cls(*parts)
    return tuple(parts)
