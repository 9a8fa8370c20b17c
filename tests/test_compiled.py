"""The compiler: tracing, kernels, their caches, the paths they take and their bits.

Every compiled result is compared bit for bit with an independent execution of the same
rule: array-api-strict's (which has no fast path at all) and NumPy's plain path; the
float64 reference comparisons of the other test files run through the compiled path too,
since it is the default. The CUDA emitter is checked on the host: its generated kernel
body is compiled by the C++ compiler and run on NumPy data, bit for bit against NumPy.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import xpoptim
from xpoptim import _rules
from xpoptim._execution import run_rule
from xpoptim._execution.compiled import kernels, numpy_path
from xpoptim._execution.compiled.cuda_emit import cuda_source
from xpoptim._execution.compiled.ir import GuardFailed
from xpoptim._execution.compiled.trace import Untraceable, trace

from conftest import selected_backends, used_fields

pytestmark = pytest.mark.skipif(
    "numpy" not in selected_backends(), reason="the compiler: tested in the numpy session"
)
needs_numba = pytest.mark.skipif(
    kernels.NUMBA_MISSING is not None, reason=str(kernels.NUMBA_MISSING)
)

#: Every optimizer and variant, with a decayed and an excluded parameter name below.
CONFIGS = [
    ("SGD", {"momentum": 0.8, "weight_decay": 0.05}),
    ("SGD", {"momentum": 0.8, "nesterov": True, "regularization": "L1"}),
    ("SGD", {"momentum": 0.0, "regularization": None}),
    ("RMSprop", {"decay_rate": 0.8, "epsilon": 1e-6}),
    ("RMSprop", {"centered": True, "regularization": "L1", "weight_decay": 0.01}),
    ("RMSprop", {"centered": True, "momentum": 0.5}),
    ("RMSprop", {"momentum": 0.7, "regularization": None}),
    ("Adam", {"beta1": 0.8, "beta2": 0.95}),
    ("Adam", {"amsgrad": True, "regularization": "L1"}),
    (
        "Adam",
        {"regularization": None, "learning_rate": xpoptim.schedules.ExponentialDecay(0.01, 1, 0.9)},
    ),
    ("AdamW", {"weight_decay": 0.1, "amsgrad": True}),
]
ADAM_SCALARS = {
    "learning_rate": 1e-3,
    "beta1": 0.9,
    "beta2": 0.999,
    "epsilon": 1e-8,
    "step_size": 1e-3 / (1 - 0.9),
    "sqrt_bias_correction2": (1 - 0.999) ** 0.5,
    "l1": 0.0,
    "decoupled_decay": 0.0,
}


def config_id(case: tuple[str, dict[str, Any]]) -> str:
    kind, kwargs = case
    return kind + "".join(f"-{k}" for k in kwargs if k not in ("learning_rate",))


def bits(a: Any) -> bytes:
    """The exact bytes of ``a`` (so -0.0 != 0.0), every NaN written as NumPy's one NaN:
    IEEE 754 leaves the sign and payload of a NaN result unspecified, and compilers may
    swap the operands of a commutative operation, which picks another input's NaN."""
    a = np.array(np.asarray(a), copy=True)
    a[np.isnan(a)] = np.nan
    return np.ascontiguousarray(a).tobytes()


def problem(dtype: Any, seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    shapes = {"big.weights": (300, 700), "small.weights": (3, 5), "small.bias": (5,), "scale": ()}
    params = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()} for _ in range(3)]
    return params, grads


def run(kind: str, kwargs: dict[str, Any], params: Any, grads: Any, to: Any = None) -> Any:
    opt = getattr(xpoptim, kind)(**kwargs)
    convert = to or (lambda a: a.copy())
    params = {k: convert(v) for k, v in params.items()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, {k: convert(v) for k, v in g.items()}, state)
    return params, state


# -- bits: compiled against array-api-strict and NumPy's plain path -----------------------


@needs_numba
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_compiled_steps_are_bit_identical_to_array_api_strict_and_plain(case, dtype):
    strict = pytest.importorskip("array_api_strict")
    kind, kwargs = case
    params, grads = problem(dtype)
    compiled = run(kind, kwargs, params, grads)
    assert {xpoptim.explain()[name].path for name in params} == {"compiled"}
    with xpoptim.execution_options(fast=False):
        plain = run(kind, kwargs, params, grads)
    reference = run(kind, kwargs, params, grads, to=lambda a: strict.asarray(a, copy=True))
    for name in params:
        assert compiled[0][name].dtype == dtype
        assert bits(compiled[0][name]) == bits(plain[0][name]), name
        assert bits(compiled[0][name]) == bits(reference[0][name]), name
    for field in used_fields(plain[1]):
        for name in params:
            got = getattr(compiled[1], field)[name]
            assert bits(got) == bits(getattr(plain[1], field)[name]), (field, name)
            assert bits(got) == bits(getattr(reference[1], field)[name]), (field, name)


@needs_numba
def test_special_values_give_the_same_bits_as_numpy():
    """NaN, infinities, signed zeros, subnormals and huge values, through every rule."""
    values = np.array(
        [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, 1.0, -1.0, 0.5],
        dtype=np.float32,
    )
    p0, g0 = np.meshgrid(values, values)
    for kind, kwargs in CONFIGS:
        outs = []
        for options in ({"fast": False}, {"fast": True}):
            with xpoptim.execution_options(**options), np.errstate(all="ignore"):
                outs.append(run(kind, kwargs, {"w": p0}, [{"w": g0}, {"w": g0[::-1].copy()}]))
        assert bits(outs[1][0]["w"]) == bits(outs[0][0]["w"]), kind


@needs_numba
def test_threads_split_a_step_at_64_element_boundaries_with_the_same_bits(monkeypatch):
    monkeypatch.setattr(numpy_path, "PARALLEL_MIN_ELEMENTS", 64)
    params, grads = problem(np.float32)
    with xpoptim.execution_options(fast=False):
        plain = run("Adam", {}, params, grads)
    for threads in (2, 3):
        with xpoptim.execution_options(num_threads=threads):
            split = run("Adam", {}, params, grads)
        for name in params:
            assert bits(split[0][name]) == bits(plain[0][name]), (threads, name)


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_partition_covers_every_element_once_in_order(parts):
    sizes = np.array([5, 130, 1, 64, 300], dtype=np.intp)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * 1000  # fake "addresses"
    table = np.stack([starts, starts + 7], axis=1).astype(np.intp)
    seen = []
    for t, s in numpy_path.partition(table, sizes, parts, itemsize=1000):
        assert t.flags.c_contiguous
        assert len(t) == len(s)
        for (a, b), n in zip(t, s, strict=True):
            assert b - a == 7  # every column advanced alike
            seen.extend(range(a // 1000, a // 1000 + n))
    # each "element" i of the step has address 1000*i: all once, in order
    assert seen == list(range(int(sizes.sum())))


# -- the tracer and the kernel cache ------------------------------------------------------


def test_trace_records_the_rule_and_evaluates_scalars_as_python_does():
    graph = trace(_rules.adam, 4, ADAM_SCALARS)
    ops = [n.op for n in graph.nodes if n.array and n.op != "input"]
    assert ops == [
        "mul", "mul", "add", "square", "mul", "mul", "add", "sqrt", "div", "add", "mul",
        "div", "sub",
    ]  # fmt: skip
    assert len(graph.outputs) == 3
    assert {graph.nodes[i].value for i, _ in graph.guards} == {"l1", "decoupled_decay"}
    s = ADAM_SCALARS
    want = [
        s["beta1"], 1.0 - s["beta1"], s["beta2"], 1.0 - s["beta2"],
        s["sqrt_bias_correction2"], s["epsilon"], s["step_size"],
    ]  # fmt: skip
    assert graph.kernel_arguments(ADAM_SCALARS) == want
    with pytest.raises(GuardFailed):
        graph.kernel_arguments({**ADAM_SCALARS, "l1": 0.5})


@needs_numba
def test_kernels_are_reused_across_values_and_rebuilt_across_truth_values():
    base = kernels.numba_kernel(_rules.adam, 4, np.float32, ADAM_SCALARS)
    again = kernels.numba_kernel(
        _rules.adam, 4, np.float32, {**ADAM_SCALARS, "learning_rate": 0.5, "step_size": 0.3}
    )
    assert again is base  # a new learning rate is a new argument, not a new kernel
    with_l1 = kernels.numba_kernel(_rules.adam, 4, np.float32, {**ADAM_SCALARS, "l1": 0.1})
    assert isinstance(with_l1, kernels.Kernel)
    assert with_l1 is not base
    float64 = kernels.numba_kernel(_rules.adam, 4, np.float64, ADAM_SCALARS)
    assert isinstance(float64, kernels.Kernel)
    assert float64.path != base.path
    assert "sign" in with_l1.source
    assert "sign" not in base.source
    assert "fastmath" not in base.source  # no reassociation, no FMA contraction


def _sum_rule(p, g, *, lr, xp):
    p -= lr * g / xp.sum(xp.abs(g))  # a reduction: must see the whole array
    return (p,)


def _branch_rule(p, g, *, lr, xp):
    if g > 0:  # Python control flow on an array value
        p -= lr * g
    return (p,)


def _conversion_rule(p, g, *, lr, xp):
    p -= float(lr) * g
    return (p,)


def _power_rule(p, g, *, lr, xp):
    p -= lr * g**3
    return (p,)


@needs_numba
@pytest.mark.parametrize(
    ("rule", "why"),
    [
        (_sum_rule, "xp.sum"),
        (_branch_rule, "control flow on array values"),
        (_conversion_rule, "conversion of a hyperparameter"),
        (_power_rule, "x ** 3"),
    ],
)
def test_rules_that_cannot_be_compiled_run_on_the_plain_path_with_the_reason(rule, why):
    rng = np.random.default_rng(4)
    params = {"w": rng.normal(size=(500, 300)), "b": rng.normal(size=7)}
    grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
    want = {k: v.copy() for k, v in params.items()}
    for k in want:  # the rule by hand, on whole arrays
        g = grads[k]
        if rule is _sum_rule:
            want[k] -= 0.1 * g / np.sum(np.abs(g))
        elif rule is _power_rule:
            want[k] -= 0.1 * g**3
        elif rule is _conversion_rule:
            want[k] -= 0.1 * g
    if rule is _branch_rule:
        with pytest.raises(ValueError, match="truth value of an array"):
            run_rule(rule, params, grads, [], shared={"lr": 0.1}, per_param=lambda name: {}, xp=np)
        assert xpoptim.explain()["w"].path == "plain"
        return
    new, _ = run_rule(rule, params, grads, [], shared={"lr": 0.1}, per_param=lambda name: {}, xp=np)
    for k in params:
        assert bits(new[k]) == bits(want[k]), k
        how = xpoptim.explain()[k]
        assert how.path == "plain"
        assert why in how.reason


@needs_numba
def test_explain_names_the_path_and_the_reason():
    rng = np.random.default_rng(5)
    # Large enough for state of their own (smaller ones share one flat, C-ordered buffer).
    base = np.zeros((400, 600), np.float32)
    params = {
        "contiguous": rng.normal(size=(400, 300)).astype(np.float32),
        "fortran": np.asfortranarray(rng.normal(size=(400, 300)).astype(np.float32)),
        "strided": base[:, ::2],
    }
    grads = {k: np.ascontiguousarray(v) for k, v in params.items()}
    grads["fortran"] = np.asfortranarray(grads["fortran"])
    opt = xpoptim.Adam()
    opt.update(params, grads, opt.init(params))
    paths = xpoptim.explain()
    assert paths["contiguous"] == xpoptim.StepPath("compiled")
    assert paths["fortran"] == xpoptim.StepPath("compiled")
    assert paths["strided"].path == "blocked"
    assert "contiguous memory layout" in paths["strided"].reason
    with xpoptim.execution_options(compile=False):
        opt.update(params, grads, opt.init(params))
    assert xpoptim.explain()["contiguous"] == xpoptim.StepPath("blocked", "compile=False")
    with xpoptim.execution_options(fast=False):
        opt.update(params, grads, opt.init(params))
    assert xpoptim.explain()["contiguous"] == xpoptim.StepPath("plain", "fast=False")
    # NumPy scalars promote float32 where Python floats do not: no kernel, same bits.
    p = {"w": params["contiguous"].copy()}
    want = p["w"] - np.float64(0.5) * grads["contiguous"]
    assert want.dtype == np.float64  # what NumPy does with a NumPy scalar

    def scaled(p, g, *, lr, xp):
        p -= lr * g
        return (p,)

    run_rule(scaled, p, {"w": grads["contiguous"]}, [], shared={"lr": np.float64(0.5)},
             per_param=lambda name: {}, xp=np)  # fmt: skip
    assert xpoptim.explain()["w"].path == "blocked"
    assert "not a Python number" in xpoptim.explain()["w"].reason
    assert bits(p["w"]) == bits(want.astype(np.float32))


# -- Dask: one task per chunk, lazily --------------------------------------------------------


@needs_numba
def test_dask_steps_through_one_kernel_task_per_chunk_lazily(assert_no_compute):
    da = pytest.importorskip("dask.array")
    params, grads = problem(np.float32)
    chunks = {k: tuple(max(1, n // 3) for n in v.shape) for k, v in params.items()}
    lazy = {k: da.from_array(v, chunks=chunks[k]) for k, v in params.items()}
    opt = xpoptim.Adam(amsgrad=True)
    with assert_no_compute():
        state = opt.init(lazy)
        for g in grads:
            dask_g = {k: da.from_array(v, chunks=chunks[k]) for k, v in g.items()}
            lazy, state = opt.update(lazy, dask_g, state)
    assert {xpoptim.explain()[name].path for name in params} == {"compiled"}
    weights = lazy["big.weights"]
    kernel_layers = [
        name for name in weights.dask.layers if name.startswith("xpoptim-adam_amsgrad-")
    ]
    assert len(kernel_layers) == len(grads)  # one kernel layer per step...
    layer = weights.dask.layers[kernel_layers[-1]]
    assert len(layer) == weights.npartitions  # ... of one task per chunk
    assert (
        weights.chunks == da.from_array(params["big.weights"], chunks=chunks["big.weights"]).chunks
    )
    with xpoptim.execution_options(fast=False):
        plain = run("Adam", {"amsgrad": True}, params, grads)
    for name in params:
        assert bits(lazy[name].compute()) == bits(plain[0][name]), name
    for field in used_fields(plain[1]):
        for name in params:
            got = getattr(state, field)[name].compute()
            assert bits(got) == bits(getattr(plain[1], field)[name]), (field, name)
    assert bits(params["big.weights"]) != bits(plain[0]["big.weights"])  # inputs untouched


# -- the disk cache: a second process loads, it does not compile ----------------------------


@needs_numba
@pytest.mark.slow
def test_a_second_process_loads_kernels_from_the_disk_cache(tmp_path):
    script = textwrap.dedent(
        """
        import json, numpy as np, xpoptim
        from xpoptim._execution.compiled.kernels import compiled_kernels
        p = {"w": np.ones(10, np.float32)}
        opt = xpoptim.Adam()
        opt.update(p, {"w": np.ones(10, np.float32)}, opt.init(p))
        (k,) = compiled_kernels()
        print(json.dumps({"hits": sum(k.in_place.stats.cache_hits.values()),
                          "misses": sum(k.in_place.stats.cache_misses.values()),
                          "path": str(k.path), "seconds": k.compile_seconds}))
        """
    )
    env = {**os.environ, "XPOPTIM_CACHE_DIR": str(tmp_path)}
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["path"] == runs[1]["path"]
    assert Path(runs[0]["path"]).is_relative_to(tmp_path)
    assert runs[0]["misses"] >= 1  # the first one compiled...
    assert runs[1]["hits"] >= 1
    assert runs[1]["misses"] == 0


# -- the CUDA emitter, compiled and run on the host ---------------------------------------


HOST_HARNESS = """
#include <algorithm>
#include <cmath>
using std::fabs; using std::isnan; using std::max; using std::min; using std::sqrt;
typedef {ctype} T;

static inline void element({params}) {{
{operation}
}}

extern "C" void run(long n, T** arrays, const T* s) {{
    for (long i = 0; i < n; ++i) {{
        element({arguments});
    }}
}}
"""

CUDA_CASES = [
    (_rules.adam, 4, ADAM_SCALARS),
    (_rules.adam_amsgrad, 5, {**ADAM_SCALARS, "l1": 0.01, "decoupled_decay": 0.1}),
    (_rules.sgd_nesterov, 3, {"learning_rate": 0.1, "momentum": 0.9, "l1": 0.0, "l2": 0.01}),
    (
        _rules.rmsprop_extended,
        5,
        {
            "learning_rate": 0.01,
            "decay_rate": 0.9,
            "epsilon": 1e-8,
            "centered": True,
            "momentum": 0.5,
            "l1": 0.01,
            "l2": 0.0,
        },
    ),
]


def host_kernel(rule: Any, roles: int, scalars: dict[str, Any], ctype: str, tmp: Path) -> Any:
    """The CUDA emitter's kernel for ``rule``, built for the CPU by the C++ compiler."""
    graph = trace(rule, roles, scalars)
    source = cuda_source(graph)
    declared = [*source.in_params.split(", "), *source.out_params.split(", ")]
    params = []
    for declaration in declared:
        _, name = declaration.split()
        kind = "T&" if declaration in source.out_params.split(", ") else "const T"
        params.append(f"{kind} {name}")
    arguments = [f"arrays[{r}][i]" for r in range(roles)]
    by_name = {f"x{r}": arguments[r] for r in range(roles)}
    by_name.update({f"s{k}": f"s[{k}]" for k in range(source.scalars)})
    call = [by_name[d.split()[1]] for d in declared]
    code = HOST_HARNESS.format(
        ctype=ctype,
        params=", ".join(params),
        operation=textwrap.indent(source.operation, "    "),
        arguments=", ".join(call),
    )
    (tmp / "kernel.cpp").write_text(code)
    library = tmp / f"kernel_{ctype}_{rule.__name__}.so"
    subprocess.run(
        ["g++", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o", library, tmp / "kernel.cpp"],
        check=True,
        capture_output=True,
    )
    return graph, ctypes.CDLL(str(library))


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++) on PATH")
@pytest.mark.parametrize(
    ("rule", "roles", "scalars"), CUDA_CASES, ids=lambda c: getattr(c, "__name__", "")
)
def test_the_cuda_kernel_body_gives_numpys_bits_on_the_host(rule, roles, scalars, dtype, tmp_path):
    ctype = {"float32": "float", "float64": "double"}[dtype.name]
    graph, library = host_kernel(rule, roles, scalars, ctype, tmp_path)
    rng = np.random.default_rng(6)
    arrays = [rng.normal(size=1000).astype(dtype) for _ in range(roles)]
    arrays[2:] = [np.abs(a) for a in arrays[2:]]  # second moments are non-negative
    with np.errstate(invalid="ignore"):  # centered RMSprop: sqrt of a negative variance
        want = rule(*[a.copy() for a in arrays], xp=np, **scalars)
    got = [a.copy() for a in arrays]
    pointers = (ctypes.c_void_p * roles)(*[a.ctypes.data for a in got])
    scalar_values = np.array(graph.kernel_arguments(scalars), dtype=dtype)
    library.run(ctypes.c_long(1000), pointers, ctypes.c_void_p(scalar_values.ctypes.data))
    for role, expected in zip((0, *range(2, roles)), want, strict=True):
        assert bits(got[role]) == bits(expected), role
    assert bits(got[1]) == bits(arrays[1])  # the gradient is an input only


def test_the_cuda_source_disables_fma_contraction_and_writes_only_results():
    from xpoptim._execution.compiled.cuda_emit import NVRTC_OPTIONS

    source = cuda_source(trace(_rules.adam, 4, ADAM_SCALARS))
    assert "--fmad=false" in NVRTC_OPTIONS
    assert source.in_params.startswith("T x1")
    assert source.out_params == "T x0, T x2, T x3"
    assert "x1 =" not in source.operation  # the gradient is never assigned


def test_untraceable_reports_what_it_met():
    with pytest.raises(Untraceable, match=r"xp\.matmul"):
        trace(lambda p, g, *, xp: (xp.matmul(p, g),), 2, {})


@pytest.mark.skipif(
    kernels.NUMBA_MISSING is None, reason="numba is installed (nox -s tests_without_numba)"
)
def test_without_numba_numpy_steps_on_the_blocked_path_with_the_reason():
    params, grads = problem(np.float32)
    blocked = run("Adam", {}, params, grads)
    with xpoptim.execution_options(fast=False):
        plain = run("Adam", {}, params, grads)
    for name in params:
        assert bits(blocked[0][name]) == bits(plain[0][name]), name
    run("Adam", {}, params, grads)
    how = xpoptim.explain()["big.weights"]
    assert how.path == "blocked"
    assert "numba is not installed" in how.reason


@needs_numba
@pytest.mark.parametrize(
    "make",
    [
        lambda: xpoptim.transforms.Clipped(xpoptim.Adam(), max_norm=0.5, max_global_norm=2.0),
        lambda: xpoptim.transforms.MultiSteps(xpoptim.RMSprop(centered=True), every_k=2),
        lambda: xpoptim.transforms.ParamGroups(
            xpoptim.SGD(momentum=0.9), [{"params": ["small"], "learning_rate": 0.5}]
        ),
        lambda: xpoptim.Adam(nonfinite="skip"),
    ],
    ids=["clipped", "multisteps", "paramgroups", "nonfinite-skip"],
)
def test_wrappers_and_policies_step_compiled_with_the_plain_paths_bits(make):
    params, grads = problem(np.float32)
    grads = grads * 2  # MultiSteps: three updates of two micro-batches
    outs = []
    for options in ({"fast": True}, {"fast": False}):
        with xpoptim.execution_options(**options):
            opt = make()
            p = {k: v.copy() for k, v in params.items()}
            state = opt.init(p)
            for g in grads:
                p, state = opt.update(p, g, state)
        outs.append(p)
        if options["fast"]:
            assert {xpoptim.explain()[name].path for name in params} == {"compiled"}
    for name in params:
        assert bits(outs[0][name]) == bits(outs[1][name]), name


def test_deciding_whether_a_rule_is_elementwise_reads_no_lazy_value(assert_no_compute):
    da = pytest.importorskip("dask.array")
    lazy = da.ones((), chunks=()) * 0.5
    with assert_no_compute():
        assert kernels.elementwise(_rules.adam, 4, {**ADAM_SCALARS, "step_size": lazy}) is None
        refusal = kernels.elementwise(_sum_rule, 2, {"lr": lazy})
    assert refusal is not None
    assert refusal.untraceable
