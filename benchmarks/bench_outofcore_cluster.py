"""How one out-of-core Adam step scales with Dask workers and chunk size, on S3 and local disk.

A simulation on one machine of what `docs/past-one-machine.md` describes for a real
cluster: a ``dask.distributed`` `LocalCluster` of N worker processes (one thread each)
steps an Icechunk store

* on a real S3-compatible server over HTTP (moto in server mode on 127.0.0.1, started
  here exactly as the tests start it: ``tests/s3server.py``), and
* on local disk (``engine="icechunk"``),

for every N of ``--workers`` and every chunk size of ``--chunk-mib``. The workers read the
committed chunks, compute the gradient's chunks themselves (``da.ones * 1e-3``: no
gradient travels over the network), run Adam and write the new chunks straight into the
store; this process merges their sessions and commits once per step.

For each step: wall time, store throughput (parameters and state read + written, per
second), the commit's own time, and what landed in storage: the objects the step added
(chunks, and the metadata a commit writes: manifests, snapshot, transaction log) and
their bytes, by listing the store before and after. The CPU seconds that the S3 server
process burnt during the step are recorded too: on this machine the server shares the
cores with the workers.

    python benchmarks/bench_outofcore_cluster.py          # 1.2 GB; 1, 2, 4 workers x 1, 4, 16 MiB
    python benchmarks/bench_outofcore_cluster.py --quick  # a small smoke run

Prints a table and writes JSON (``--json``, default ``benchmarks/results/outofcore_cluster.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import distributed
import numpy as np

import xpoptim

ROOT = Path(__file__).resolve().parent.parent
#: Columns of every parameter (float32): a row is 4 KiB, a 1 MiB chunk 256 rows.
COLUMNS = 1024
#: Parameters of the store (equal sizes): a few layers rather than one array.
PARAMS = 4
ROW_BYTES = COLUMNS * 4


def layout(size_bytes: int, chunk_mib: list[int]) -> tuple[int, dict[str, tuple[int, int]]]:
    """Rows per parameter (a multiple of every chunk's rows) and the parameters' shapes,
    for an Adam store (parameters and two state buffers) of about ``size_bytes``."""
    unit = max(chunk_mib) * 2**20 // ROW_BYTES
    rows = max(unit, round(size_bytes / 3 / PARAMS / ROW_BYTES / unit) * unit)
    return rows, {f"layer{i}.weights": (rows, COLUMNS) for i in range(PARAMS)}


@contextlib.contextmanager
def s3_server() -> Iterator[Any]:
    """The tests' moto S3 server (``tests/s3server.py``), or SystemExit with its reason."""
    sys.path.insert(0, str(ROOT / "tests"))
    import pytest

    from s3server import running_server

    try:
        with running_server() as server:
            yield server
    except pytest.skip.Exception as exc:
        raise SystemExit(f"the S3 server cannot run here: {exc}") from None


@contextlib.contextmanager
def clusters(counts: list[int]) -> Iterator[dict[int, Any]]:
    """One LocalCluster (and client) per worker count, all started before any timing."""
    with contextlib.ExitStack() as stack:
        out = {}
        for n in counts:
            cluster = stack.enter_context(
                distributed.LocalCluster(
                    host="127.0.0.1",
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",  # no dashboard; a free port for the HTTP server
                    scheduler_kwargs={"dashboard": False},
                )
            )
            out[n] = stack.enter_context(distributed.Client(cluster, set_as_default=False))
            out[n].wait_for_workers(n, timeout=120)
        yield out


def listing(target: str, where: str, server: Any) -> dict[str, int]:
    """Key -> size of every object of the store (S3) or file (local)."""
    if target == "s3":
        bucket, prefix = where.removeprefix("s3://").split("/", 1)
        return dict(server.objects(bucket, prefix + "/"))
    root = Path(where)
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def added(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """What a step added to storage: objects and bytes, chunks and commit metadata apart."""
    new = {k: s for k, s in after.items() if before.get(k) != s or k not in before}
    chunks = {k: s for k, s in new.items() if "chunks/" in k}
    meta = {k: s for k, s in new.items() if k not in chunks}
    return {
        "objects_written": len(new),
        "bytes_written": sum(new.values()),
        "chunk_objects": len(chunks),
        "chunk_bytes": sum(chunks.values()),
        "metadata_objects": len(meta),
        "metadata_bytes": sum(meta.values()),
        "stored_bytes_after": sum(after.values()),
    }


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` and its children so far (0: none)."""
    if pid is None:
        return 0.0
    import psutil

    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def measure(
    target: str,
    where: str,
    options: dict[str, Any],
    clients: dict[int, Any],
    shapes: dict[str, tuple[int, int]],
    chunk_mib: int,
    steps: int,
    server: Any = None,
) -> list[dict[str, Any]]:
    """Create a store at ``where`` and time ``steps`` steps on each client's cluster."""
    chunk_rows = chunk_mib * 2**20 // ROW_BYTES
    chunks = (chunk_rows, COLUMNS)
    params = {n: da.full(s, 0.5, dtype="f4", chunks=chunks) for n, s in shapes.items()}
    biggest = clients[max(clients)]
    start = time.perf_counter()
    store = xpoptim.OutOfCore.create(
        where,
        xpoptim.Adam(learning_rate=1e-3),
        params,
        chunks=chunks,
        client=biggest,
        overwrite=True,
        progress=False,
        **options,
    )
    create_s = time.perf_counter() - start
    server_pid = server.process.pid if server is not None else None
    rows = []
    for workers, client in sorted(clients.items()):
        for _ in range(steps):
            grads = {
                n: da.ones(s, dtype="f4", chunks=chunks) * np.float32(1e-3)
                for n, s in shapes.items()
            }
            before = listing(target, where, server)
            cpu0 = cpu_seconds(server_pid)
            summary = store.step(grads, client=client, progress=False)
            server_cpu = cpu_seconds(server_pid) - cpu0
            written = added(before, listing(target, where, server))
            rows.append(
                {
                    "target": target,
                    "workers": workers,
                    "chunk_mib": chunk_mib,
                    "param_chunks": sum(-(-s[0] // chunk_rows) for s in shapes.values()),
                    "step": summary.step,
                    "step_s": round(summary.elapsed_s, 3),
                    "gb_per_s": round(summary.gb_per_s, 3),
                    "commit_s": round(summary.flush_s, 3),
                    "bytes_read": summary.bytes_read,
                    "bytes_gradient": summary.bytes_gradient,
                    "s3_server_cpu_s": round(server_cpu, 2) if server is not None else None,
                    "create_s": round(create_s, 2),
                    **written,
                }
            )
            print(row_text(rows[-1]), flush=True)
    return rows


def row_text(r: dict[str, Any]) -> str:
    server = f"{r['s3_server_cpu_s']:.1f}" if r["s3_server_cpu_s"] is not None else "-"
    return (
        f"| {r['target']} | {r['workers']} | {r['chunk_mib']} | {r['step']} | {r['step_s']:.2f} "
        f"| {r['gb_per_s']:.3f} | {r['commit_s']:.2f} | {r['chunk_objects']} "
        f"| {r['chunk_bytes'] / 1e9:.3f} | {r['metadata_objects']} "
        f"| {r['metadata_bytes'] / 1e6:.2f} | {server} |"
    )


HEADER = (
    "| target | workers | chunk MiB | step | step s | GB/s | commit s | chunk objects "
    "| chunk GB | metadata objects | metadata MB | S3 server CPU s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=1.2, help="store size in GB (params + state)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--chunk-mib", default="1,4,16", help="chunk sizes in MiB")
    parser.add_argument("--targets", default="s3,local", help="s3, local or both")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per configuration")
    parser.add_argument(
        "--dir", default=None, help="where the local stores go (default: a temp dir)"
    )
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/outofcore_cluster.json"))
    parser.add_argument("--quick", action="store_true", help="0.05 GB, 1,2 workers, 1,4 MiB")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.workers, args.chunk_mib = 0.05, "1,2", "1,4"
    counts = [int(w) for w in args.workers.split(",")]
    chunk_mib = [int(c) for c in args.chunk_mib.split(",")]
    targets = args.targets.split(",")
    if not set(targets) <= {"s3", "local"} or min(counts) < 1 or min(chunk_mib) < 1:
        parser.error("--targets takes s3 and/or local; --workers and --chunk-mib positive ints")
    rows_per_param, shapes = layout(int(args.size * 1e9), chunk_mib)
    store_bytes = 3 * PARAMS * rows_per_param * ROW_BYTES
    print(
        f"Adam store: {PARAMS} x ({rows_per_param}, {COLUMNS}) float32 params + 2 state buffers "
        f"= {store_bytes / 1e9:.2f} GB; load average {os.getloadavg()[0]:.2f}; "
        f"{os.cpu_count()} CPUs"
    )
    print(HEADER)
    rows: list[dict[str, Any]] = []
    started = time.time()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(s3_server()) if "s3" in targets else None
        clients = stack.enter_context(clusters(counts))
        local_root = Path(args.dir or stack.enter_context(tempfile.TemporaryDirectory()))
        for target in targets:
            for mib in chunk_mib:
                if target == "s3":
                    bucket = server.new_bucket()
                    where, options = (
                        f"s3://{bucket}/run",
                        {"storage_options": server.storage_options},
                    )
                else:
                    where = str(local_root / f"store-{mib}mib")
                    options = {"engine": "icechunk"}
                rows += measure(target, where, options, clients, shapes, mib, args.steps, server)
                # Free the space (moto keeps small objects in memory) before the next store.
                if target == "s3":
                    s3 = server.client()
                    keys = list(server.objects(bucket))
                    for i in range(0, len(keys), 1000):
                        s3.delete_objects(
                            Bucket=bucket,
                            Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]},
                        )
                else:
                    shutil.rmtree(where)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_outofcore_cluster.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        },
        "versions": {
            "xpoptim": xpoptim.__version__,
            "dask": dask.__version__,
            "distributed": distributed.__version__,
            "icechunk": __import__("icechunk").__version__,
            "zarr": __import__("zarr").__version__,
        },
        "store": {
            "optimizer": "Adam",
            "params": {n: list(s) for n, s in shapes.items()},
            "dtype": "float32",
            "bytes": store_bytes,
        },
        "elapsed_s": round(time.time() - started, 1),
        "rows": rows,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
