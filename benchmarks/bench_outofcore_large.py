"""An out-of-core Adam run larger than this machine's memory, under a memory cap.

What it does, in one process, on one file system:

1. checks the free space (the store needs about two versions of parameters + state
   while a step runs, plus the disk test file) and refuses, writing nothing, if short;
2. caps this process's address space with ``RLIMIT_AS`` (``--max-memory``), so the run
   fails rather than quietly using the machine's RAM (see "Why RLIMIT_AS" below);
3. measures the disk's sequential bandwidth beside the store, in the same directory:
   writes ``--disk-test-size`` bytes in 64 MiB blocks and ``fsync``\\s, then reads them
   back twice, once with ``O_DIRECT`` (no page cache at all) and once buffered after
   dropping the file from the page cache (``posix_fadvise(DONTNEED)``), the way the
   store reads its chunks; then writes the file again with ``O_DIRECT``. Again after the
   steps; each figure is the mean of the two measures. The disk's GB/s for a step's
   volume is (R + W) / (W / write+fsync speed + R / faster read speed); the same with
   the faster of the two writes is reported beside it ("the disk at its best");
4. creates an Adam store (`xpoptim.OutOfCore.create`) whose parameters are Dask arrays
   generated chunk by chunk (a pure function of the seed, the parameter and the chunk's
   index): they are never whole in memory;
5. runs ``--steps`` Adam steps (`store.step`) whose gradients are Dask arrays generated
   chunk by chunk, a pure function of (seed, step, parameter, chunk index): they are
   computed when a step's task needs the chunk, used, and dropped. **No gradient is
   ever stored on disk.** Before each step the store is dropped from the page cache,
   so the step reads from the disk (``--warm`` keeps the cache);
6. reports per step: wall time (of `store.step`, and of a ``sync()`` right after it,
   which writes back what the engine left dirty in the page cache: the directory engine
   fsyncs its chunks, Icechunk's local storage does not), GB/s (store bytes read +
   written / (step + sync time)), bytes written, the bytes the kernel says the process
   read from and wrote to the storage layer (``/proc/self/io``), CPU time, peak RSS of
   the step (``VmHWM``, reset before each step through ``/proc/self/clear_refs``),
   ``ru_maxrss`` of the process and of its children (the ``du`` runs; Linux charges a
   child the resident set of the parent it was spawned from), the storage used on disk
   after the step (``du``) and how much it grew during the step (free space sampled every
   0.2 s), and the ratio of the step's GB/s to the disk's for the same volume (goal: at
   least 50 %);
7. checks a few randomly sampled chunks bit for bit against the in-memory optimizer
   stepped on NumPy copies of those chunks, writes the figures as JSON and deletes the
   store (``--keep`` keeps it).

Why RLIMIT_AS: it is the one per-process memory limit Linux enforces without root or a
cgroup (``RLIMIT_RSS`` is not enforced; a cgroup ``memory.max`` needs a delegated
cgroup, and charges the page cache too). It bounds the address space, which is larger
than the resident set (reserved but untouched memory counts), so a run that completes
under a cap of ``M`` never had more than ``M`` resident. It is set inside the process
(``prlimit --as`` from outside sets the same limit) so the command is self-contained;
children (``du``) inherit it. glibc is limited to 2 malloc arenas, whose 64 MiB
reservations would otherwise count against the cap.

    python benchmarks/bench_outofcore_large.py --size 25GiB --dir /work/bench-large \\
        --engine directory --max-memory 2GiB

or ``nox -s bench_large -- --size 25GiB ...`` (never part of the default sessions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import mmap
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_outofcore import evict  # type: ignore[import-not-found,unused-ignore]

import xpoptim
from xpoptim._outofcore.demo import (
    cap_address_space,
    parse_size,
    size_argument,
    synthetic_arrays,
    verify_samples,
)

#: Block size of the disk test's writes and reads.
BLOCK = 64 * 2**20
#: Width of the synthetic weight matrices (float32: 16 KiB per row).
WIDTH = 4096
#: Peak RSS goal: about BASE + K x threads x chunk_bytes (docs/out-of-core.md, "Memory").
RSS_BASE = 250 * 2**20
RSS_K = 14


# -- the data ------------------------------------------------------------------------------


def layout_for(state_bytes: int, n_params: int, chunk_bytes: int) -> dict[str, dict[str, Any]]:
    """``n_params`` float32 matrices ``(rows, WIDTH)`` whose parameters + Adam state (3
    buffers) take at least ``state_bytes``; chunks of whole rows, about ``chunk_bytes``,
    and a whole number of chunks per matrix."""
    elements = math.ceil(state_bytes / 3 / 4)
    rows = max(1, math.ceil(elements / (n_params * WIDTH)))
    chunk_rows = max(1, min(rows, chunk_bytes // (WIDTH * 4)))
    rows = math.ceil(rows / chunk_rows) * chunk_rows  # whole chunks: Zarr pads edge chunks
    return {
        f"layer{i}.weight": {
            "shape": [rows, WIDTH],
            "dtype": "float32",
            "chunks": [chunk_rows, WIDTH],
        }
        for i in range(n_params)
    }


def nbytes(layout: dict[str, dict[str, Any]]) -> int:
    """Bytes of one buffer (the parameters) of ``layout``."""
    return sum(math.prod(m["shape"]) * np.dtype(m["dtype"]).itemsize for m in layout.values())


# -- measures of the process and the disk ---------------------------------------------------


def proc_status(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmPeak``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def proc_io() -> dict[str, int]:
    """``/proc/self/io``: ``read_bytes``/``write_bytes`` are what this process (all its
    threads) made the kernel fetch from / send to the storage layer, page cache excluded."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def ru_maxrss() -> dict[str, int]:
    """Peak RSS so far of this process and of its (waited-for) children, in bytes."""
    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


def disk_used(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (``du -s --block-size=1``)."""
    out = subprocess.run(
        ["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[0])


class Watch:
    """Measures what happens in a ``with`` block: wall and CPU time of the process, its
    kernel I/O (`proc_io`), its peak RSS (``VmHWM``, reset on entry) and the lowest free
    space of the file system at ``directory`` (sampled every 0.2 s by a thread: how much
    the store grows while a step writes its new version beside the committed one)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.figures: dict[str, Any] = {}
        self._done = threading.Event()
        self._min_free = 0

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            self._min_free = min(self._min_free, shutil.disk_usage(self.directory).free)

    def __enter__(self) -> Watch:
        reset_peak_rss()
        self._io = proc_io()
        self._cpu = cpu_seconds()
        self._free = self._min_free = shutil.disk_usage(self.directory).free
        self._done.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall_s = time.perf_counter() - self._start
        self._done.set()
        self._thread.join()
        io = proc_io()
        self.figures = {
            "wall_s": wall_s,
            "cpu_s": cpu_seconds() - self._cpu,
            "io_read_bytes": io["read_bytes"] - self._io["read_bytes"],
            "io_write_bytes": io["write_bytes"] - self._io["write_bytes"],
            "peak_rss_bytes": proc_status("VmHWM"),
            "peak_address_space_bytes": proc_status("VmPeak"),
            "peak_growth_on_disk_bytes": self._free - self._min_free,
        }


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sync() -> float:
    """``sync()``: seconds to write back what the kernel still holds dirty. Run after each
    step, so that a step is timed until its data is on the disk whether or not the engine
    fsyncs (the directory engine does; Icechunk's local storage leaves it to the kernel),
    and so that `evict` can drop it (dirty pages cannot be dropped)."""
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


def _read_all(path: Path, direct: bool) -> tuple[int, float]:
    """Read ``path`` sequentially in `BLOCK` pieces: (bytes, seconds)."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT requires
    done = 0
    fd = os.open(path, flags)
    try:
        start = time.perf_counter()
        while True:
            n = os.preadv(fd, [buf], done)
            if n <= 0:
                break
            done += n
        return done, time.perf_counter() - start
    finally:
        os.close(fd)
        buf.close()


def _write_direct(path: Path, size: int, block: memoryview) -> float:
    """Write ``size`` bytes (a multiple of `BLOCK`) with ``O_DIRECT``, then ``fsync``: seconds."""
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT requires
    buf[:] = block
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        start = time.perf_counter()
        done = 0
        while done < size:
            done += os.pwritev(fd, [buf], done)
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        buf.close()


def disk_bandwidth(directory: Path, size: int) -> dict[str, Any]:
    """The disk's sequential bandwidth, in ``directory``, with a file of ``size`` bytes
    (rounded up to 64 MiB blocks), one at a time:

    * buffered writes, then one ``fsync`` (the page-cache path the store takes);
    * reads with ``O_DIRECT`` (no page cache) and buffered reads after dropping the
      file from the page cache (``posix_fadvise(DONTNEED)``; the kernel reads ahead);
    * ``O_DIRECT`` writes, then ``fsync`` (no page cache).
    """
    size = math.ceil(size / BLOCK) * BLOCK
    block = memoryview(np.random.default_rng(0).bytes(BLOCK))  # slices without copies
    path = directory / "disk-bandwidth.bin"
    out: dict[str, Any] = {"bytes": size}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            start = time.perf_counter()
            left = size
            while left > 0:
                left -= os.write(fd, block[: min(BLOCK, left)])
            os.fsync(fd)
            out["write_fsync_s"] = time.perf_counter() - start
        finally:
            os.close(fd)
        evict(path)
        try:
            done, out["read_o_direct_s"] = _read_all(path, direct=True)
            out["read_o_direct_gb_per_s"] = done / out["read_o_direct_s"] / 1e9
        except OSError as exc:  # a file system without O_DIRECT (tmpfs)
            out["read_o_direct_s"] = out["read_o_direct_gb_per_s"] = None
            print(f"O_DIRECT reads not possible here: {exc}", flush=True)
        evict(path)
        done, out["read_after_dontneed_s"] = _read_all(path, direct=False)
        out["read_after_dontneed_gb_per_s"] = done / out["read_after_dontneed_s"] / 1e9
        path.unlink()
        try:
            out["write_o_direct_s"] = _write_direct(path, size, block)
            out["write_o_direct_gb_per_s"] = size / out["write_o_direct_s"] / 1e9
        except OSError as exc:
            out["write_o_direct_s"] = out["write_o_direct_gb_per_s"] = None
            print(f"O_DIRECT writes not possible here: {exc}", flush=True)
    finally:
        path.unlink(missing_ok=True)
    out["write_fsync_gb_per_s"] = size / out["write_fsync_s"] / 1e9
    return out


def same_volume_gb_per_s(read_bytes: int, written: int, write_gbs: float, read_gbs: float) -> float:
    """The disk's GB/s for a step's volume: (R + W) / (W / write speed + R / read speed)."""
    return (read_bytes + written) / (written / write_gbs + read_bytes / read_gbs)


# -- the run ---------------------------------------------------------------------------------


def required_free(data_bytes: int, disk_test_bytes: int) -> int:
    """Free bytes the run needs: while a step runs, the committed version and the new one
    (2 x params+state); after the steps, one version beside the disk test file; plus a
    margin for metadata (Zarr, Icechunk manifests) of 1 GiB + 2 % of the data."""
    margin = 2**30 + data_bytes // 50
    return max(2 * data_bytes, data_bytes + disk_test_bytes) + margin


def check_free(directory: Path, need: int, what: str, then: str = "Nothing was written.") -> int:
    """The free bytes at ``directory``; `SystemExit` with a message if fewer than ``need``."""
    free = shutil.disk_usage(directory).free
    if free < need:
        raise SystemExit(
            f"bench_outofcore_large: not enough free space for {what}: it needs "
            f"{need / 2**30:.1f} GiB free on the file system of {directory}, which has "
            f"{free / 2**30:.1f} GiB. Free some space, use --dir on another file system, or "
            f"a smaller --size. {then}"
        )
    return free


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"bench_outofcore_large: stopped by signal {signum}")


def run(args: argparse.Namespace, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """The benchmark (module docstring); returns the figures written as JSON."""
    base = Path(args.dir).resolve()
    store_dir = base / f"store-{args.engine}"
    if store_dir.exists():
        raise SystemExit(
            f"bench_outofcore_large: {store_dir} exists (a store kept by --keep, or left by a "
            "killed run): delete it first. Nothing was written."
        )
    layout = layout_for(args.size, args.params, args.chunk_size)
    param_bytes = nbytes(layout)
    data_bytes = 3 * param_bytes  # Adam: parameters, m and v
    need = required_free(data_bytes, args.disk_test_size)
    existing = next(p for p in (base, *base.parents) if p.exists())
    free_at_start = check_free(existing, need, f"{data_bytes / 2**30:.2f} GiB of params + state")
    base.mkdir(parents=True, exist_ok=True)
    chunk = layout[next(iter(layout))]["chunks"]
    chunk_bytes = math.prod(chunk) * 4
    shape = tuple(layout[next(iter(layout))]["shape"])
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    echo(
        f"{args.engine} store in {store_dir}: {len(layout)} x {shape} "
        f"float32 = {param_bytes / 2**30:.2f} GiB of parameters, {data_bytes / 2**30:.2f} GiB "
        f"with Adam's m and v ({data_bytes / mem_total:.2f} x this machine's "
        f"{mem_total / 2**30:.1f} GiB of RAM); chunks {chunk} ({chunk_bytes / 2**20:.0f} MiB), "
        f"{args.threads} threads; {free_at_start / 2**30:.1f} GiB free, "
        f"{need / 2**30:.1f} GiB needed"
    )
    if args.max_memory:
        cap_address_space(args.max_memory, echo)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()

    steps: list[dict[str, Any]] = []
    try:
        echo(f"disk test: {args.disk_test_size / 2**30:.1f} GiB in {base} ...")
        disk_before = disk_bandwidth(base, args.disk_test_size)
        echo(json.dumps(disk_before))

        optimizer = xpoptim.Adam(learning_rate=1e-3)
        with Watch(base) as watch:
            store = xpoptim.OutOfCore.create(
                store_dir,
                optimizer,
                synthetic_arrays(layout, args.seed, 0),  # generated chunk by chunk by Dask
                chunk_bytes=args.chunk_size,
                num_workers=args.threads,
                engine=args.engine,
                progress=args.progress,
            )
        sync_s = sync()
        create_s = watch.figures["wall_s"] + sync_s
        create = {
            **watch.figures,
            "sync_after_s": sync_s,
            "bytes_written": data_bytes,
            "gb_per_s": data_bytes / create_s / 1e9,
            "disk_used_bytes": disk_used(store_dir),
        }
        echo(
            f"created step 0 in {create_s:.1f} s ({create['gb_per_s']:.2f} GB/s), "
            f"{create['disk_used_bytes'] / 2**30:.2f} GiB on disk, peak RSS "
            f"{create['peak_rss_bytes'] / 2**20:.0f} MiB"
        )

        for t in range(1, args.steps + 1):
            # The new version needs room beside the committed one.
            check_free(
                base, data_bytes + 2**30, f"step {t}", "The run stops; its store is deleted."
            )
            if not args.warm:
                evict(store_dir)
            with Watch(base) as watch:
                # The gradient of step t: Dask arrays generated chunk by chunk, never stored.
                summary = store.step(synthetic_arrays(store.layout, args.seed, t), step=t)
            sync_s = sync()
            wall_s = watch.figures["wall_s"]
            row = {
                "step": t,
                **watch.figures,
                "sync_after_s": sync_s,
                "durable_s": wall_s + sync_s,
                "gb_per_s": summary.bytes_moved / (wall_s + sync_s) / 1e9,
                "gb_per_s_step_call": summary.bytes_moved / wall_s / 1e9,
                "bytes_read": summary.bytes_read,
                "bytes_written": summary.bytes_written,
                "bytes_gradient_generated": summary.bytes_gradient,
                "flush_s": summary.flush_s,
                "ru_maxrss_bytes": ru_maxrss(),
                "disk_used_bytes": disk_used(store_dir),
                "free_bytes": shutil.disk_usage(base).free,
                "load_average": os.getloadavg(),
            }
            steps.append(row)
            echo(
                f"{summary}; then sync {sync_s:.1f} s; {row['gb_per_s']:.3f} GB/s durable; "
                f"kernel I/O read "
                f"{row['io_read_bytes'] / 1e9:.2f} GB, wrote {row['io_write_bytes'] / 1e9:.2f} GB; "
                f"CPU {row['cpu_s']:.0f} s; peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB; "
                f"{row['disk_used_bytes'] / 2**30:.2f} GiB on disk after the step, up to "
                f"{row['peak_growth_on_disk_bytes'] / 2**30:.2f} GiB more during it"
            )

        start = time.perf_counter()
        checked = verify_samples(store, args.seed, args.samples, np.random.default_rng(args.seed))
        verify_s = time.perf_counter() - start
        echo(f"verified {len(checked)} sampled chunks bit for bit against in-memory Adam")

        echo("disk test again ...")
        disk_after = disk_bandwidth(base, args.disk_test_size)
        echo(json.dumps(disk_after))
    finally:
        if args.keep:
            echo(f"kept the store in {store_dir}")
        elif store_dir.exists():
            shutil.rmtree(store_dir)
            echo(f"deleted the store {store_dir}")

    def mean(key: str) -> float | None:
        values = [d[key] for d in (disk_before, disk_after) if d[key] is not None]
        return sum(values) / len(values) if values else None

    disk = {
        key: mean(f"{key}_gb_per_s")
        for key in ("write_fsync", "write_o_direct", "read_after_dontneed", "read_o_direct")
    }
    # The disk's figure for a step's volume: a multi-GB write + fsync (through the page
    # cache, as the store writes) and the faster of the two reads. Beside it, the disk at
    # its best: the faster of that write and an O_DIRECT write.
    fsync_write = disk["write_fsync"]
    assert fsync_write is not None
    best_read = max(v for k, v in disk.items() if k.startswith("read") and v is not None)
    best_write = max(v for k, v in disk.items() if k.startswith("write") and v is not None)
    for row in steps:
        row["disk_gb_per_s_same_volume"] = same_volume_gb_per_s(
            row["bytes_read"], row["bytes_written"], fsync_write, best_read
        )
        row["ratio_to_disk"] = row["gb_per_s"] / row["disk_gb_per_s_same_volume"]
    read_total = sum(r["bytes_read"] for r in steps)
    written_total = sum(r["bytes_written"] for r in steps)
    overall_gbs = (read_total + written_total) / sum(r["durable_s"] for r in steps) / 1e9
    disk_gbs = same_volume_gb_per_s(read_total, written_total, fsync_write, best_read)
    best_gbs = same_volume_gb_per_s(read_total, written_total, best_write, best_read)
    peak_rss = max([create["peak_rss_bytes"]] + [r["peak_rss_bytes"] for r in steps])
    rss_goal = RSS_BASE + RSS_K * args.threads * chunk_bytes
    maxrss = ru_maxrss()
    result = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "engine": args.engine,
        "optimizer": "Adam(learning_rate=1e-3)",
        "params": {n: m["shape"] for n, m in layout.items()},
        "chunks": chunk,
        "chunk_bytes": chunk_bytes,
        "threads": args.threads,
        "param_bytes": param_bytes,
        "params_plus_state_bytes": data_bytes,
        "gradients": "Dask, chunk by chunk, a pure function of (seed, step, parameter, chunk "
        "index); never stored on disk",
        "cold_reads": not args.warm,
        "memory_cap": {
            "how": "RLIMIT_AS set in the process before the work (glibc arenas limited to 2)",
            "bytes": args.max_memory,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "ram_bytes": mem_total,
            "platform": platform.platform(),
            "file_system_bytes": shutil.disk_usage(base).total,
        },
        "python": sys.version.split()[0],
        "free_bytes_at_start": free_at_start,
        "free_bytes_needed": need,
        "create": create,
        "steps": steps,
        "verified_chunks": len(checked),
        "verify_s": verify_s,
        "disk_before": disk_before,
        "disk_after": disk_after,
        "disk_gb_per_s_mean_before_after": disk,
        "disk_write_gb_per_s_used": fsync_write,
        "disk_read_gb_per_s_used": best_read,
        "steps_gb_per_s": overall_gbs,
        "disk_gb_per_s_same_volume": disk_gbs,
        "ratio_steps_to_disk": overall_gbs / disk_gbs,
        "ratio_goal_met": overall_gbs / disk_gbs >= 0.5,
        "disk_best_gb_per_s_same_volume": best_gbs,
        "ratio_steps_to_disk_best": overall_gbs / best_gbs,
        "peak_rss_bytes": peak_rss,
        "ru_maxrss_bytes": maxrss,
        "rss_goal_bytes": rss_goal,
        "rss_goal_met": peak_rss <= rss_goal,
        "load_average_before_after": [load_before, os.getloadavg()],
        "store_deleted": not args.keep,
    }
    return result


def report(result: dict[str, Any], echo: Callable[[str], Any] = print) -> None:
    """A table of the figures."""
    gib = 2**30
    echo("")
    echo(
        f"{'step':>5}{'step s':>9}{'sync s':>8}{'GB/s':>8}{'written GB':>12}{'disk GB/s':>11}"
        f"{'ratio':>7}{'peak RSS MiB':>14}{'on disk GiB':>13}"
    )
    for r in result["steps"]:
        echo(
            f"{r['step']:>5}{r['wall_s']:>9.1f}{r['sync_after_s']:>8.1f}{r['gb_per_s']:>8.3f}"
            f"{r['bytes_written'] / 1e9:>12.2f}{r['disk_gb_per_s_same_volume']:>11.3f}"
            f"{r['ratio_to_disk']:>7.0%}{r['peak_rss_bytes'] / 2**20:>14.0f}"
            f"{r['disk_used_bytes'] / gib:>13.2f}"
        )
    disk = result["disk_gb_per_s_mean_before_after"]

    def gbs(key: str) -> str:
        return "n/a" if disk[key] is None else f"{disk[key]:.3f}"

    echo(
        f"disk (GB/s, mean of before and after): write+fsync {gbs('write_fsync')}, "
        f"O_DIRECT write {gbs('write_o_direct')}, read after DONTNEED "
        f"{gbs('read_after_dontneed')}, O_DIRECT read {gbs('read_o_direct')}"
    )
    echo(
        f"steps {result['steps_gb_per_s']:.3f} GB/s / disk "
        f"{result['disk_gb_per_s_same_volume']:.3f} GB/s = "
        f"{result['ratio_steps_to_disk']:.0%} (goal >= 50 %; against the disk at its best, "
        f"O_DIRECT writes included, {result['disk_best_gb_per_s_same_volume']:.3f} GB/s: "
        f"{result['ratio_steps_to_disk_best']:.0%}); peak RSS "
        f"{result['peak_rss_bytes'] / 2**20:.0f} MiB (ru_maxrss self "
        f"{result['ru_maxrss_bytes']['self'] / 2**20:.0f} MiB, children "
        f"{result['ru_maxrss_bytes']['children'] / 2**20:.0f} MiB; goal <= "
        f"{result['rss_goal_bytes'] / 2**20:.0f} MiB) for "
        f"{result['params_plus_state_bytes'] / gib:.2f} GiB of params + state"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--size",
        type=size_argument,
        default=parse_size("25GiB"),
        help="parameters + Adam state (3 x the parameters), e.g. 25GiB (default) or 1GB",
    )
    parser.add_argument(
        "--dir",
        default="bench-out/outofcore-large",
        help="where the store and the disk test file go (the file system measured)",
    )
    parser.add_argument("--engine", choices=["directory", "icechunk"], default="directory")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--params", type=int, default=4, help=f"matrices (rows, {WIDTH})")
    parser.add_argument("--chunk-size", type=size_argument, default=parse_size("16MiB"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--max-memory",
        type=size_argument,
        default=parse_size("2GiB"),
        help="RLIMIT_AS of this process (default 2GiB)",
    )
    parser.add_argument("--disk-test-size", type=size_argument, default=parse_size("4GiB"))
    parser.add_argument("--samples", type=int, default=4, help="chunks verified at the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm", action="store_true", help="keep the page cache between steps")
    parser.add_argument("--keep", action="store_true", help="keep the store at the end")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars"
    )
    parser.add_argument(
        "--json", default=None, help="default: benchmarks/results/outofcore_large_ENGINE.json"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.params < 1 or args.threads < 1 or args.samples < 0:
        parser.error("--steps, --params and --threads must be >= 1, --samples >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM ends the run through the finally clauses: the store is deleted.
    signal.signal(signal.SIGTERM, _terminate)
    result = run(args)
    report(result)
    out = Path(args.json or f"benchmarks/results/outofcore_large_{args.engine}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
