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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._compat import Array, Namespace
from ._execution import updates_in_place
from ._optimizers import SGD, Adam, Optimizer, RMSprop

#: Backend name -> module whose ``array_namespace`` the demo uses.
BACKEND_MODULES = {
    "numpy": "array_api_compat.numpy",
    "array_api_strict": "array_api_strict",
    "dask": "array_api_compat.dask.array",
    "torch": "array_api_compat.torch",
    "jax": "jax.numpy",
    "cupy": "array_api_compat.cupy",
}


def namespace(backend: str) -> Namespace:
    """The Array API namespace of a backend by name."""
    if backend not in BACKEND_MODULES:
        raise ValueError(f"backend must be one of {sorted(BACKEND_MODULES)}, got {backend!r}")
    try:
        return importlib.import_module(BACKEND_MODULES[backend])
    except ImportError as exc:
        raise SystemExit(
            f"the {backend!r} backend needs {BACKEND_MODULES[backend].split('.')[0]} installed"
            f" ({exc})"
        ) from exc


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


@dataclass
class Result:
    name: str
    losses: list[float] = field(default_factory=list)
    accuracy: float = 0.0
    seconds: float = 0.0


def train(
    xp: Namespace, opt: Optimizer, data: tuple[Array, Array, Array], *, steps: int, seed: int
) -> Result:
    x, onehot, labels = data
    layers = build_model(xp, (2, 64, 64, 3), x.dtype, seed)
    dense = [layer for layer in layers if isinstance(layer, Dense)]
    in_place = updates_in_place(dense[0].weights)
    state = None
    result = Result(type(opt).__name__)
    start = time.perf_counter()
    for _ in range(steps):
        out = x
        for layer in layers:
            out = layer.forward(out)
        loss, grad = loss_and_grad(xp, out, onehot)
        for layer in reversed(layers):
            grad = layer.backward(grad)
        result.losses.append(float(loss))
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
) -> list[Result]:
    """Train the MLP with each optimizer, print a table and save the loss curves as a PNG."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    xp = namespace(backend)
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
        results = [train(xp, opt, data, steps=steps, seed=seed) for opt in optimizers]
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
