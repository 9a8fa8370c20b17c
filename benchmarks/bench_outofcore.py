"""Out-of-core Adam step throughput against this machine's sequential disk bandwidth.

Measured in the same run, on the same file system and the same volume:

* disk: write the bytes a step writes, in 64 MiB blocks, then ``fsync``; drop the file
  from the page cache (``posix_fadvise(DONTNEED)``) and read the bytes a step reads;
* steps: :class:`xpoptim.OutOfCore` Adam steps on a synthetic parameter set (the demo's),
  with the committed version dropped from the page cache before each step, so that the
  step reads from the disk too (``--warm`` keeps the cache).

The store throughput of a step is (bytes read + bytes written) / step time; the disk's
is the same volume / (write+fsync time + read time). Every chunk carries a CRC-32C
checksum (computed when written, verified when read): the CPU cost of that is measured
alone too (``checksum_gb_per_s``: CRC-32C of 64 MiB blocks on one thread). Prints a
table and writes JSON.

    python benchmarks/bench_outofcore.py --size 3GB --dir /path/on/the/disk/to/test
    python benchmarks/bench_outofcore.py --engine icechunk --steps 8   # history engine
    python benchmarks/bench_outofcore.py --s3 --steps 8   # Icechunk on a local S3 server

``--s3`` starts moto's S3-compatible server on 127.0.0.1 (as the tests do): it keeps the
objects in its own memory, so these figures measure the HTTP/S3 protocol path and the
engine, not a cloud store's bandwidth. Storage used is measured after every step (files
under the store, or the bucket's objects).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import xpoptim
from xpoptim._outofcore.demo import (
    parse_size,
    peak_rss_bytes,
    synthetic_arrays,
    synthetic_layout,
    verify_samples,
)

BLOCK = 64 * 2**20


def evict(path: Path) -> None:
    """Drop the file(s) at ``path`` from the page cache (they must be clean: fsynced)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bandwidth(directory: Path, write_bytes: int, read_bytes: int) -> dict[str, float]:
    """Sequential write+fsync of ``write_bytes`` and cold read of ``read_bytes``, in seconds."""
    block = np.random.default_rng(0).random(BLOCK // 8).tobytes()
    path = directory / "disk-bandwidth.bin"

    def write(fd: int, nbytes: int) -> None:
        while nbytes > 0:
            nbytes -= os.write(fd, block[: min(BLOCK, nbytes)])
        os.fsync(fd)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        write(fd, write_bytes)
        write_s = time.perf_counter() - start
        write(fd, max(0, read_bytes - write_bytes))  # untimed: enough to read back
    finally:
        os.close(fd)
    evict(path)
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        remaining = read_bytes
        while remaining > 0:
            chunk = os.read(fd, min(BLOCK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
    finally:
        os.close(fd)
    read_s = time.perf_counter() - start
    path.unlink()
    return {"write_fsync_s": write_s, "read_s": read_s}


def checksum_speed(seconds: float = 0.5) -> float:
    """GB/s of CRC-32C (Zarr's crc32c codec's implementation) on one thread."""
    import google_crc32c

    block = np.random.default_rng(1).random(BLOCK // 8)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        google_crc32c.value(block)
        done += block.nbytes
    return done / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="3GB", help="params + state + gradient (default 3GB)")
    parser.add_argument("--dir", default=None, help="where to put the data (default: a temp dir)")
    parser.add_argument("--chunk-size", default="16MiB")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warm", action="store_true", help="keep the page cache between steps")
    parser.add_argument(
        "--json", default=None, help="default: benchmarks/results/outofcore-ENGINE.json"
    )
    parser.add_argument("--engine", choices=["directory", "icechunk"], default="directory")
    parser.add_argument("--s3", action="store_true", help="Icechunk on a local S3 server (moto)")
    args = parser.parse_args(argv)
    if args.s3:
        args.engine = "icechunk"
    label = "icechunk-s3" if args.s3 else args.engine
    if args.json is None:
        args.json = f"benchmarks/results/outofcore-{label}.json"
    with contextlib.ExitStack() as stack:
        return run(args, label, stack)


def run(args: argparse.Namespace, label: str, stack: contextlib.ExitStack) -> int:

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="xpoptim-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    store_dir = base / "store"
    chunk_bytes = parse_size(args.chunk_size)
    size = parse_size(args.size)
    layout = synthetic_layout(size // 4, chunk_bytes)
    location: str | Path = store_dir
    options: dict[str, Any] | None = None
    used: Any = lambda: sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file())  # noqa: E731
    if args.s3:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from s3server import running_server  # type: ignore[import-not-found,unused-ignore]

        server = stack.enter_context(running_server())
        bucket = server.new_bucket()
        location, options = f"s3://{bucket}/run", server.storage_options
        used = lambda: sum(server.objects(bucket).values())  # noqa: E731
    print(f"creating the store at {location} ({label}) ...", flush=True)
    start = time.perf_counter()
    store = xpoptim.OutOfCore.create(
        location,
        xpoptim.Adam(),
        synthetic_arrays(layout, 0, 0),
        overwrite=not args.s3,
        num_workers=args.threads,
        engine=args.engine,
        storage_options=options,
    )
    create_s = time.perf_counter() - start
    storage = [used()]

    rows = []
    nbytes = sum(int(np.prod(m["shape"])) * 4 for m in layout.values()) * 3
    try:
        before = disk_bandwidth(base, nbytes, nbytes)
        for t in range(1, args.steps + 1):
            if not args.warm and not args.s3:
                os.sync()  # Icechunk's local storage does not fsync: make the pages clean
                evict(store_dir)
            summary = store.step(synthetic_arrays(store.layout, 0, t), step=t)
            storage.append(used())
            print(f"{summary}; storage used {storage[-1] / 1e9:.3f} GB", flush=True)
            rows.append(summary)
        verify_samples(store, 0, 4, np.random.default_rng(0))
        after = disk_bandwidth(base, rows[0].bytes_written, rows[0].bytes_read)
        # The disk is shared: average the measures taken before and after the steps.
        disk = {k: (before[k] + after[k]) / 2 for k in before}
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    checksum_gbs = checksum_speed()
    moved = rows[0].bytes_moved
    disk_gbs = moved / (disk["write_fsync_s"] + disk["read_s"]) / 1e9
    step_gbs = [r.gb_per_s for r in rows]
    result: dict[str, Any] = {
        "engine": label,
        "storage_bytes_after_create_and_each_step": storage,
        "size_bytes": size,
        "param_bytes": rows[0].bytes_written // 3,
        "chunk_bytes": chunk_bytes,
        "threads": args.threads or os.cpu_count(),
        "cold_reads": not args.warm,
        "create_s": create_s,
        "step_s": [r.elapsed_s for r in rows],
        "step_flush_s": [r.flush_s for r in rows],
        "step_bytes_read": rows[0].bytes_read,
        "step_bytes_written": rows[0].bytes_written,
        "step_gb_per_s": step_gbs,
        "disk_seconds_before_after": [before, after],
        "disk_write_fsync_gb_per_s": rows[0].bytes_written / disk["write_fsync_s"] / 1e9,
        "disk_read_gb_per_s": rows[0].bytes_read / disk["read_s"] / 1e9,
        "disk_gb_per_s_same_volume": disk_gbs,
        # Step 1 reads the zero state from Zarr's fill value, not from the disk.
        "ratio_median_step_to_disk": float(np.median(step_gbs[1:] or step_gbs)) / disk_gbs,
        "checksum_gb_per_s": checksum_gbs,
        # Each step computes a CRC-32C of every chunk written and checks it twice for every
        # chunk read (the store's own check, which names a bad chunk, and Zarr's codec).
        "checksum_s_per_step_one_thread": (rows[0].bytes_written + 2 * rows[0].bytes_read)
        / checksum_gbs
        / 1e9,
        "peak_rss_bytes": peak_rss_bytes(),
        "load_average": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "python": sys.version.split()[0],
    }
    print()
    print(f"{'measure':<44}{'GB/s':>10}")
    print("-" * 54)
    print(f"{'disk: write + fsync':<44}{result['disk_write_fsync_gb_per_s']:>10.3f}")
    print(f"{'disk: read (page cache dropped)':<44}{result['disk_read_gb_per_s']:>10.3f}")
    print(f"{'disk: step volume, write+fsync then read':<44}{disk_gbs:>10.3f}")
    for t, gbs in enumerate(step_gbs, start=1):
        print(f"{f'out-of-core Adam step {t}':<44}{gbs:>10.3f}")
    print(f"{'CRC-32C checksum (CPU, one thread)':<44}{checksum_gbs:>10.3f}")
    print("-" * 54)
    version = rows[0].bytes_written
    print(
        f"storage used: {min(storage) / version:.2f} to {max(storage) / version:.2f} versions "
        f"(one version = params + state = {version / 1e9:.3f} GB)"
    )
    print(
        f"median step (from step 2) / disk = {result['ratio_median_step_to_disk']:.0%} "
        "(disk: mean of a "
        "measure before and one after the steps); "
        f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of data"
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
