"""The larger-than-memory benchmark (benchmarks/bench_outofcore_large.py) at a tiny size.

It runs as its own process, as a user runs it: its memory cap (RLIMIT_AS) applies to
that process only. The full-size run (25 GiB) is ``nox -s bench_large``, never here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dask.array", reason="the out-of-core store needs dask (.[dask])")
pytest.importorskip("zarr", reason="the out-of-core store needs zarr (.[dask])")

import xpoptim

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_outofcore_large.py"
TINY = ["--size", "3MB", "--chunk-size", "256KiB", "--disk-test-size", "8MiB", "--samples", "2"]


def has_icechunk() -> bool:
    try:
        import icechunk  # noqa: F401
    except ImportError:
        return False
    return True


ENGINES = [
    "directory",
    pytest.param(
        "icechunk",
        marks=pytest.mark.skipif(not has_icechunk(), reason="needs icechunk (.[icechunk])"),
    ),
]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XPOPTIM_")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dir", str(tmp_path / "bench"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_a_tiny_run_reports_every_figure_and_deletes_its_store(tmp_path, engine):
    out = tmp_path / "result.json"
    run = bench(tmp_path, *TINY, "--engine", engine, "--json", str(out))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["engine"] == engine
    data = result["params_plus_state_bytes"]
    assert data == 3 * result["param_bytes"] >= 3_000_000  # Adam: params, m, v
    assert [s["step"] for s in result["steps"]] == [1, 2]
    for step in result["steps"]:
        # Every step reads and writes params + state once; the gradient is generated.
        assert step["bytes_read"] == step["bytes_written"] == data
        assert step["bytes_gradient_generated"] == result["param_bytes"]
        assert step["wall_s"] > 0
        durable_s = step["wall_s"] + step["sync_after_s"]
        assert step["gb_per_s"] == pytest.approx(2 * data / durable_s / 1e9)
        assert step["disk_used_bytes"] >= data  # the committed version, on disk
        assert 0 < step["peak_rss_bytes"] <= result["memory_cap"]["bytes"]
        assert step["ratio_to_disk"] > 0
        assert step["cpu_s"] > 0
        assert step["peak_growth_on_disk_bytes"] >= 0
    assert result["verified_chunks"] == 2
    for when in ("disk_before", "disk_after"):
        assert result[when]["write_fsync_gb_per_s"] > 0
        assert result[when]["read_after_dontneed_gb_per_s"] > 0
    assert result["memory_cap"]["bytes"] == 2 * 2**30
    assert result["store_deleted"]
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == []  # store, test file gone
    assert "steps" in run.stdout
    assert "GB/s" in run.stdout


@pytest.mark.parametrize("engine", ENGINES)
def test_keep_leaves_a_store_of_params_and_state_only(tmp_path, engine):
    out = tmp_path / "r.json"
    run = bench(tmp_path, *TINY, "--engine", engine, "--samples", "0", "--keep", "--json", str(out))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    directory = tmp_path / "bench" / f"store-{engine}"
    store = xpoptim.OutOfCore.open(directory)
    assert store.engine == engine
    assert store.step_count == 2
    params, state = store.arrays()
    assert sorted(params) == sorted(result["params"])
    assert state.step == 2
    # No gradient on disk: the store holds one version of the parameters and Adam's
    # state (a stored gradient would add a third of that).
    data, used = result["params_plus_state_bytes"], result["steps"][-1]["disk_used_bytes"]
    assert data <= used < data + result["param_bytes"] / 2
    if engine == "directory":
        version = directory / store.version
        fields = sorted(["params", *store.optimizer._buffer_fields()])
        assert sorted(p.name for p in version.iterdir() if p.is_dir()) == fields


def test_it_refuses_without_enough_free_space_and_writes_nothing(tmp_path):
    run = bench(tmp_path, "--size", "1000TB", "--json", str(tmp_path / "r.json"))
    assert run.returncode != 0
    assert "not enough free space" in run.stderr
    assert "Nothing was written" in run.stderr
    assert not (tmp_path / "bench").exists()
    assert not (tmp_path / "r.json").exists()


def test_it_refuses_a_store_left_behind(tmp_path):
    (tmp_path / "bench" / "store-directory").mkdir(parents=True)
    run = bench(tmp_path, *TINY)
    assert run.returncode != 0
    assert "exists" in run.stderr
    assert "delete it first" in run.stderr
