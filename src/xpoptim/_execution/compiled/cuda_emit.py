"""Emit a CUDA elementwise kernel (``cupy.ElementwiseKernel``) from a traced rule.

The kernel takes the gradient and the scalars as inputs and the parameter and buffers as
outputs that it also reads, so one launch updates them in place. As for the numba
kernel, each element is loaded once, the rule's operations are applied in its order,
each rounded to the arrays' type ``T``, and the results are stored once. Compile it with
``--fmad=false`` (`NVRTC_OPTIONS`): NVRTC otherwise contracts ``a*b + c`` into a fused
multiply-add, which CuPy's one-operation-per-kernel plain path never does.

NaN handling follows CuPy's own ufuncs: ``maximum``/``minimum`` propagate a NaN from
either side, ``sign(NaN)`` is NaN.
"""

from __future__ import annotations

import dataclasses

from .ir import Graph

#: Options for NVRTC: no contraction into fused multiply-adds (IEEE division and square
#: root are NVRTC's defaults).
NVRTC_OPTIONS = ("--fmad=false",)

_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_COMPARE = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "eq": "==", "ne": "!="}


@dataclasses.dataclass(frozen=True)
class ElementwiseSource:
    """The four strings ``cupy.ElementwiseKernel`` takes (and the scalar count)."""

    in_params: str
    out_params: str
    operation: str
    name: str
    scalars: int


def _expression(op: str, a: list[str]) -> str:
    if op in _BINARY:
        return f"T({a[0]} {_BINARY[op]} {a[1]})"
    if op in _COMPARE:
        return f"({a[0]} {_COMPARE[op]} {a[1]})"
    if op == "where":
        return f"({a[0]} ? {a[1]} : {a[2]})"
    if op in ("maximum", "minimum"):
        pick = "max" if op == "maximum" else "min"
        return f"T(isnan({a[0]}) ? {a[0]} : (isnan({a[1]}) ? {a[1]} : {pick}({a[0]}, {a[1]})))"
    x = a[0]
    unary = {
        "neg": f"T(-{x})",
        "abs": f"T(fabs({x}))",
        "sqrt": f"T(sqrt({x}))",
        "square": f"T({x} * {x})",
        "sign": f"T({x} > T(0) ? T(1) : ({x} < T(0) ? T(-1) : ({x} == T(0) ? T(0) : {x})))",
    }
    if op not in unary:
        raise ValueError(f"no CUDA form for {op!r}")
    return unary[op]


def cuda_source(graph: Graph) -> ElementwiseSource:
    """The ``ElementwiseKernel`` of ``graph``: inputs ``x1`` (gradient) and ``s0...``
    (scalars), outputs ``x0`` (parameter) and ``x2...`` (buffers), read and written."""
    name = graph.argument_names()
    lines = []
    for index, node in enumerate(graph.nodes):
        if node.op == "input":
            name[index] = f"r{node.value}"
            lines.append(f"const T r{node.value} = x{node.value};")
        elif node.array:
            name[index] = f"t{index}"
            kind = "bool" if node.boolean else "T"
            args = [name[a] for a in node.args]
            lines.append(f"const {kind} t{index} = {_expression(node.op, args)};")
    for role, index in zip(graph.written_roles, graph.outputs, strict=True):
        lines.append(f"x{role} = {name[index]};")
    in_params = ", ".join(["T x1", *[f"T {s}" for s in graph.argument_names().values()]])
    out_params = ", ".join(f"T x{role}" for role in graph.written_roles)
    return ElementwiseSource(
        in_params=in_params,
        out_params=out_params,
        operation="\n".join(lines),
        name=f"xpoptim_{graph.rule.rsplit('.', 1)[-1]}_{graph.fingerprint()}",
        scalars=len(graph.kernel_scalars()),
    )
