"""Time one Adam step on a CUDA GPU: xpoptim's compiled CuPy kernel against torch.optim.

Cases (float32): one tensor of 1e8 elements. Implementations, measured side by side with
CUDA events after a warm-up: ``xpoptim compiled`` (one ElementwiseKernel launch generated
from the rule), ``xpoptim plain`` (CuPy, one kernel per operation), ``torch fused`` and
``torch foreach`` (torch.optim on CUDA). Exits 0 with the reason where there is no GPU.

Run ``nox -s bench_gpu`` on a machine with a CUDA device.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import xpoptim

ROOT = Path(__file__).resolve().parent.parent
HYPER = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}


def cuda_time_ms(step: Any, repeats: int = 20) -> float:
    import cupy

    step()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def main(n: int = 100_000_000) -> dict[str, Any]:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as exc:  # ImportError, CUDARuntimeError
        print(f"no GPU benchmark: {exc}")
        return {}
    rng = cupy.random.default_rng(0)
    p = rng.standard_normal(n, dtype=cupy.float32)
    g = rng.standard_normal(n, dtype=cupy.float32) * cupy.float32(0.01)
    rows: dict[str, float] = {}
    for how, options in (("xpoptim compiled", {}), ("xpoptim plain", {"compile": False})):
        opt = xpoptim.Adam(**HYPER, regularization=None)
        params = {"w": p.copy()}
        box = [opt.init(params)]

        def step(opt: Any = opt, params: Any = params, box: Any = box, options: Any = options):
            with xpoptim.execution_options(**options):
                _, box[0] = opt.update(params, {"w": g}, box[0])

        rows[how] = cuda_time_ms(step)
        print(how, xpoptim.explain()["w"])
    try:
        import torch

        for flag in ("fused", "foreach"):
            t = torch.nn.Parameter(torch.as_tensor(p.copy(), device="cuda"))
            t.grad = torch.as_tensor(g, device="cuda")
            topt = torch.optim.Adam(
                [t], lr=HYPER["learning_rate"], betas=(0.9, 0.999), eps=1e-8, **{flag: True}
            )
            rows[f"torch {flag}"] = cuda_time_ms(topt.step)
    except ImportError as exc:
        print(f"no torch rows: {exc}")
    moved = 7 * 4 * n
    result = {
        "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "elements": n,
        "ms": rows,
        "gbps": {k: moved / v / 1e6 for k, v in rows.items()},
    }
    for name, ms in rows.items():
        print(f"{name:18} {ms:8.2f} ms  {result['gbps'][name]:7.0f} GB/s")
    if "torch fused" in rows:
        ratio = rows["xpoptim compiled"] / rows["torch fused"]
        print(f"xpoptim compiled / torch fused: {ratio:.2f} (goal <= 1.2)")
    out = ROOT / "bench-out" / "bench-gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(int(float(sys.argv[1])) if len(sys.argv) > 1 else 100_000_000)
