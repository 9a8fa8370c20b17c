"""Sessions: the backend test matrix, lint, the demo and the benchmarks.

``nox`` alone runs every default session: the tests on each CPU backend (the CuPy
one skips itself, with the reason, where there is no CUDA device), lint and docs. ``demo``
and the benchmarks run only when named: ``nox -s demo``, ``nox -s bench``,
``nox -s bench_large``, ``nox -s bench_cluster``.
"""

from __future__ import annotations

import shutil
import subprocess

import nox
import nox.command

nox.needs_version = ">=2024.10.9"
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
TEST_DEPS = nox.project.dependency_groups(PYPROJECT, "test")
S3_TEST_DEPS = nox.project.dependency_groups(PYPROJECT, "test-s3")
LINT_DEPS = nox.project.dependency_groups(PYPROJECT, "lint")
DOCS_DEPS = nox.project.dependency_groups(PYPROJECT, "docs")

# What each backend adds to the test environment. torch is pinned to the CPU build
# that this project's machines carry on disk; elsewhere pip fetches it from PyPI.
BACKENDS = {
    "numpy": ["."],
    "array_api_strict": ["."],
    # Dask, Zarr and Icechunk (every out-of-core engine), and the S3 server of its tests.
    "dask": [".[icechunk]", *S3_TEST_DEPS],
    "torch": [".", "torch==2.13.0"],
    "jax": [".", "jax", "optax"],
    "cupy": [".[cuda12]"],
}


def cuda_device_reason() -> str | None:
    """Why there is no usable CUDA device, or None if there is one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no CUDA device: nvidia-smi is not on PATH"
    result = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    if result.returncode != 0 or "GPU" not in result.stdout:
        return (
            f"no CUDA device: nvidia-smi -L says {result.stdout.strip() or result.stderr.strip()!r}"
        )
    return None


@nox.session
@nox.parametrize("backend", list(BACKENDS), ids=list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite with the arrays of one backend."""
    if backend == "cupy" and (reason := cuda_device_reason()):
        session.skip(reason)
    session.install(*TEST_DEPS, *BACKENDS[backend])
    session.run("pytest", *session.posargs, env={"XPOPTIM_BACKENDS": backend})


@nox.session
def tests_without_numba(session: nox.Session) -> None:
    """The NumPy tests with numba uninstalled: xpoptim imports and steps on the blocked path."""
    session.install(*TEST_DEPS, ".")
    session.run("python", "-m", "pip", "uninstall", "--yes", "numba", "llvmlite")
    session.run("pytest", *session.posargs, env={"XPOPTIM_BACKENDS": "numpy"})


# Array API libraries that no one here wrote, beyond the matrix: each runs
# tests/test_array_libraries.py (every seed optimizer against the float64 reference, and
# no compute in update on the lazy ones) with its arrays.
ARRAY_LIBRARIES = {
    "cubed": ["cubed"],
    "ndonnx": ["ndonnx", "onnxruntime"],
    "sparse": ["sparse"],
}


@nox.session
@nox.parametrize("library", list(ARRAY_LIBRARIES), ids=list(ARRAY_LIBRARIES))
def array_library(session: nox.Session, library: str) -> None:
    """The optimizers on a third-party Array API library (skipped if it cannot install)."""
    session.install(*TEST_DEPS, ".")
    try:
        session.install(*ARRAY_LIBRARIES[library])
    except nox.command.CommandFailed:
        session.skip(f"{library} cannot be installed here")
    session.run(
        "pytest",
        "tests/test_array_libraries.py",
        "-k",
        library,  # every test of that file names its library
        *session.posargs,
        env={"XPOPTIM_ARRAY_LIBRARIES": library, "XPOPTIM_BACKENDS": "numpy"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy --strict on the package."""
    session.install(*LINT_DEPS, ".")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


# What the docs' examples import beyond xpoptim[icechunk] (CuPy ones run only on a GPU): the
# faces' pages need torch, jax and optax, the array libraries' page Cubed.
DOCS_BACKENDS = ["array-api-strict>=2.3", *BACKENDS["torch"][1:], "jax", "optax", "cubed"]


@nox.session
def docs(session: nox.Session) -> None:
    """Run the docstring examples and the pages' code blocks, then ``mkdocs build --strict``.

    Strict: a broken cross-reference or a missing page fails the build. The site goes to
    ``site/``; ``nox -s docs -- --site-dir DIR`` puts it elsewhere.
    """
    # The examples of the pages and docstrings use Dask, Zarr and Icechunk (out of core), and the
    # README's "On each backend" blocks each backend that runs on a CPU.
    session.install(*DOCS_DEPS, ".[icechunk]", *DOCS_BACKENDS)
    session.run("pytest", "--doctest-modules", "src/xpoptim", "-q", "-p", "no:cacheprovider")
    # Every ```python block of README.md and docs/*.md, in order per page; with
    # XPOPTIM_DOCS_ALL=1 a block whose library is missing here fails instead of skipping.
    session.run(
        "pytest",
        "tests/test_docs_examples.py",
        "-q",
        "-p",
        "no:cacheprovider",
        env={"XPOPTIM_DOCS_ALL": "1", "XPOPTIM_BACKENDS": None},
    )
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


# What the demo needs on each backend, beyond xpoptim[demo]: extras of xpoptim, and
# packages (the tests get array-api-strict from the test group; the demo must ask for it).
DEMO_EXTRAS = {"dask": ["dask"], "cupy": ["cuda12"]}
DEMO_PACKAGES = {
    "array_api_strict": ["array-api-strict>=2.3"],
    "torch": BACKENDS["torch"][1:],
    "jax": ["jax"],
}


def demo_backend(posargs: list[str]) -> str:
    """The ``--backend`` of the demo's arguments (``--backend B`` or ``--backend=B``)."""
    backend = "numpy"
    for i, arg in enumerate(posargs):
        if arg == "--backend" and i + 1 < len(posargs):
            backend = posargs[i + 1]
        elif arg.startswith("--backend="):
            backend = arg.split("=", 1)[1]
    return backend


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """The demo: ``nox -s demo [-- --backend torch | --out-of-core DIR --size 3GB]``.

    Installs what the chosen backend needs (``--backend`` numpy, array_api_strict, dask,
    torch, jax or cupy); the demo's own ``--help`` lists its options.
    """
    backend = demo_backend(session.posargs)
    if backend not in BACKENDS:
        session.error(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    extras = ["demo", *DEMO_EXTRAS.get(backend, [])]
    if "--out-of-core" in session.posargs and "dask" not in extras:
        extras.append("dask")
    session.install(f".[{','.join(extras)}]", *DEMO_PACKAGES.get(backend, []))
    session.run("python", "-m", "xpoptim", "demo", *session.posargs)


# The peers that `nox -s bench` times xpoptim against (torch pinned to the CPU build
# on disk), and what the benchmark itself uses to plot and to report thread pools.
BENCH_DEPS = [
    "torch==2.13.0",
    "jax",
    "optax",
    "mpneuralnetwork==1.1.1",
    "matplotlib>=3.8",
    "threadpoolctl>=3",
]


@nox.session(default=False)
def bench_gpu(session: nox.Session) -> None:
    """One 1e8 Adam step on a CUDA GPU: xpoptim's CuPy kernel against torch.optim on CUDA."""
    if reason := cuda_device_reason():
        session.skip(reason)
    session.install(".[cuda12]", "torch")
    session.run("python", "benchmarks/bench_gpu.py", *session.posargs)


@nox.session(default=False)
def bench_cluster(session: nox.Session) -> None:
    """An out-of-core Adam step on a LocalCluster of 1, 2, 4 workers x 1, 4, 16 MiB chunks.

    On the moto S3 server (started by the script, as the tests start it) and on a local
    Icechunk store: ``nox -s bench_cluster [-- --quick | --size 1.2 --workers 1,2,4]``.
    """
    session.install(*TEST_DEPS, *BACKENDS["dask"])  # pytest and moto: the tests' S3 server
    session.run("python", "benchmarks/bench_outofcore_cluster.py", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Time one step against the seed, torch.optim and optax: ``nox -s bench [-- --quick]``."""
    session.install(".", *BENCH_DEPS)
    # OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE (set on some machines here for old OpenBLAS
    # builds) slow a current NumPy: unset them for this command only.
    session.run(
        "python",
        "benchmarks/bench_step.py",
        *session.posargs,
        env={"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None},
    )


@nox.session(default=False)
def bench_large(session: nox.Session) -> None:
    """Adam out of core on 25 GiB, more than RAM: ``nox -s bench_large [-- --engine icechunk]``.

    Options (``-- --help``): ``--size 25GiB --engine directory|icechunk --dir DIR
    --max-memory 2GiB --steps 2``. Needs about two versions of the store free on the
    disk of ``--dir`` (51 GiB for the default 25 GiB of params + state; it checks first
    and refuses if short) and runs for minutes: never part of the default sessions.
    """
    session.install(".[icechunk]")
    session.run("python", "benchmarks/bench_outofcore_large.py", *session.posargs)
