"""An independent float64 NumPy reimplementation of the optimizers, from the formulas.

Written from the documented update rules (the seed's API page), not from xpoptim's
code: plain float64 NumPy, one function per optimizer, no in-place tricks. Tests
compare xpoptim against this, never against itself.
"""

from __future__ import annotations

import fnmatch
import math

import numpy as np

EXCLUDED = ("bias", "beta", "gamma")


def excluded(name: str, no_decay=EXCLUDED) -> bool:
    """Whether ``name`` is excluded from decay: a predicate, or patterns (a glob when it
    has a wildcard, else a substring)."""
    if callable(no_decay):
        return bool(no_decay(name))
    for pattern in no_decay:
        if any(c in pattern for c in "*?["):
            if fnmatch.fnmatchcase(name, pattern):
                return True
        elif pattern in name:
            return True
    return False


def _penalty(
    name: str, p: np.ndarray, regularization: str | None, wd: float, no_decay=EXCLUDED
) -> np.ndarray:
    if regularization is None or excluded(name, no_decay):
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
    # ``learning_rate`` may be a callable of the number of updates already applied
    # (a reference schedule from this file).
    base_lr = config.get("learning_rate", {"SGD": 0.01}.get(kind, 0.001))

    def lr_at(t: int) -> float:
        return float(base_lr(t - 1)) if callable(base_lr) else base_lr

    reg = config.get("regularization", "L2")
    wd = config.get("weight_decay", {"AdamW": 0.01}.get(kind, 0.001))
    no_decay = config.get("no_decay", EXCLUDED)
    p = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    zeros = {k: np.zeros_like(v) for k, v in p.items()}
    if kind == "SGD":
        mu = config.get("momentum", 0.1)
        nesterov = config.get("nesterov", False)
        vel = dict(zeros)
        for t, grads in enumerate(grads_per_step, start=1):
            lr = lr_at(t)
            for k in p:
                g = np.float64(grads[k]) + _penalty(k, p[k], reg, wd, no_decay)
                vel[k] = mu * vel[k] - lr * g
                if nesterov:
                    # Look ahead: the step is the velocity applied once more, plus -lr*g.
                    p[k] = p[k] + mu * vel[k] - lr * g
                else:
                    p[k] = p[k] + vel[k]
        return p, {"velocities": vel}
    if kind == "RMSprop":
        rho = config.get("decay_rate", 0.9)
        eps = config.get("epsilon", 1e-8)
        centered = config.get("centered", False)
        mom = config.get("momentum", 0.0)
        cache, mean_grad, buf = dict(zeros), dict(zeros), dict(zeros)
        for t, grads in enumerate(grads_per_step, start=1):
            lr = lr_at(t)
            for k in p:
                g = np.float64(grads[k]) + _penalty(k, p[k], reg, wd, no_decay)
                cache[k] = rho * cache[k] + (1 - rho) * g**2
                variance = cache[k]
                if centered:
                    mean_grad[k] = rho * mean_grad[k] + (1 - rho) * g
                    variance = cache[k] - mean_grad[k] ** 2
                step = g / (np.sqrt(variance) + eps)
                if mom:
                    buf[k] = mom * buf[k] + step
                    step = buf[k]
                p[k] = p[k] - lr * step
        state = {"cache": cache}
        if centered:
            state["mean_grad"] = mean_grad
        if mom:
            state["momentum_buffer"] = buf
        return p, state
    if kind in ("Adam", "AdamW"):
        if kind == "AdamW":
            reg = "L2"
        b1 = config.get("beta1", 0.9)
        b2 = config.get("beta2", 0.999)
        eps = config.get("epsilon", 1e-8)
        amsgrad = config.get("amsgrad", False)
        m, v, v_max = dict(zeros), dict(zeros), dict(zeros)
        for t, grads in enumerate(grads_per_step, start=1):
            lr = lr_at(t)
            for k in p:
                g = np.float64(grads[k])
                if reg == "L1":
                    g = g + _penalty(k, p[k], reg, wd, no_decay)
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g**2
                v_max[k] = np.maximum(v_max[k], v[k])
                m_hat = m[k] / (1 - b1**t)
                v_hat = (v_max[k] if amsgrad else v[k]) / (1 - b2**t)
                p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
                if reg == "L2":
                    p[k] = p[k] - lr * _penalty(k, p[k], reg, wd, no_decay)
        state = {"momentums": m, "velocities": v}
        if amsgrad:
            state["max_velocities"] = v_max
        return p, state
    raise ValueError(kind)


# -- schedules: functions of the number of updates already applied, from their formulas --


def constant(value):
    return lambda count: value


def step_decay(init_value, step_size, gamma=0.1):
    return lambda count: init_value * gamma ** math.floor(count / step_size)


def exponential_decay(init_value, transition_steps, decay_rate, staircase=False):
    def schedule(count):
        e = count / transition_steps
        return init_value * decay_rate ** (math.floor(e) if staircase else e)

    return schedule


def warmup_cosine_decay(init_value, peak_value, warmup_steps, decay_steps, end_value=0.0):
    def schedule(count):
        if count < warmup_steps:
            return init_value + (peak_value - init_value) * count / warmup_steps
        progress = min(count - warmup_steps, decay_steps - warmup_steps) / (
            decay_steps - warmup_steps
        )
        return end_value + (peak_value - end_value) * (1 + math.cos(math.pi * progress)) / 2

    return schedule


def plateau_values(metrics, init_value, factor, patience, threshold=1e-4, cooldown=0, min_value=0):
    """The learning rate after each observed metric (mode "min", relative threshold)."""
    lr, best, bad, cool, out = init_value, math.inf, 0, 0, []
    for x in metrics:
        if x < best * (1 - threshold):
            best, bad = x, 0
        else:
            bad += 1
        if cool > 0:
            cool, bad = cool - 1, 0
        if bad > patience:
            lr, cool, bad = max(lr * factor, min_value), cooldown, 0
        out.append(lr)
    return out


# -- gradient transforms ------------------------------------------------------------------


def clip_value(grads, limit):
    return {k: np.clip(np.float64(g), -limit, limit) for k, g in grads.items()}


def clip_norm(grads, max_norm):
    out = {}
    for k, g in grads.items():
        g = np.float64(g)
        norm = math.sqrt(float(np.sum(g * g)))
        out[k] = g * (max_norm / norm) if norm > max_norm else g
    return out


def clip_global_norm(grads, max_norm):
    gs = {k: np.float64(g) for k, g in grads.items()}
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in gs.values()))
    return {k: g * (max_norm / norm) if norm > max_norm else g for k, g in gs.items()}


def mean_every(grads_per_step, k):
    """The mean gradient of each run of ``k`` consecutive micro-batches."""
    out = []
    for start in range(0, len(grads_per_step) - k + 1, k):
        chunk = grads_per_step[start : start + k]
        out.append({n: sum(np.float64(g[n]) for g in chunk) / k for n in chunk[0]})
    return out
