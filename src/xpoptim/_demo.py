"""The demo: a two-layer MLP written against the Array API, trained with SGD, RMSprop and Adam.

The model, its backward pass and the training loop use only the namespace of its
arrays, so the same code trains on NumPy, PyTorch, JAX, Dask or array-api-strict.
Eager backends train through the seed's layer protocol (``optimizer.step(layers)``,
in place); immutable or lazy ones (JAX, Dask) through ``optimizer.update``.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ._compat import Array, Namespace
from ._execution import updates_in_place
from ._optimizers import SGD, Adam, Optimizer, RMSprop


@dataclass(frozen=True)
class BackendSpec:
    """What the demo needs to run on one backend."""

    #: the module that must import (the array library itself)
    package: str
    #: the name a user knows the library by, in messages
    display: str
    #: how to install it
    install: str
    #: the module whose ``array_namespace`` the demo uses
    namespace: str


BACKENDS = {
    "numpy": BackendSpec("numpy", "numpy", "pip install numpy", "array_api_compat.numpy"),
    "array_api_strict": BackendSpec(
        "array_api_strict", "array-api-strict", "pip install array-api-strict", "array_api_strict"
    ),
    "dask": BackendSpec(
        "dask.array", "dask", "pip install 'xpoptim[dask]'", "array_api_compat.dask.array"
    ),
    "torch": BackendSpec("torch", "torch", "pip install torch", "array_api_compat.torch"),
    "jax": BackendSpec("jax.numpy", "jax", "pip install jax", "jax.numpy"),
    "cupy": BackendSpec(
        "cupy", "cupy", "pip install 'xpoptim[cuda12]' (CuPy for CUDA 12)", "array_api_compat.cupy"
    ),
}

#: Backend name -> module whose ``array_namespace`` the demo uses.
BACKEND_MODULES = {name: spec.namespace for name, spec in BACKENDS.items()}


class BackendUnavailable(ModuleNotFoundError):
    """The array library of a backend is not installed (or cannot run here).

    The message says what to install: ``torch is not installed: pip install torch``.
    """


def namespace(backend: str) -> Namespace:
    """The Array API namespace of a backend by name.

    Raises:
        ValueError: no such backend.
        BackendUnavailable: its array library is not installed, cannot be imported, or
            (CuPy) has no CUDA device to run on; the message says what to do.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    spec = BACKENDS[backend]
    root = spec.package.split(".")[0]
    try:
        library = importlib.import_module(spec.package)
    except ImportError as exc:
        if exc.name in (root, spec.package):
            raise BackendUnavailable(
                f"{spec.display} is not installed: {spec.install}", name=exc.name
            ) from exc
        # Installed, but something it needs is missing or broken.
        raise BackendUnavailable(
            f"{spec.display} is installed but cannot be imported ({exc}): try {spec.install}",
            name=exc.name,
        ) from exc
    if backend == "cupy":
        try:
            count = library.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDARuntimeError, a missing driver
            raise BackendUnavailable(
                f"cupy is installed but no CUDA device is usable ({exc})", name="cupy"
            ) from exc
        if count < 1:
            raise BackendUnavailable("cupy is installed but there is no CUDA device", name="cupy")
    return importlib.import_module(spec.namespace)


def make_data(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy spiral: ``n`` points in 2-D, ``classes`` interleaved arms."""
    rng = np.random.default_rng(seed)
    per = n // classes
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, per)
        theta = np.linspace(c * 4.0, (c + 1) * 4.0, per) + rng.normal(scale=0.25, size=per)
        xs.append(np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1))
        ys.append(np.full(per, c))
    return np.concatenate(xs), np.concatenate(ys)


class Dense:
    """A fully connected layer with the seed's ``params`` protocol: name -> (param, grad)."""

    def __init__(self, xp: Namespace, weights: Array, biases: Array) -> None:
        self.xp = xp
        self.weights, self.biases = weights, biases
        self.grad_weights = xp.zeros_like(weights)
        self.grad_biases = xp.zeros_like(biases)
        self._input: Array = None

    def forward(self, x: Array) -> Array:
        self._input = x
        return x @ self.weights + self.biases

    def backward(self, grad_out: Array) -> Array:
        xp = self.xp
        self.grad_weights = xp.matrix_transpose(self._input) @ grad_out
        self.grad_biases = xp.sum(grad_out, axis=0, keepdims=True)
        return grad_out @ xp.matrix_transpose(self.weights)

    @property
    def params(self) -> dict[str, tuple[Array, Array]]:
        return {
            "weights": (self.weights, self.grad_weights),
            "biases": (self.biases, self.grad_biases),
        }


class ReLU:
    def __init__(self, xp: Namespace) -> None:
        self.xp = xp
        self._mask: Array = None

    def forward(self, x: Array) -> Array:
        self._mask = x > 0
        return self.xp.where(self._mask, x, 0.0)

    def backward(self, grad_out: Array) -> Array:
        return self.xp.where(self._mask, grad_out, 0.0)


def build_model(xp: Namespace, sizes: tuple[int, ...], dtype: Any, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    layers: list[Any] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = rng.normal(scale=np.sqrt(2.0 / n_in), size=(n_in, n_out))
        b = np.zeros((1, n_out))
        layers.append(
            Dense(xp, xp.asarray(w, dtype=dtype, copy=True), xp.asarray(b, dtype=dtype, copy=True))
        )
        if i < len(sizes) - 2:
            layers.append(ReLU(xp))
    return layers


def loss_and_grad(xp: Namespace, logits: Array, onehot: Array) -> tuple[Array, Array]:
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    exp = xp.exp(shifted)
    probs = exp / xp.sum(exp, axis=1, keepdims=True)
    log_probs = shifted - xp.log(xp.sum(exp, axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -xp.sum(onehot * log_probs) / n
    return loss, (probs - onehot) / n


def _persist(tree: dict[str, Array]) -> dict[str, Array]:
    """Compute lazy arrays once, so a training loop does not grow one endless graph."""
    return {k: v.persist() if hasattr(v, "persist") else v for k, v in tree.items()}


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """One BLAS thread for the demo's small matrix products: on a busy machine, threads
    fighting over cores made them up to 20x slower (and the timings meaningless)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the [demo] extra brings it; without it, BLAS decides
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")  # type: ignore[no-any-return]


class Progress:
    """Steps done, on a stream (stderr): one line per optimizer.

    On a terminal the line is rewritten in place, at most ten times a second; elsewhere
    (a log file, a pipe) a line is printed at each tenth of the run, so a log stays short.
    """

    def __init__(self, stream: TextIO, *, interactive: bool) -> None:
        self.stream = stream
        self.interactive = interactive

    def __call__(self, name: str, total: int) -> Callable[[int, float], None]:
        """A callback ``report(done, loss)`` for one optimizer's run of ``total`` steps."""
        start = time.perf_counter()
        shown = {"at": -1.0, "tenth": -1}

        def report(done: int, loss: float) -> None:
            now = time.perf_counter()
            last = done == total
            line = (
                f"{name:<8} step {done:>{len(str(total))}}/{total}  "
                f"loss {loss:.4f}  {now - start:6.1f}s"
            )
            if self.interactive:
                if last or now - shown["at"] >= 0.1:
                    shown["at"] = now
                    self.stream.write("\r" + line + ("\n" if last else ""))
                    self.stream.flush()
                return
            tenth = done * 10 // total
            if tenth != shown["tenth"]:
                shown["tenth"] = tenth
                self.stream.write(line + "\n")
                self.stream.flush()

        return report


def _progress(progress: bool | None, stream: TextIO) -> Progress | None:
    """The progress display: on by default when ``stream`` is a terminal."""
    interactive = stream.isatty()
    if progress is None:
        progress = interactive
    return Progress(stream, interactive=interactive) if progress else None


@dataclass
class Result:
    name: str
    losses: list[float] = field(default_factory=list)
    accuracy: float = 0.0
    seconds: float = 0.0


def train(
    xp: Namespace,
    opt: Optimizer,
    data: tuple[Array, Array, Array],
    *,
    steps: int,
    seed: int,
    report: Callable[[int, float], None] | None = None,
) -> Result:
    x, onehot, labels = data
    layers = build_model(xp, (2, 64, 64, 3), x.dtype, seed)
    dense = [layer for layer in layers if isinstance(layer, Dense)]
    in_place = updates_in_place(dense[0].weights)
    state = None
    result = Result(type(opt).__name__)
    start = time.perf_counter()
    for done in range(1, steps + 1):
        out = x
        for layer in layers:
            out = layer.forward(out)
        loss, grad = loss_and_grad(xp, out, onehot)
        for layer in reversed(layers):
            grad = layer.backward(grad)
        result.losses.append(float(loss))
        if report is not None:
            report(done, result.losses[-1])
        if in_place:
            opt.step(layers)  # the seed's protocol: parameters updated in place
            continue
        params = {f"{i}.{n}": p for i, d in enumerate(dense) for n, (p, _) in d.params.items()}
        grads = {f"{i}.{n}": g for i, d in enumerate(dense) for n, (_, g) in d.params.items()}
        if state is None:
            state = opt.init(params)
        params, state = opt.update(params, grads, state)
        params = _persist(params)
        state = type(state)(state.step, *(buf and _persist(buf) for buf in state[1:]))
        for i, d in enumerate(dense):
            d.weights, d.biases = params[f"{i}.weights"], params[f"{i}.biases"]
    out = x
    for layer in layers:
        out = layer.forward(out)
    predicted = xp.argmax(out, axis=1)
    result.accuracy = float(xp.mean(xp.astype(predicted == labels, x.dtype)))
    result.seconds = time.perf_counter() - start
    return result


def plot(results: list[Result], path: Path, backend: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(r.losses, label=f"{r.name} (final {r.losses[-1]:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    ax.set_title(f"xpoptim demo: 2-layer MLP on a 3-arm spiral ({backend})")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_demo(
    backend: str = "numpy",
    *,
    steps: int = 300,
    samples: int = 900,
    seed: int = 0,
    out: str | Path = "demo-out",
    progress: bool | None = None,
) -> list[Result]:
    """Train the MLP with each optimizer, print a table and save the loss curves as a PNG.

    Args:
        backend: one of `BACKENDS`.
        steps: training steps per optimizer, >= 1.
        samples: data set size, >= 3 (one point per spiral arm at least).
        seed: seed of the data and of the initial weights.
        out: folder for the PNG.
        progress: show each optimizer's steps on stderr; ``None`` (the default): when
            stderr is a terminal.

    Raises:
        ValueError: ``steps`` or ``samples`` is too small, or ``backend`` unknown.
        BackendUnavailable: the backend's array library is not installed.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if samples < 3:
        raise ValueError(f"samples must be >= 3 (one per class), got {samples}")
    xp = namespace(backend)
    show = _progress(progress, sys.stderr)
    x_np, y_np = make_data(samples, 3, seed)
    onehot_np = np.eye(3)[y_np]
    dtype = xp.float32
    data = (
        xp.asarray(x_np, dtype=dtype, copy=True),
        xp.asarray(onehot_np, dtype=dtype, copy=True),
        xp.asarray(y_np, dtype=xp.int32, copy=True),
    )
    optimizers: list[Optimizer] = [
        SGD(learning_rate=0.1, momentum=0.9),
        RMSprop(learning_rate=0.003),
        Adam(learning_rate=0.01),
    ]
    print(f"xpoptim demo: backend={backend}, {samples} samples, {steps} steps, float32")
    with _one_blas_thread():
        results = [
            train(
                xp,
                opt,
                data,
                steps=steps,
                seed=seed,
                report=show(type(opt).__name__, steps) if show else None,
            )
            for opt in optimizers
        ]
    print(f"{'optimizer':<10} {'first loss':>10} {'final loss':>10} {'accuracy':>9} {'time':>8}")
    for r in results:
        print(
            f"{r.name:<10} {r.losses[0]:>10.4f} {r.losses[-1]:>10.4f} "
            f"{r.accuracy:>9.3f} {r.seconds:>7.2f}s"
        )
    png = Path(out) / f"loss-{backend}.png"
    if plot(results, png, backend):
        print(f"loss curves saved to {png}")
    else:
        print("matplotlib is not installed (pip install 'xpoptim[demo]'): no plot saved")
    return results
