"""The out-of-core demo: Adam on a synthetic parameter set of a given size, from disk.

``run_out_of_core_demo(directory, size_bytes)`` creates parameters whose total footprint
(parameters + Adam's two state buffers + the gradient) is ``size_bytes``, runs a few
`xpoptim.OutOfCore` steps with a gradient generated chunk by chunk (never whole
in memory), checks randomly sampled chunks bit for bit against the in-memory optimizer
run on NumPy copies of those chunks (the rules are elementwise, so a chunk can be
stepped alone), and reports GB/s and peak RSS.

Also runnable alone, with a hard address-space cap::

    python -m xpoptim._outofcore.demo DIR --size 3GB --max-memory 1GiB

The synthetic data is a pure function of ``(seed, step, parameter index, block index)``,
so any chunk of the initial parameters or of any step's gradient can be regenerated on
its own (the verification and the crash tests rely on this).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import re
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._optimizers import Adam
from .chunk_step import DEFAULT_CHUNK_BYTES, _lazy
from .directory import DirectoryStore
from .layout import LOCK, StoreError, describe_entries, read_meta
from .store import OutOfCore

#: Width of the synthetic weight matrices (float32: 4 KiB per row).
WIDTH = 1024
#: Weight matrices in the synthetic set (each with a bias vector).
LAYERS = 4

#: The note in the description of the stores this demo creates: it replaces only those.
DEMO_NOTE = "made by the xpoptim out-of-core demo"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str | int) -> int:
    """Bytes from ``"3GB"``, ``"512MiB"``, ``"1.5e9"`` or an int (GB = 1e9, GiB = 2**30).

    Raises:
        ValueError: not a positive size with one of the units B, KB, MB, GB, TB, KiB,
            MiB, GiB, TiB (``"1G"`` is refused: say GB or GiB).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else ""
        try:
            value = float(match.group(1)) * _UNITS[unit] if match else math.nan
        except (KeyError, ValueError):
            value = math.nan
    if not math.isfinite(value) or value < 1:
        raise ValueError(
            f"size {text!r}: expected a positive number with an optional unit B, KB, MB, GB, "
            "TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 3GB or 512MiB"
        )
    return int(value)


def size_argument(text: str) -> int:
    """`parse_size` for argparse: a bad size is a usage error, not a traceback."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def require_dask() -> None:
    """Import Dask and Zarr now, or raise `xpoptim._outofcore.MissingDependencyError`
    (which says to install ``xpoptim[dask]``) before anything is written."""
    for module in ("dask.array", "zarr"):
        _lazy(module)


def demo_directory(directory: str | Path) -> bool:
    """Whether the demo may use ``directory``, and whether it must replace a store there.

    A new or empty directory is used as it is; a store that this demo made (its
    description carries `DEMO_NOTE`) is replaced; anything else is refused: the demo
    never deletes what it did not create.

    Returns:
        True when a previous demo store is to be replaced.

    Raises:
        StoreError: ``directory`` holds anything else (the message lists what).
    """
    path = Path(directory)
    if not path.exists():
        return False
    if not path.is_dir():
        raise StoreError(f"{path} is a file, not a directory: the demo needs a directory")
    entries = [e.name for e in path.iterdir() if e.name != LOCK]
    if not entries:
        return False
    try:
        note = read_meta(path, (), any_version=True).get("note")
    except StoreError:
        note = None
    if note != DEMO_NOTE:
        raise StoreError(
            f"{path} is not empty and is not a store made by this demo: it holds "
            f"{describe_entries(entries)}. The demo never deletes what it did not create, "
            "so nothing was changed: give it a new or empty directory"
        )
    return True


def synthetic_block(
    seed: int, step: int, index: int, block_id: Sequence[int], shape: Sequence[int], dtype: Any
) -> np.ndarray:
    """One chunk of synthetic data: the initial parameter (``step == 0``) or a gradient.

    Uniform in [-0.5, 0.5) for parameters, [-0.05, 0.05) for gradients; a pure function
    of its arguments.
    """
    rng = np.random.default_rng([seed, step, index, *block_id])
    x = rng.random(tuple(shape), dtype=np.dtype(dtype))
    x -= 0.5
    if step:
        x *= 0.1
    return x


def _block(
    seed: int, step: int, index: int, delay_s: float, dtype: Any, block_info: Any = None
) -> np.ndarray:
    info = block_info[None]
    if delay_s:
        time.sleep(delay_s)  # the crash and worker-kill tests slow steps down with this
    return synthetic_block(seed, step, index, info["chunk-location"], info["chunk-shape"], dtype)


def synthetic_arrays(
    layout: dict[str, dict[str, Any]], seed: int, step: int, delay_s: float = 0.0
) -> dict[str, Any]:
    """Dask arrays of synthetic data for a store's ``layout``: step 0 = parameters, else
    the gradient of step ``step``; each chunk is generated only when Dask computes it."""
    da = _lazy("dask.array")
    out = {}
    for index, (name, meta) in enumerate(layout.items()):
        chunks = da.core.normalize_chunks(tuple(meta["chunks"]), tuple(meta["shape"]))
        out[name] = da.map_blocks(
            _block,
            seed,
            step,
            index,
            delay_s,
            meta["dtype"],
            chunks=chunks,
            dtype=meta["dtype"],
            meta=np.empty((0,) * len(meta["shape"]), meta["dtype"]),
            name=f"xpoptim-synthetic-{seed}-{step}-{index}-{name}",
        )
    return out


def synthetic_layout(
    param_bytes: int, chunk_bytes: int, dtype: Any = "float32"
) -> dict[str, dict[str, Any]]:
    """Shapes and chunks of `LAYERS` weight matrices ``(rows, WIDTH)`` and biases."""
    itemsize = np.dtype(dtype).itemsize
    rows = max(1, (param_bytes // itemsize - LAYERS * WIDTH) // (LAYERS * WIDTH))
    chunk_rows = max(1, min(rows, chunk_bytes // (WIDTH * itemsize)))
    layout = {}
    for i in range(LAYERS):
        layout[f"layer{i}.weights"] = {
            "shape": [rows, WIDTH],
            "dtype": str(np.dtype(dtype)),
            "chunks": [chunk_rows, WIDTH],
        }
        layout[f"layer{i}.bias"] = {
            "shape": [WIDTH],
            "dtype": str(np.dtype(dtype)),
            "chunks": [WIDTH],
        }
    return layout


def run_synthetic_steps(
    directory: str | Path,
    until: int,
    *,
    seed: int = 0,
    delay_s: float = 0.0,
    num_workers: int | None = None,
    crash_at: str | None = None,
    ready: Any = None,
) -> None:
    """Resume the store in ``directory`` and step it with synthetic gradients up to step
    ``until``: re-running it after a crash continues where the last commit left off.

    ``crash_at`` kills this process with SIGKILL when a step reaches that phase (see
    `xpoptim._outofcore.chunk_step._phase_hook`); ``ready`` (an event) is set once the store
    is open. Both serve the crash tests, which run this in a forked process.
    """
    from . import chunk_step as _outofcore

    if crash_at is not None:

        def crash(phase: str) -> None:
            if phase == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)

        _outofcore._phase_hook = crash
    store = OutOfCore.open(directory, num_workers=num_workers)
    if ready is not None:
        ready.set()
    for t in range(store.step_count + 1, until + 1):
        store.step(synthetic_arrays(store.layout, seed, t, delay_s=delay_s), step=t)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def verify_samples(
    store: OutOfCore, seed: int, samples: int, rng: np.random.Generator
) -> list[tuple[str, tuple[int, ...]]]:
    """Check ``samples`` random chunks of the committed store bit for bit against the
    in-memory optimizer stepped on NumPy copies of the same chunks from step 0.

    Returns the checked (name, chunk index) pairs; raises AssertionError on a mismatch.
    """
    layout = store.layout
    params, state = store.arrays()
    steps = state.step
    names = list(layout)
    checked = []
    for _ in range(samples):
        name = names[int(rng.integers(len(names)))]
        meta = layout[name]
        grid = [math.ceil(n / c) for n, c in zip(meta["shape"], meta["chunks"], strict=True)]
        block = tuple(int(rng.integers(n)) for n in grid)
        sel = tuple(
            slice(b * c, min((b + 1) * c, n))
            for b, c, n in zip(block, meta["chunks"], meta["shape"], strict=True)
        )
        shape = [s.stop - s.start for s in sel]
        index = names.index(name)
        # The same optimizer, in memory, on this one chunk.
        p = {name: synthetic_block(seed, 0, index, block, shape, meta["dtype"])}
        s = store.optimizer.init(p)
        for t in range(1, steps + 1):
            g = {name: synthetic_block(seed, t, index, block, shape, meta["dtype"])}
            p, s = store.optimizer.update(p, g, s)
        got = {"params": params[name][sel]}
        want = {"params": p[name]}
        for field in store.optimizer._buffer_fields():
            got[field] = getattr(state, field)[name][sel]
            want[field] = getattr(s, field)[name]
        for key in got:
            if not np.array_equal(got[key], want[key]):
                raise AssertionError(
                    f"{key}[{name!r}] chunk {block} after {steps} steps differs from the "
                    "in-memory optimizer"
                )
        checked.append((name, block))
    return checked


def run_out_of_core_demo(
    directory: str | Path,
    size_bytes: int | str,
    *,
    steps: int = 3,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    num_workers: int | None = None,
    samples: int = 8,
    seed: int = 0,
    progress: bool | None = None,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run Adam out of core on a synthetic parameter set of ``size_bytes`` in ``directory``.

    Args:
        directory: where the Zarr store goes: a new or empty directory, or a store an
            earlier run of this demo made (replaced). Anything else is refused.
        size_bytes: total footprint of parameters + Adam state (2 buffers) + gradient,
            in bytes or as text (``"3GB"``); the parameters get a quarter of it.
        steps: Adam steps to run.
        chunk_bytes: target size of one chunk (memory grows with chunk_bytes x threads).
        num_workers: threads (None: one per CPU).
        samples: chunks checked against the in-memory optimizer at the end.
        seed: seed of the synthetic data.
        progress: show a progress bar during each step; None: where stderr is a terminal.
        echo: where the report lines go.

    Raises:
        StoreError: ``directory`` holds something this demo did not create.
        MissingDependencyError: Dask or Zarr is not installed.

    Returns:
        The figures: ``size_bytes``, ``param_bytes``, ``steps``, ``step_seconds``,
        ``gb_per_s`` (store bytes moved per second, best step), ``mean_gb_per_s``,
        ``peak_rss_bytes``, ``create_seconds``, ``verified_chunks``.
    """
    size = parse_size(size_bytes)
    require_dask()
    replace = demo_directory(directory)
    optimizer = Adam(learning_rate=1e-3)
    buffers = 2 + len(optimizer._buffer_fields())  # params + state + gradient
    itemsize = 4
    param_bytes = size // buffers
    layout = synthetic_layout(param_bytes, chunk_bytes)
    param_bytes = sum(math.prod(m["shape"]) * itemsize for m in layout.values())
    echo(
        f"out-of-core demo: {buffers * param_bytes / 1e9:.2f} GB in all "
        f"({param_bytes / 1e9:.2f} GB of parameters, Adam state x2, gradient) in {directory}; "
        f"chunks {chunk_bytes / 2**20:.0f} MiB, threads {num_workers or 'auto'}"
    )
    start = time.perf_counter()
    store = DirectoryStore._create(
        directory,
        optimizer,
        synthetic_arrays(layout, seed, 0),
        chunks=None,
        chunk_bytes=chunk_bytes,
        overwrite=replace,
        num_workers=num_workers,
        client=None,
        progress=progress,
        note=DEMO_NOTE,
    )
    create_s = time.perf_counter() - start
    echo(f"created step 0 in {create_s:.1f} s")
    summaries = []
    for t in range(1, steps + 1):
        summary = store.step(synthetic_arrays(store.layout, seed, t), step=t, progress=progress)
        summaries.append(summary)
        echo(str(summary))
    checked = verify_samples(store, seed, samples, np.random.default_rng(seed))
    echo(f"verified {len(checked)} sampled chunks bit for bit against in-memory Adam on NumPy")
    figures: dict[str, Any] = {
        "size_bytes": buffers * param_bytes,
        "param_bytes": param_bytes,
        "chunk_bytes": chunk_bytes,
        "num_workers": num_workers,
        "steps": steps,
        "create_seconds": create_s,
        "step_seconds": [s.elapsed_s for s in summaries],
        "gb_per_s": max(s.gb_per_s for s in summaries),
        "mean_gb_per_s": sum(s.bytes_moved for s in summaries)
        / sum(s.elapsed_s for s in summaries)
        / 1e9,
        "peak_rss_bytes": peak_rss_bytes(),
        "verified_chunks": len(checked),
    }
    echo(
        f"throughput {figures['mean_gb_per_s']:.2f} GB/s (best step {figures['gb_per_s']:.2f}); "
        f"peak RSS {figures['peak_rss_bytes'] / 2**20:.0f} MiB for "
        f"{figures['size_bytes'] / 2**20:.0f} MiB of data"
    )
    return figures


def cap_address_space(limit: int, echo: Callable[[str], Any] = print) -> None:
    """A hard cap on this process's memory: ``RLIMIT_AS`` (what ``ulimit -v`` sets).

    The address space counts reservations as well as memory in use, and glibc reserves
    64 MiB of address space per malloc arena (up to 8 per core, one per busy thread), so
    the cap also limits glibc to 2 arenas (``MALLOC_ARENA_MAX=2``) where it can.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_arena_max = -8  # glibc's <malloc.h>
        libc.mallopt(m_arena_max, 2)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    echo(f"address space capped at {limit / 2**20:.0f} MiB (RLIMIT_AS)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xpoptim._outofcore.demo DIR --size 3GB [--max-memory 1GiB]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument(
        "--size", type=size_argument, default="3GB", help="data size, e.g. 3GB (default)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--chunk-size", type=size_argument, default=DEFAULT_CHUNK_BYTES, help="e.g. 16MiB"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar per step (default: when stderr is a terminal)",
    )
    parser.add_argument(
        "--max-memory",
        type=size_argument,
        default=None,
        help="hard cap on this process's address space (RLIMIT_AS), e.g. 1GiB",
    )
    args = parser.parse_args(argv)
    return run_cli(parser, args.directory, args.size, args, samples=args.samples)


def run_cli(
    parser: argparse.ArgumentParser, directory: str, size: int, args: Any, *, samples: int = 8
) -> int:
    """Run the demo for a command line: a missing dependency or a directory the demo
    may not use ends in a one-line error (exit status 1), not a traceback."""
    from .directory import MissingDependencyError

    try:
        require_dask()
        demo_directory(directory)
        if args.max_memory:
            cap_address_space(args.max_memory)
        run_out_of_core_demo(
            directory,
            size,
            steps=args.steps or 3,
            chunk_bytes=args.chunk_size,
            num_workers=args.threads,
            samples=samples,
            seed=getattr(args, "seed", 0),
            progress=args.progress,
        )
    except (MissingDependencyError, StoreError) as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
