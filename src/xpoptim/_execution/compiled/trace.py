"""Trace a rule: run it unchanged on symbolic arrays from a recording namespace.

The rule receives `SymbolicArray` objects for its arrays, `SymbolicScalar` objects for
its hyperparameters, and `RecordingNamespace` as ``xp``. Every operator and namespace
function it calls appends a `Node` to the graph under construction, so the rule's own
code, read by nobody but Python, is the single source of truth for every kernel.

What cannot be traced raises `Untraceable`, with the reason the caller shows (the step
then runs on another path): a function outside the elementwise subset (``xp.sum``,
``xp.matmul``), Python control flow on array values, a Python conversion of a
hyperparameter (``float(lr)``), arithmetic on boolean arrays, or a result that is not an
array of the parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .ir import ARRAY_OPS, COMPARISONS, SCALAR_OPS, Graph, Node


class Untraceable(Exception):
    """The rule uses something the compiler does not support; the message says what."""


class _Recorder:
    """The graph under construction."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        #: each scalar node's value in the traced call (None for array nodes)
        self.values: list[Any] = []
        self.guards: list[tuple[int, bool]] = []

    def add(self, node: Node, value: Any = None) -> int:
        self.nodes.append(node)
        self.values.append(value)
        return len(self.nodes) - 1


class _Symbol:
    __slots__ = ("index", "recorder")
    __hash__ = None  # type: ignore[assignment]  # ``==`` records an operation

    def __init__(self, recorder: _Recorder, index: int) -> None:
        self.recorder = recorder
        self.index = index


def _operand(recorder: _Recorder, value: Any) -> tuple[int, bool]:
    """The node of an operand, and whether it is an array; Python numbers become consts."""
    if isinstance(value, _Symbol):
        if value.recorder is not recorder:
            raise Untraceable("an operand from another trace")
        return value.index, isinstance(value, SymbolicArray)
    if isinstance(value, bool | int | float):
        return recorder.add(Node("const", array=False, value=value), value), False
    raise Untraceable(f"an operand of type {type(value).__name__} (only arrays and numbers)")


def _apply(recorder: _Recorder, op: str, *operands: Any) -> Any:
    """Record ``op`` on ``operands``: an array node if any operand is an array."""
    indices = []
    any_array = False
    for value in operands:
        index, is_array = _operand(recorder, value)
        indices.append(index)
        any_array |= is_array
    if not any_array:
        if op not in _SCALAR_FORMS:
            raise Untraceable(f"xp.{op} on Python scalars")
        return _scalar(recorder, Node(_SCALAR_FORMS[op], tuple(indices), array=False))
    if op not in ARRAY_OPS:
        raise Untraceable(f"the operation {op!r} on arrays")
    booleans = [recorder.nodes[i].array and recorder.nodes[i].boolean for i in indices]
    if op == "where":
        if not booleans[0] or any(booleans[1:]):
            raise Untraceable("xp.where needs a boolean condition and numeric values")
    elif any(booleans):
        raise Untraceable(f"the operation {op!r} on a boolean array")
    node = Node(op, tuple(indices), array=True, boolean=op in COMPARISONS)
    return SymbolicArray(recorder, recorder.add(node))


#: Array operations with a scalar form (replayed in Python, see `ir.SCALAR_OPS`).
_SCALAR_FORMS = {
    op: op for op in ("add", "sub", "mul", "div", "neg", "abs", "gt", "ge", "lt", "le", "eq", "ne")
}


def _scalar(recorder: _Recorder, node: Node) -> SymbolicScalar:
    """Record a scalar operation, evaluated now with Python's operator."""
    value = SCALAR_OPS[node.op](*(recorder.values[i] for i in node.args))
    return SymbolicScalar(recorder, recorder.add(node, value), value)


def _binary(op: str, reflected: bool = False) -> Callable[[Any, Any], Any]:
    def method(self: _Symbol, other: Any) -> Any:
        if isinstance(self, SymbolicScalar) and isinstance(other, SymbolicArray):
            return NotImplemented  # the array's reflected method records it
        operands = (other, self) if reflected else (self, other)
        return _apply(self.recorder, op, *operands)

    return method


class _Arithmetic(_Symbol):
    """The operators arrays and scalars share: each records one node."""

    __slots__ = ()

    __add__ = _binary("add")
    __radd__ = _binary("add", reflected=True)
    __sub__ = _binary("sub")
    __rsub__ = _binary("sub", reflected=True)
    __mul__ = _binary("mul")
    __rmul__ = _binary("mul", reflected=True)
    __truediv__ = _binary("div")
    __rtruediv__ = _binary("div", reflected=True)
    __gt__ = _binary("gt")
    __ge__ = _binary("ge")
    __lt__ = _binary("lt")
    __le__ = _binary("le")
    __eq__ = _binary("eq")
    __ne__ = _binary("ne")

    def __neg__(self) -> Any:
        return _apply(self.recorder, "neg", self)

    def __abs__(self) -> Any:
        return _apply(self.recorder, "abs", self)


class SymbolicArray(_Arithmetic):
    """An array inside a trace: its operators record nodes; in-place ones rebind, as on
    JAX (the rule returns what it computed, so rebinding is all it needs)."""

    __slots__ = ()

    __iadd__ = _Arithmetic.__add__
    __isub__ = _Arithmetic.__sub__
    __imul__ = _Arithmetic.__mul__
    __itruediv__ = _Arithmetic.__truediv__

    def __pos__(self) -> Any:
        return self

    def __pow__(self, exponent: Any) -> Any:
        # NumPy computes ``x**2`` as ``square(x)`` and ``x**0.5`` as ``sqrt(x)``; other
        # powers are not supported.
        if isinstance(exponent, int | float) and not isinstance(exponent, bool):
            if exponent == 2:
                return _apply(self.recorder, "square", self)
            if exponent == 0.5:
                return _apply(self.recorder, "sqrt", self)
        raise Untraceable(f"x ** {exponent!r} (only the constant powers 2 and 0.5)")

    __ipow__ = __pow__

    def __bool__(self) -> bool:
        raise Untraceable("Python control flow on array values")

    def __getattr__(self, name: str) -> Any:
        raise Untraceable(f"the array attribute {name!r}")

    def __getitem__(self, key: Any) -> Any:
        raise Untraceable("indexing")

    def __setitem__(self, key: Any, value: Any) -> None:
        raise Untraceable("item assignment")


class SymbolicScalar(_Arithmetic):
    """A hyperparameter (or arithmetic on hyperparameters) inside a trace.

    It knows its value in the traced call, so a rule may branch on its truth
    (``if l1:``); that is recorded as a guard.
    """

    __slots__ = ("value",)

    def __init__(self, recorder: _Recorder, index: int, value: Any) -> None:
        super().__init__(recorder, index)
        self.value = value

    def __pow__(self, exponent: Any) -> Any:
        if isinstance(exponent, SymbolicArray):
            raise Untraceable("a power with an array exponent")
        index, _ = _operand(self.recorder, exponent)
        return _scalar(self.recorder, Node("pow", (self.index, index), array=False))

    def __rpow__(self, base: Any) -> Any:
        if isinstance(base, SymbolicArray):
            raise Untraceable("an array raised to a hyperparameter's power")
        index, _ = _operand(self.recorder, base)
        return _scalar(self.recorder, Node("pow", (index, self.index), array=False))

    def __bool__(self) -> bool:
        truth = bool(self.value)
        self.recorder.guards.append((self.index, truth))
        return truth

    def _conversion(self) -> Any:
        raise Untraceable("a Python conversion of a hyperparameter (float(), int())")

    __float__ = __int__ = __index__ = __complex__ = _conversion


class RecordingNamespace:
    """The ``xp`` a traced rule sees: the standard's elementwise functions, recorded."""

    def __init__(self, recorder: _Recorder) -> None:
        self._recorder = recorder

    def _unary(self, op: str, x: Any) -> Any:
        return _apply(self._recorder, op, x)

    def sqrt(self, x: Any) -> Any:
        return self._unary("sqrt", x)

    def square(self, x: Any) -> Any:
        return self._unary("square", x)

    def sign(self, x: Any) -> Any:
        return self._unary("sign", x)

    def abs(self, x: Any) -> Any:
        return self._unary("abs", x)

    def negative(self, x: Any) -> Any:
        return self._unary("neg", x)

    def maximum(self, x1: Any, x2: Any) -> Any:
        return _apply(self._recorder, "maximum", x1, x2)

    def minimum(self, x1: Any, x2: Any) -> Any:
        return _apply(self._recorder, "minimum", x1, x2)

    def where(self, condition: Any, x1: Any, x2: Any) -> Any:
        return _apply(self._recorder, "where", condition, x1, x2)

    def clip(self, x: Any, /, min: Any = None, max: Any = None) -> Any:
        # The standard's clip, as NumPy computes it: the lower bound first.
        if min is not None:
            x = self.maximum(x, min)
        if max is not None:
            x = self.minimum(x, max)
        return x

    def __getattr__(self, name: str) -> Any:
        raise Untraceable(f"xp.{name} (not in the compiler's elementwise subset)")


def trace(rule: Callable[..., Any], roles: int, scalars: Mapping[str, Any]) -> Graph:
    """Record ``rule(p, g, *buffers, xp=..., **scalars)`` as a `Graph`.

    Args:
        rule: an update rule of `xpoptim._rules` (or any rule written the same way).
        roles: the number of arrays it takes, ``2 + len(buffers)``.
        scalars: its hyperparameters, Python numbers, as for the call being compiled
            (their truth values become the graph's guards).

    Raises:
        Untraceable: the rule cannot be compiled; the message says why.
    """
    recorder = _Recorder()
    arrays = [
        SymbolicArray(recorder, recorder.add(Node("input", value=role))) for role in range(roles)
    ]
    symbols = {
        name: SymbolicScalar(
            recorder, recorder.add(Node("scalar", array=False, value=name), value), value
        )
        for name, value in scalars.items()
    }
    try:
        results = rule(*arrays, xp=RecordingNamespace(recorder), **symbols)
    except Untraceable:
        raise
    except Exception as exc:  # whatever the rule does that symbols cannot
        raise Untraceable(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(results, tuple) or len(results) != roles - 1:
        raise Untraceable(f"the rule returned {type(results).__name__}, not {roles - 1} arrays")
    outputs = []
    for result in results:
        if not isinstance(result, SymbolicArray) or recorder.nodes[result.index].boolean:
            raise Untraceable("a result that is not an array of the parameter's dtype")
        outputs.append(result.index)
    name = getattr(rule, "__qualname__", repr(rule))
    module = getattr(rule, "__module__", "")
    return Graph(
        rule=f"{module}.{name}" if module else name,
        nodes=tuple(recorder.nodes),
        roles=roles,
        outputs=tuple(outputs),
        guards=tuple(dict.fromkeys(recorder.guards)),
    )
