"""Time one optimizer step: xpoptim (NumPy) against the seed, torch.optim and optax.

Cases (float32): one tensor of 1e8 elements ("big"), 2000 tensors of 5000 elements (1e7
in all, "small"), and the four tensors of a 64-128-10 MLP ("mlp", 9610 elements, each
round timing 200 steps). Optimizers: SGD (momentum), RMSprop, Adam, without weight
decay; on request (``--optimizers``) the elementwise optimizers of issue 11 (Adagrad,
Adadelta, Adamax, NAdam, RAdam, Rprop, Lion, ScheduleFreeAdamW) at their defaults,
against torch.optim where it has them and optax. Implementations:

* ``xpoptim update`` -- ``params, state = opt.update(params, grads, state)`` (compiled);
* ``xpoptim 1 thread`` -- the same, held to one thread;
* ``xpoptim step`` -- ``opt.step(layers)``, the seed's layer protocol (compiled, through
  the step plan);
* ``xpoptim blocked`` -- ``update`` on the blocked path (``compile=False``), the fast path
  before the compiler;
* ``xpoptim torch`` -- ``update`` on PyTorch CPU tensors (sharing the NumPy memory): the
  compiled kernel on views of the tensors;
* ``numpy plain`` -- xpoptim with the fast path off: the rule once per whole parameter,
  in-place NumPy operators with parameter-sized temporaries;
* ``seed`` -- mpneuralnetwork 1.1.1 ``opt.step(layers)``; it cannot switch regularization
  off, so its parameters are named ``bias`` (excluded), which costs it one extra
  ``x += 0`` pass;
* ``torch foreach`` / ``torch fused`` -- ``torch.optim`` on CPU, sharing the NumPy memory;
* ``optax jit`` -- ``optax`` update + ``apply_updates`` under ``jax.jit``, buffers donated.

Every implementation of one (case, optimizer) runs once per round, in a rotating order,
after one warm-up round; the median of the rounds is reported (this machine is shared
and noisy, so only ratios measured side by side mean much). The memory bandwidth is
measured in the same run, right before each (case, optimizer) group of rounds: a plain
copy and a triad, the best of them is that group's 100%.

Bytes moved per element: SGD and RMSprop read p, g and one buffer and write p and the
buffer (5 x 4 bytes in float32); Adam reads p, g, m, v and writes p, m, v (7 x 4 bytes).

The compile time of a first step is measured too, in fresh processes: with an empty
kernel cache (numba compiles) and with the cache the first process left (numba loads).

Run ``nox -s bench`` (installs the peers), or ``python benchmarks/bench_step.py --quick``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import xpoptim

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("SGD", "RMSprop", "Adam")
#: The elementwise optimizers of issue 11: rows on request (``--optimizers Adagrad,Lion``),
#: against torch.optim where it has them and optax (Lion, schedule-free AdamW: optax only).
CATALOGUE = (
    "Adagrad",
    "Adadelta",
    "Adamax",
    "NAdam",
    "RAdam",
    "Rprop",
    "Lion",
    "ScheduleFreeAdamW",
)
# arrays read + written per element
STREAMS = {
    "SGD": 5,
    "RMSprop": 5,
    "Adam": 7,
    "Adagrad": 5,
    "Adadelta": 7,
    "Adamax": 7,
    "NAdam": 7,
    "RAdam": 7,
    "Rprop": 7,
    "Lion": 5,
    "ScheduleFreeAdamW": 7,
}
HYPER: dict[str, dict[str, float]] = {
    "SGD": {"learning_rate": 1e-3, "momentum": 0.9},
    "RMSprop": {"learning_rate": 1e-4, "decay_rate": 0.9, "epsilon": 1e-8},
    "Adam": {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
    # The new classes' defaults (torch.optim's, else optax's), decay off.
    "Adagrad": {"learning_rate": 1e-2, "epsilon": 1e-10},
    "Adadelta": {"learning_rate": 1.0, "decay_rate": 0.9, "epsilon": 1e-6},
    "Adamax": {"learning_rate": 2e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
    "NAdam": {"learning_rate": 2e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
    "RAdam": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
    "Rprop": {"learning_rate": 1e-2},
    "Lion": {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.99},
    "ScheduleFreeAdamW": {"learning_rate": 2.5e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
}
#: torch.optim's names for the new classes' hyperparameters (the seed's three are spelled
#: out in `build_torch`).
TORCH_NAMES = {"learning_rate": "lr", "epsilon": "eps", "decay_rate": "rho"}
IMPLS = (
    "xpoptim update",
    "xpoptim 1 thread",
    "xpoptim step",
    "xpoptim blocked",
    "xpoptim torch",
    "numpy plain",
    "seed",
    "torch foreach",
    "torch fused",
    "optax jit",
)
PEERS = ("seed", "numpy plain", "torch foreach", "torch fused", "optax jit")
XPOPTIM = ("xpoptim update", "xpoptim step", "xpoptim 1 thread", "xpoptim blocked", "xpoptim torch")
# (case, optimizer or None for all, xpoptim implementation, peer, largest ratio
# xpoptim/peer wanted): issue 9's goals. SGD and RMSprop have the bandwidth goal instead
# of the seed's: their bytes are few, and the seed's few NumPy calls already stream them.
GOALS = (
    ("big", None, "xpoptim update", "torch fused", 1.1),
    ("big", "Adam", "xpoptim update", "seed", 0.125),
    ("small", "Adam", "xpoptim step", "torch fused", 0.5),
    ("mlp", "Adam", "xpoptim step", "seed", 0.5),
)
#: The big case's share of the measured memory bandwidth wanted (issue 9).
BANDWIDTH_GOAL = 0.75
#: Steps per timed round: a 30-microsecond step is timed in batches.
INNER = {"big": 1, "small": 1, "mlp": 200}


class Unavailable(Exception):
    """An implementation that cannot run here (the reason is reported)."""


class Layer:
    """The seed's layer protocol: ``params`` maps names to ``(param, grad)``."""

    def __init__(self, name: str, param: Any, grad: Any) -> None:
        self._params = {name: (param, grad)}

    @property
    def params(self) -> dict[str, tuple[Any, Any]]:
        return self._params


# -- implementations: each builder returns a function that does one full step ----------


def build_xpoptim(kind: str, params: list[np.ndarray], grads: list[np.ndarray], how: str):
    if kind in CATALOGUE:  # weight decay off by default, no seed-style regularization
        opt = getattr(xpoptim, kind)(**HYPER[kind])
    else:
        opt = getattr(xpoptim, kind)(**HYPER[kind], regularization=None)
    if how == "step":
        layers = [Layer("weights", p, g) for p, g in zip(params, grads, strict=True)]
        return lambda: opt.step(layers)
    named = {f"{i}.weights": p for i, p in enumerate(params)}
    named_grads = {f"{i}.weights": g for i, g in enumerate(grads)}
    options: dict[str, Any] = {"fast": how != "plain"}
    if how == "1 thread":
        options["num_threads"] = 1
    if how == "blocked":
        options["compile"] = False
    with xpoptim.execution_options(**options):
        state = [opt.init(named)]

    def step() -> None:
        with xpoptim.execution_options(**options):
            _, state[0] = opt.update(named, named_grads, state[0])

    return step


def build_xpoptim_torch(kind: str, params: list[np.ndarray], grads: list[np.ndarray]):
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"torch is not installed ({exc})") from None
    opt = getattr(xpoptim, kind)(**HYPER[kind], regularization=None)
    named = {f"{i}.weights": torch.from_numpy(p) for i, p in enumerate(params)}
    named_grads = {f"{i}.weights": torch.from_numpy(g) for i, g in enumerate(grads)}
    state = [opt.init(named)]

    def step() -> None:
        _, state[0] = opt.update(named, named_grads, state[0])

    return step


def build_seed(kind: str, params: list[np.ndarray], grads: list[np.ndarray]):
    if kind in CATALOGUE:
        raise Unavailable(f"mpneuralnetwork 1.1.1 has no {kind}")
    try:
        from mpneuralnetwork import optimizers
    except ImportError as exc:
        raise Unavailable(f"mpneuralnetwork is not installed ({exc})") from None
    # "bias" is excluded from regularization, which the seed cannot switch off.
    opt = getattr(optimizers, kind)(**HYPER[kind], regularization="L2", weight_decay=0.0)
    layers = [Layer("bias", p, g) for p, g in zip(params, grads, strict=True)]
    return lambda: opt.step(layers)


def build_torch(kind: str, params: list[np.ndarray], grads: list[np.ndarray], how: str):
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"torch is not installed ({exc})") from None
    if kind in CATALOGUE and not hasattr(torch.optim, kind):
        raise Unavailable(f"torch {torch.__version__} has no torch.optim.{kind}")
    tensors = []
    for p, g in zip(params, grads, strict=True):
        t = torch.nn.Parameter(torch.from_numpy(p))  # shares the NumPy memory
        t.grad = torch.from_numpy(g)
        tensors.append(t)
    h = HYPER[kind]
    flag = {"foreach": True} if how == "foreach" else {"fused": True}
    try:
        if kind == "SGD":
            opt = torch.optim.SGD(tensors, lr=h["learning_rate"], momentum=h["momentum"], **flag)
        elif kind in CATALOGUE:
            named = {TORCH_NAMES.get(k, k): v for k, v in h.items() if k not in ("beta1", "beta2")}
            if "beta1" in h:
                named["betas"] = (h["beta1"], h["beta2"])
            opt = getattr(torch.optim, kind)(tensors, **named, **flag)
        elif kind == "RMSprop":
            opt = torch.optim.RMSprop(
                tensors, lr=h["learning_rate"], alpha=h["decay_rate"], eps=h["epsilon"], **flag
            )
        else:
            opt = torch.optim.Adam(
                tensors,
                lr=h["learning_rate"],
                betas=(h["beta1"], h["beta2"]),
                eps=h["epsilon"],
                **flag,
            )
        opt.step()  # fused kernels that do not exist on CPU fail here
    except (RuntimeError, TypeError, ValueError) as exc:
        raise Unavailable(f"torch {torch.__version__}: {str(exc).splitlines()[0]}") from None
    return opt.step


def build_optax(kind: str, params: list[np.ndarray], grads: list[np.ndarray]):
    try:
        import jax
        import optax
    except ImportError as exc:
        raise Unavailable(f"jax/optax is not installed ({exc})") from None
    h = HYPER[kind]
    if kind == "SGD":
        tx = optax.sgd(h["learning_rate"], momentum=h["momentum"])
    elif kind == "RMSprop":
        tx = optax.rmsprop(h["learning_rate"], decay=h["decay_rate"], eps=h["epsilon"])
    elif kind == "Adam":
        tx = optax.adam(h["learning_rate"], b1=h["beta1"], b2=h["beta2"], eps=h["epsilon"])
    elif kind == "ScheduleFreeAdamW":
        tx = optax.contrib.schedule_free_adamw(
            h["learning_rate"], b1=h["beta1"], b2=h["beta2"], eps=h["epsilon"]
        )
    elif kind == "Lion":
        tx = optax.lion(h["learning_rate"], b1=h["beta1"], b2=h["beta2"], weight_decay=0.0)
    elif kind in ("Adamax", "NAdam", "RAdam"):
        tx = getattr(optax, kind.lower())(
            h["learning_rate"], b1=h["beta1"], b2=h["beta2"], eps=h["epsilon"]
        )
    elif kind == "Adadelta":
        tx = optax.adadelta(h["learning_rate"], rho=h["decay_rate"], eps=h["epsilon"])
    else:  # Adagrad, Rprop: optax's own defaults beyond the learning rate
        tx = getattr(optax, kind.lower())(h["learning_rate"])
    jparams = [jax.numpy.array(p) for p in params]
    jgrads = [jax.numpy.array(g) for g in grads]
    state = tx.init(jparams)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params: Any, state: Any, grads: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    box = [jparams, state]

    def step() -> None:
        box[0], box[1] = update(box[0], box[1], jgrads)
        jax.block_until_ready(box[0])

    return step


BUILDERS: dict[str, Callable[..., Callable[[], Any]]] = {
    "xpoptim update": functools.partial(build_xpoptim, how="update"),
    "xpoptim step": functools.partial(build_xpoptim, how="step"),
    "xpoptim 1 thread": functools.partial(build_xpoptim, how="1 thread"),
    "xpoptim blocked": functools.partial(build_xpoptim, how="blocked"),
    "xpoptim torch": build_xpoptim_torch,
    "numpy plain": functools.partial(build_xpoptim, how="plain"),
    "seed": build_seed,
    "torch foreach": functools.partial(build_torch, how="foreach"),
    "torch fused": functools.partial(build_torch, how="fused"),
    "optax jit": build_optax,
}


# -- measuring ---------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth(n: int, repeats: int) -> dict[str, float]:
    """GB/s of a plain copy (8 B/element) and a triad a = b + s*c (12 B/element)."""
    a = np.ones(n, np.float32)
    b = np.full(n, 2.0, np.float32)
    c = np.full(n, 3.0, np.float32)
    gbps = {"numpy copy": 8 * n / median_seconds(lambda: np.copyto(a, b), repeats) / 1e9}
    try:
        import torch
    except ImportError:
        pass
    else:  # multi-threaded, one pass each
        ta, tb, tc = (torch.from_numpy(x) for x in (a, b, c))
        copy_s = median_seconds(lambda: ta.copy_(tb), repeats)
        triad_s = median_seconds(lambda: torch.add(tb, tc, alpha=0.5, out=ta), repeats)
        gbps["torch copy"] = 8 * n / copy_s / 1e9
        gbps["torch triad"] = 12 * n / triad_s / 1e9
    return gbps


def make_case(name: str, sizes: list[int], rng: np.random.Generator):
    params = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
    grads = [np.float32(0.01) * rng.standard_normal(n, dtype=np.float32) for n in sizes]
    return params, grads


def run_case(
    case: str,
    sizes: list[int],
    kinds: list[str],
    impls: list[str],
    repeats: int,
    rng: np.random.Generator,
    inner: int = 1,
) -> list[dict[str, Any]]:
    rows = []
    elements = sum(sizes)
    params, grads = make_case(case, sizes, rng)
    bandwidth_size = min(max(elements, 25_000_000), 50_000_000)
    for kind in kinds:
        steps: dict[str, Callable[[], Any]] = {}
        reasons: dict[str, str] = {}
        for impl in impls:
            try:
                one = BUILDERS[impl](kind, params, grads)
                steps[impl] = one if inner == 1 else functools.partial(_repeat, one, inner)
                steps[impl]()  # warm-up: state allocation, jit, compile, first touch
            except Unavailable as exc:
                reasons[impl] = str(exc)
        bandwidth = memory_bandwidth(min(bandwidth_size, 10 * elements), 3)
        best = max(bandwidth.values())
        times: dict[str, list[float]] = {impl: [] for impl in steps}
        cpu: dict[str, list[float]] = {impl: [] for impl in steps}
        order = list(steps)
        for r in range(repeats):
            for impl in order[r % len(order) :] + order[: r % len(order)]:
                cpu_start = time.process_time()  # every thread of this process
                start = time.perf_counter()
                steps[impl]()
                times[impl].append((time.perf_counter() - start) / inner)
                cpu[impl].append((time.process_time() - cpu_start) / inner)
        moved = STREAMS[kind] * 4 * elements
        for impl in impls:
            row: dict[str, Any] = {
                "case": case,
                "optimizer": kind,
                "impl": impl,
                "bandwidth_gbps": bandwidth,
            }
            if impl in reasons:
                row["unavailable"] = reasons[impl]
            else:
                med = statistics.median(times[impl])
                row.update(
                    times_ms=[t * 1e3 for t in times[impl]],
                    median_ms=med * 1e3,
                    cpu_ms=statistics.median(cpu[impl]) * 1e3,
                    gbps=moved / med / 1e9,
                    fraction_of_bandwidth=moved / med / 1e9 / best,
                )
            rows.append(row)
        del steps, times, cpu
        gc.collect()
    return rows


def _repeat(step: Callable[[], Any], times: int) -> None:
    for _ in range(times):
        step()


COMPILE_SCRIPT = """
import time, numpy as np, xpoptim
from xpoptim._execution.compiled.kernels import compiled_kernels
p = {"w": np.ones(1000, np.float32)}
opt = getattr(xpoptim, KIND)()
state = opt.init(p)
start = time.perf_counter()
opt.update(p, {"w": np.ones(1000, np.float32)}, state)
print(time.perf_counter() - start, sum(k.compile_seconds for k in compiled_kernels()))
"""


def compile_times(kinds: list[str]) -> dict[str, dict[str, float]]:
    """Seconds of a first step in a fresh process: with an empty kernel cache (numba
    compiles) and with the cache that the first process left (numba loads)."""
    out: dict[str, dict[str, float]] = {}
    for kind in kinds:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "XPOPTIM_CACHE_DIR": cache}
            seconds = {}
            for when in ("cold", "warm"):
                done = subprocess.run(
                    [sys.executable, "-c", f"KIND = {kind!r}" + COMPILE_SCRIPT],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                step, kernels = map(float, done.stdout.split())
                seconds[f"{when} first step"] = step
                seconds[f"{when} kernels"] = kernels
            out[kind] = seconds
    return out


# -- reporting -------------------------------------------------------------------------------


def ratios(rows: list[dict[str, Any]], key: str = "median_ms") -> list[dict[str, Any]]:
    """xpoptim's median time (``key``: wall or CPU) divided by each peer's."""
    out = []
    by_key = {(r["case"], r["optimizer"], r["impl"]): r for r in rows}
    for case, kind in dict.fromkeys((r["case"], r["optimizer"]) for r in rows):
        for mine in XPOPTIM:
            me = by_key.get((case, kind, mine))
            if not me or key not in me:
                continue
            entry: dict[str, Any] = {"case": case, "optimizer": kind, "impl": mine}
            for peer in PEERS:
                other = by_key.get((case, kind, peer))
                if other and key in other:
                    entry[peer] = me[key] / other[key]
            out.append(entry)
    return out


def format_tables(result: dict[str, Any]) -> str:
    lines = [
        "memory bandwidth (best of copy/triad, measured before each group of rounds):",
    ]
    for r in result["rows"]:
        if r["impl"] == result["rows"][0]["impl"]:
            bandwidth = r["bandwidth_gbps"]
            lines.append(
                f"  {r['case']:5} {r['optimizer']:7}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items())
                + " GB/s"
            )
    lines += [
        "",
        f"| case | optimizer | implementation | ms/step (median of {result['repeats']}) "
        "| GB/s | % of bandwidth | CPU ms/step |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "median_ms" in r:
            lines.append(
                f"| {r['case']} | {r['optimizer']} | {r['impl']} | {r['median_ms']:.3g} "
                f"| {r['gbps']:.1f} | {100 * r['fraction_of_bandwidth']:.0f}% "
                f"| {r['cpu_ms']:.1f} |"
            )
        else:
            lines.append(
                f"| {r['case']} | {r['optimizer']} | {r['impl']} | n/a | | | ({r['unavailable']}) |"
            )
    lines += [
        "",
        "xpoptim time / peer time (< 1: xpoptim is faster), measured side by side:",
        "",
        "| case | optimizer | xpoptim via | " + " | ".join(PEERS) + " |",
        "|---|---|---|" + "---:|" * len(PEERS),
    ]
    for e in result["ratios"]:
        cells = [f"{e[p]:.2f}" if p in e else "-" for p in PEERS]
        lines.append(
            f"| {e['case']} | {e['optimizer']} | {e['impl'][8:]} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "CPU time (all threads) of xpoptim / of the peer: what each step costs the machine,",
        "much less sensitive than wall time to other jobs on a shared machine:",
        "",
        "| case | optimizer | xpoptim via | " + " | ".join(PEERS) + " |",
        "|---|---|---|" + "---:|" * len(PEERS),
    ]
    for e in result["cpu_ratios"]:
        cells = [f"{e[p]:.2f}" if p in e else "-" for p in PEERS]
        lines.append(
            f"| {e['case']} | {e['optimizer']} | {e['impl'][8:]} | " + " | ".join(cells) + " |"
        )
    lines += ["", "goals (issue 9), xpoptim time / peer time:"]
    for case, kind, impl, peer, limit in GOALS:
        for e in result["ratios"]:
            if kind not in (None, e["optimizer"]):
                continue
            if e["case"] == case and e["impl"] == impl and peer in e:
                ok = "met" if e[peer] <= limit else "NOT met"
                lines.append(
                    f"  {case:5} {e['optimizer']:7} via {impl[8:]:8} vs {peer:13}: "
                    f"{e[peer]:.2f} (want <= {limit}) {ok}"
                )
    for r in result["rows"]:
        if r["case"] == "big" and r["impl"] == "xpoptim update" and "median_ms" in r:
            share = r["fraction_of_bandwidth"]
            ok = "met" if share >= BANDWIDTH_GOAL else "NOT met"
            lines.append(
                f"  big   {r['optimizer']:7} share of the copy bandwidth: {100 * share:.0f}% "
                f"(want >= {100 * BANDWIDTH_GOAL:.0f}%) {ok}"
            )
    if result.get("compile"):
        lines += ["", "first step in a fresh process (s): cold cache (compile), warm (load):"]
        for kind, seconds in result["compile"].items():
            lines.append(
                f"  {kind:7} cold {seconds['cold first step']:.2f} "
                f"(kernels {seconds['cold kernels']:.2f}), warm {seconds['warm first step']:.2f} "
                f"(kernels {seconds['warm kernels']:.2f})"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in result["ratios"] if e["impl"] == "xpoptim step"]
    peers = [p for p in PEERS if any(p in e for e in entries)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(entries) + 2), 4.2))
    width = 0.8 / max(1, len(peers))
    for j, peer in enumerate(peers):
        xs = [i + (j - (len(peers) - 1) / 2) * width for i in range(len(entries))]
        ys = [1.0 / e[peer] if peer in e else 0.0 for e in entries]
        ax.bar(xs, ys, width, label=peer)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([f"{e['case']}\n{e['optimizer']}" for e in entries])
    ax.set_ylabel("speed-up of xpoptim (peer time / xpoptim time)")
    ax.set_title(
        f"One optimizer step (step(layers)), float32, NumPy, {result['machine']['cpus']} CPUs "
        f"(median of {result['repeats']})"
    )
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "xpoptim": xpoptim.__version__,
        "xpoptim_threads": xpoptim.ExecutionOptions().threads(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }
    for module in ("torch", "jax", "optax", "mpneuralnetwork"):
        try:
            from importlib.metadata import version

            info[module] = version(module)
        except Exception:
            info[module] = None
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [
            {k: d.get(k) for k in ("internal_api", "num_threads", "architecture", "version")}
            for d in threadpool_info()
        ]
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 rounds: a smoke run")
    parser.add_argument("--big", type=int, help="elements of the one-tensor case (1e8)")
    parser.add_argument("--small-count", type=int, help="tensors of the many-tensor case (2000)")
    parser.add_argument("--small-total", type=int, help="their elements in all (1e7)")
    parser.add_argument("--repeats", type=int, help="timed rounds (7; --quick: 3)")
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help="comma list of: " + ", ".join(OPTIMIZERS + CATALOGUE),
    )
    parser.add_argument(
        "--impls", default=",".join(IMPLS), help="comma list of: " + ", ".join(IMPLS)
    )
    parser.add_argument("--cases", default="big,small,mlp")
    parser.add_argument(
        "--no-compile-times", action="store_true", help="skip the fresh-process compile timing"
    )
    parser.add_argument("--threads", type=int, help="xpoptim fast-path threads")
    parser.add_argument("--json", type=Path, help="default bench-out/bench[-quick].json")
    parser.add_argument("--plot", type=Path, help="default docs/img/bench.png (full runs)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    quick = args.quick
    big = args.big or (2_000_000 if quick else 100_000_000)
    count = args.small_count or (200 if quick else 2000)
    total = args.small_total or (200_000 if quick else 10_000_000)
    repeats = args.repeats or (3 if quick else 7)
    suffix = "-quick" if quick else ""
    json_path = args.json or ROOT / "bench-out" / f"bench{suffix}.json"
    plot_path = args.plot or (
        ROOT / "bench-out" / "bench-quick.png" if quick else ROOT / "docs" / "img" / "bench.png"
    )
    if args.threads:
        xpoptim.set_execution_options(num_threads=args.threads)
    kinds = [k for k in args.optimizers.split(",") if k]
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(kinds) - set(OPTIMIZERS) - set(CATALOGUE) | set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown optimizers or implementations: {sorted(unknown)}")

    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "machine": machine(),
        "repeats": repeats,
        "sizes": {"big": big, "small": [count, total]},
        "rows": [],
    }
    cases = {"big": [big], "small": [total // count] * count, "mlp": [64 * 128, 128, 128 * 10, 10]}
    for case in args.cases.split(","):
        print(
            f"running {case}: {len(cases[case])} tensor(s), {sum(cases[case])} elements", flush=True
        )
        inner = 20 if quick and case == "mlp" else INNER[case]
        result["rows"] += run_case(case, cases[case], kinds, impls, repeats, rng, inner)
    if not args.no_compile_times:
        print("timing first steps in fresh processes", flush=True)
        result["compile"] = compile_times(kinds)
    result["ratios"] = ratios(result["rows"])
    result["cpu_ratios"] = ratios(result["rows"], "cpu_ms")
    table = format_tables(result)
    result["table"] = table
    print(table)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {json_path}")
    if not args.no_plot:
        try:
            plot(result, plot_path)
            print(f"wrote {plot_path}")
        except ImportError as exc:
            print(f"no plot: {exc}")
    return result


if __name__ == "__main__":
    main()
