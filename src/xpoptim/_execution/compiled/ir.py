"""The compiler's intermediate form: a rule as a small graph of elementwise operations.

`xpoptim._execution.compiled.trace` records a rule into a `Graph`; one emitter per
backend (`numba_emit`, `cuda_emit`) turns the graph into kernel source. The graph is
data: a tuple of `Node`, in the order the rule ran its operations (SSA: every node is
computed once, from nodes before it).

Two kinds of node:

* **array nodes** -- one value per element: the rule's arrays (``input``) and every
  operation on them. The kernel computes these, per element, in the arrays' dtype.
* **scalar nodes** -- Python numbers: the rule's hyperparameters (``scalar``), the
  constants it writes (``const``) and arithmetic among them (``1.0 - beta1``). They are
  evaluated in Python, exactly as the rule would (`Graph.kernel_arguments`), and every
  scalar that meets an array becomes one kernel argument, cast to the arrays' dtype as
  NumPy casts a Python scalar (NEP 50). Values that change every step (a scheduled
  learning rate, bias corrections) are therefore arguments: no recompilation per step.

A rule may branch on a scalar's truth (``if l1:``): the trace records that as a *guard*
and is valid only for hyperparameters with the same truth values.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import operator
from collections.abc import Callable, Mapping
from typing import Any

#: Array operations: name -> number of operands. The emitters map each to their syntax.
ARRAY_OPS: dict[str, int] = {
    "add": 2,
    "sub": 2,
    "mul": 2,
    "div": 2,
    "maximum": 2,
    "minimum": 2,
    "gt": 2,
    "ge": 2,
    "lt": 2,
    "le": 2,
    "eq": 2,
    "ne": 2,
    "neg": 1,
    "abs": 1,
    "sqrt": 1,
    "square": 1,
    "sign": 1,
    "where": 3,
}

#: Comparison operations: their result is a boolean array.
COMPARISONS = frozenset({"gt", "ge", "lt", "le", "eq", "ne"})

#: Scalar operations, replayed on Python numbers with Python's own semantics.
SCALAR_OPS: dict[str, Callable[..., Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "pow": operator.pow,
    "neg": operator.neg,
    "abs": operator.abs,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
    "eq": operator.eq,
    "ne": operator.ne,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """One operation of a traced rule.

    Attributes:
        op: ``"input"`` (array role ``value``), ``"scalar"`` (hyperparameter named
            ``value``), ``"const"`` (the Python number ``value``), or an operation of
            `ARRAY_OPS` (array nodes) / `SCALAR_OPS` (scalar nodes).
        args: the operands, as indices of earlier nodes.
        array: whether the node holds one value per element (else a Python scalar).
        boolean: an array node holding booleans (a comparison).
        value: the role index, the hyperparameter's name or the constant.
    """

    op: str
    args: tuple[int, ...] = ()
    array: bool = True
    boolean: bool = False
    value: Any = None


def _same(value: Any) -> Any:
    return value


class GuardFailed(Exception):
    """Hyperparameters whose truth values differ from those the graph was traced with."""


@dataclasses.dataclass(frozen=True)
class Graph:
    """A traced rule.

    Attributes:
        rule: the rule's qualified name (for messages and generated source).
        nodes: the operations, in order.
        roles: how many arrays the rule takes: ``(p, g, *buffers)``.
        outputs: for each of the rule's results (``p``, then the buffers), its node.
        guards: ``(node, truth)`` for each scalar whose truth the rule branched on.
    """

    rule: str
    nodes: tuple[Node, ...]
    roles: int
    outputs: tuple[int, ...]
    guards: tuple[tuple[int, bool], ...]

    @property
    def written_roles(self) -> tuple[int, ...]:
        """The array roles the results are stored into: ``p`` (0) and the buffers (2...)."""
        return (0, *range(2, self.roles))

    def kernel_scalars(self) -> tuple[int, ...]:
        """The scalar nodes that meet an array, in order: the kernel's scalar arguments."""
        used: list[int] = []
        for node in self.nodes:
            if node.array:
                for arg in node.args:
                    if not self.nodes[arg].array and arg not in used:
                        used.append(arg)
        return tuple(used)

    def argument_names(self) -> dict[int, str]:
        """The name of each kernel argument in emitted source: ``s0``, ``s1``, ..."""
        return {index: f"s{k}" for k, index in enumerate(self.kernel_scalars())}

    def kernel_arguments(self, scalars: Mapping[str, Any], cast: Any = None) -> list[Any]:
        """The kernel's scalar arguments for these hyperparameters.

        Every scalar node is evaluated with Python's own operators, in the rule's order,
        so a derived scalar (``1.0 - beta1``) has exactly the value the rule computes;
        ``cast`` (the arrays' scalar type) is applied to each argument if given.

        Raises:
            GuardFailed: a guarded scalar's truth differs from the traced one.
        """
        arguments: list[Any] = self._arguments_function(scalars, cast or _same)
        return arguments

    @functools.cached_property
    def _arguments_function(self) -> Any:
        """`kernel_arguments` as one generated Python function: a step calls it once per
        group of parameters, so it must cost about a microsecond, not an interpreter
        loop over the graph."""
        lines = ["def arguments(scalars, cast):"]
        for index, node in enumerate(self.nodes):
            if node.array:
                continue
            if node.op == "scalar":
                value = f"scalars[{node.value!r}]"
            elif node.op == "const":
                value = repr(node.value)  # repr round-trips Python numbers exactly
            else:
                args = [f"v{a}" for a in node.args]
                value = f"_OPS[{node.op!r}]({', '.join(args)})"
            lines.append(f"    v{index} = {value}")
        for index, truth in self.guards:
            lines.append(f"    if bool(v{index}) is not {truth}:")
            lines.append(f"        raise GuardFailed('scalar node {index} is no longer {truth}')")
        result = ", ".join(f"cast(v{i})" for i in self.kernel_scalars())
        lines.append(f"    return [{result}]")
        namespace: dict[str, Any] = {"_OPS": SCALAR_OPS, "GuardFailed": GuardFailed}
        exec(compile("\n".join(lines), f"<xpoptim arguments of {self.rule}>", "exec"), namespace)
        return namespace["arguments"]

    def fingerprint(self) -> str:
        """A short hash of the graph's structure (not of any hyperparameter value)."""
        parts = [self.rule, str(self.roles), repr(self.outputs)]
        for node in self.nodes:
            value = node.value if node.op in ("input", "scalar") else None
            parts.append(f"{node.op}{node.args}{node.array}{node.boolean}{value}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
