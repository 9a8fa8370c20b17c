"""An independent float64 NumPy reimplementation of the optimizers, from the formulas.

Written from the documented update rules (the seed's API page), not from xpoptim's
code: plain float64 NumPy, one function per optimizer, no in-place tricks. Tests
compare xpoptim against this, never against itself.
"""

from __future__ import annotations

import numpy as np

EXCLUDED = ("bias", "beta", "gamma")


def _penalty(name: str, p: np.ndarray, regularization: str | None, wd: float) -> np.ndarray:
    if regularization is None or any(s in name for s in EXCLUDED):
        return np.zeros_like(p)
    return wd * p if regularization == "L2" else wd * np.sign(p)


def run(
    kind: str,
    config: dict,
    params: dict[str, np.ndarray],
    grads_per_step: list[dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Apply ``len(grads_per_step)`` steps; return (params, state) in float64.

    ``state`` maps the seed's buffer names (``velocities``, ``cache``, ``momentums``)
    to ``{name: array}``.
    """
    lr = config.get("learning_rate", {"SGD": 0.01}.get(kind, 0.001))
    reg = config.get("regularization", "L2")
    wd = config.get("weight_decay", 0.001)
    p = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    zeros = {k: np.zeros_like(v) for k, v in p.items()}
    if kind == "SGD":
        mu = config.get("momentum", 0.1)
        vel = dict(zeros)
        for grads in grads_per_step:
            for k in p:
                g = np.float64(grads[k]) + _penalty(k, p[k], reg, wd)
                vel[k] = mu * vel[k] - lr * g
                p[k] = p[k] + vel[k]
        return p, {"velocities": vel}
    if kind == "RMSprop":
        rho = config.get("decay_rate", 0.9)
        eps = config.get("epsilon", 1e-8)
        cache = dict(zeros)
        for grads in grads_per_step:
            for k in p:
                g = np.float64(grads[k]) + _penalty(k, p[k], reg, wd)
                cache[k] = rho * cache[k] + (1 - rho) * g**2
                p[k] = p[k] - lr * g / (np.sqrt(cache[k]) + eps)
        return p, {"cache": cache}
    if kind == "Adam":
        b1 = config.get("beta1", 0.9)
        b2 = config.get("beta2", 0.999)
        eps = config.get("epsilon", 1e-8)
        m, v = dict(zeros), dict(zeros)
        for t, grads in enumerate(grads_per_step, start=1):
            for k in p:
                g = np.float64(grads[k])
                if reg == "L1":
                    g = g + _penalty(k, p[k], reg, wd)
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g**2
                m_hat = m[k] / (1 - b1**t)
                v_hat = v[k] / (1 - b2**t)
                p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
                if reg == "L2":
                    p[k] = p[k] - lr * _penalty(k, p[k], reg, wd)
        return p, {"momentums": m, "velocities": v}
    raise ValueError(kind)
