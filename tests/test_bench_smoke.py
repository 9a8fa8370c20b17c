"""The benchmark runs end to end at tiny sizes, so that its code cannot rot.

No timing is asserted: only that every (case, optimizer, implementation) is measured or
says why it cannot be, and that the table, the JSON and the plot are written.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import selected_backends

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_step.py"

# The benchmark is NumPy code with optional peers: run it once, in the NumPy session.
pytestmark = pytest.mark.skipif(
    "numpy" not in selected_backends(), reason="benchmark smoke run: in the numpy session"
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_step"]


@pytest.mark.slow
def test_benchmark_smoke_run(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    result = bench.main(
        [
            *("--big", "3000", "--small-count", "6", "--small-total", "600"),
            *("--repeats", "2", "--json", str(out), "--plot", str(png), "--quick"),
        ]
    )
    printed = capsys.readouterr().out
    assert "| case | optimizer | implementation |" in printed
    assert "xpoptim time / peer time" in printed
    assert "CPU time (all threads)" in printed
    saved = json.loads(out.read_text())
    assert saved["sizes"] == {"big": 3000, "small": [6, 600]}
    rows = {(r["case"], r["optimizer"], r["impl"]): r for r in saved["rows"]}
    assert len(rows) == 3 * len(bench.OPTIMIZERS) * len(bench.IMPLS)
    for key, row in rows.items():
        if "unavailable" in row:
            assert not key[2].startswith(("xpoptim u", "xpoptim s", "xpoptim 1", "numpy")), row
            assert row["unavailable"]
        else:
            assert len(row["times_ms"]) == 2
            assert row["median_ms"] > 0
            assert row["gbps"] > 0
            assert row["fraction_of_bandwidth"] > 0
            assert row["cpu_ms"] >= 0
        assert "numpy copy" in row["bandwidth_gbps"]
    measured = {key for key, row in rows.items() if "unavailable" not in row}
    assert {(e["case"], e["optimizer"], e["impl"]) for e in result["ratios"]} == {
        (case, kind, impl)
        for case in ("big", "small", "mlp")
        for kind in bench.OPTIMIZERS
        for impl in bench.XPOPTIM
        if (case, kind, impl) in measured
    }
    assert "first step in a fresh process" in printed
    for seconds in saved["compile"].values():
        assert seconds["cold first step"] > 0
        assert seconds["warm kernels"] <= seconds["cold kernels"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 1000


def test_benchmark_rejects_unknown_names(bench):
    with pytest.raises(SystemExit):
        bench.main(["--optimizers", "NoSuchOptimizer", "--no-plot"])


@pytest.mark.slow
def test_benchmark_rows_of_the_new_elementwise_optimizers(bench, tmp_path):
    """``--optimizers`` takes each elementwise optimizer of issue 11; xpoptim's rows are
    measured and torch's are measured exactly where torch.optim has the optimizer."""
    out = tmp_path / "bench.json"
    result = bench.main(
        [
            *("--optimizers", ",".join(bench.CATALOGUE), "--cases", "mlp"),
            *("--impls", "xpoptim update,xpoptim step,torch foreach,optax jit"),
            *("--repeats", "1", "--json", str(out), "--quick", "--no-plot", "--no-compile-times"),
        ]
    )
    rows = {(r["optimizer"], r["impl"]): r for r in result["rows"]}
    assert {kind for kind, _ in rows} == set(bench.CATALOGUE)
    torch = None
    if importlib.util.find_spec("torch") is not None:
        import torch
    for (kind, impl), row in rows.items():
        if impl.startswith("xpoptim"):
            assert row["median_ms"] > 0, (kind, impl)
        elif impl == "torch foreach" and torch is not None:
            has = hasattr(torch.optim, kind)
            assert ("unavailable" in row) != has, (kind, row)
            assert kind not in ("Lion", "ScheduleFreeAdamW") or not has
