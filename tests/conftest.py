"""Backends for the test matrix, array-api-extra's and SciPy's model.

``XPOPTIM_BACKENDS`` (comma-separated, set by each nox session) chooses the backends
that the ``backend`` and ``xp`` fixtures run over; by default every backend that can
be imported here. A backend that is asked for but cannot run (CuPy without a CUDA
device) is skipped with the reason.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

# The moto S3 server fixture (``s3_server``) for the object-storage tests.
pytest_plugins = ["s3server"]

ALL_BACKENDS = ("numpy", "array_api_strict", "dask", "torch", "jax", "cupy")


@dataclass(frozen=True)
class Backend:
    """One array library as the tests see it: how to make its arrays and read them back."""

    name: str
    module: str
    #: whether arrays can be updated in place (step(layers) works)
    eager_writeable: bool
    #: whether update() builds a lazy graph
    lazy: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def import_module(self) -> Any:
        return importlib.import_module(self.module)

    def skip_reason(self) -> str | None:
        try:
            mod = self.import_module()
        except ImportError as exc:
            return f"{self.module} is not installed ({exc})"
        if self.name == "cupy":
            try:
                if mod.cuda.runtime.getDeviceCount() < 1:
                    return "CuPy is installed but there is no CUDA device"
            except Exception as exc:  # CUDARuntimeError, missing driver
                return f"CuPy is installed but no CUDA device is usable: {exc}"
        return None

    @property
    def xp(self) -> Any:
        from array_api_compat import array_namespace

        return array_namespace(self.asarray(np.zeros(1)))

    def device(self) -> Any:
        """The device test arrays live on (a non-default one for array-api-strict)."""
        if self.name == "array_api_strict":
            import array_api_strict

            return array_api_strict.Device("device1")
        return None

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """A copy of NumPy data as this backend's array (dtype given as a NumPy dtype)."""
        a = np.array(a, dtype=dtype if dtype is not None else None, copy=True)
        mod = self.import_module()
        if self.name == "numpy":
            return a
        if self.name == "array_api_strict":
            return mod.asarray(a, device=self.device(), copy=True)
        if self.name == "dask":
            chunks = tuple(max(1, (n + 1) // 2) for n in a.shape)
            return mod.from_array(a, chunks=chunks)
        if self.name == "torch":
            return mod.tensor(a)
        if self.name == "jax":
            return mod.numpy.array(a)
        if self.name == "cupy":
            return mod.asarray(a)
        raise AssertionError(self.name)

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.name == "dask":
            x = x.compute()
        if self.name == "array_api_strict":
            import array_api_strict

            x = array_api_strict.asarray(x, device=array_api_strict.Device("CPU_DEVICE"))
        if self.name == "torch":
            return x.detach().cpu().numpy().copy()
        if self.name == "cupy":
            return x.get()
        return np.array(x, copy=True)


BACKENDS = {
    b.name: b
    for b in (
        Backend("numpy", "numpy", eager_writeable=True),
        Backend("array_api_strict", "array_api_strict", eager_writeable=True),
        Backend("dask", "dask.array", eager_writeable=False, lazy=True),
        Backend("torch", "torch", eager_writeable=True),
        Backend("jax", "jax", eager_writeable=False),
        Backend("cupy", "cupy", eager_writeable=True),
    )
}


def selected_backends() -> list[str]:
    env = os.environ.get("XPOPTIM_BACKENDS", "").strip()
    if env:
        names = [n.strip() for n in env.split(",") if n.strip()]
        unknown = set(names) - set(BACKENDS)
        if unknown:
            raise pytest.UsageError(f"XPOPTIM_BACKENDS names unknown backends: {sorted(unknown)}")
        return names
    return [n for n in ALL_BACKENDS if BACKENDS[n].skip_reason() is None]


def pytest_configure(config: pytest.Config) -> None:
    if "jax" in selected_backends():
        try:
            import jax
        except ImportError:
            return
        # float64 parameters must stay float64 on JAX too.
        jax.config.update("jax_enable_x64", True)


def pytest_report_header(config: pytest.Config) -> str:
    return f"xpoptim test backends: {', '.join(selected_backends())}"


@pytest.fixture(params=selected_backends())
def backend(request: pytest.FixtureRequest) -> Backend:
    b = BACKENDS[request.param]
    reason = b.skip_reason()
    if reason:
        pytest.skip(reason)
    return b


@pytest.fixture
def xp(backend: Backend) -> Any:
    return backend.xp


@pytest.fixture(params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> np.dtype:
    return np.dtype(request.param)


def used_fields(state: Any) -> list[str]:
    """The names of the state buffers an optimizer uses (unused optional fields are None)."""
    return [f for f in type(state)._fields[1:] if getattr(state, f) is not None]


def buffers_of(state: Any) -> list[dict[str, Any]]:
    """The state buffers an optimizer uses."""
    return [getattr(state, f) for f in used_fields(state)]


def exact_snapshot(backend: Backend, params: Any, state: Any) -> dict[str, Any]:
    """The bytes of every parameter and state buffer, and the state's counters: two runs
    are identical when their snapshots are equal."""
    out = {f"params.{k}": backend.to_numpy(v).tobytes() for k, v in params.items()}
    for name in state._fields:
        value = getattr(state, name)
        if isinstance(value, dict):
            out.update({f"{name}.{k}": backend.to_numpy(v).tobytes() for k, v in value.items()})
        elif value is not None:
            out[name] = int(value)
    return out


def tolerance(dtype: np.dtype) -> dict[str, float]:
    """Comparison tolerance against the float64 reference for a parameter dtype."""
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == np.float64 else {"rtol": 2e-5, "atol": 2e-6}


@pytest.fixture
def assert_no_compute() -> Callable[[], Any]:
    """A context manager under which any Dask compute fails the test."""
    import contextlib

    @contextlib.contextmanager
    def guard() -> Any:
        import dask

        def forbidden(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a Dask graph was computed where it must stay lazy")

        with dask.config.set(scheduler=forbidden):
            yield

    return guard
