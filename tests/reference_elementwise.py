"""An independent float64 NumPy reimplementation of the elementwise optimizers of issue 11.

Written from the papers' and the peers' documented update rules (torch.optim's
algorithm boxes, optax's docstrings), not from xpoptim's code: plain float64 NumPy, one
function per optimizer, a loop over steps, no in-place tricks. Tests compare xpoptim
against this (and against the peers themselves), never against itself.

``run(kind, config, params, grads_per_step)`` returns ``(params, state)`` with the
state keyed by xpoptim's field names. ``config`` holds xpoptim's constructor arguments;
missing ones take xpoptim's documented defaults (written out again here).
"""

from __future__ import annotations

import math

import numpy as np

from reference import EXCLUDED, excluded

DEFAULTS = {
    "Adagrad": {
        "learning_rate": 0.01,
        "weight_decay": 0.0,
        "learning_rate_decay": 0.0,
        "initial_accumulator_value": 0.0,
        "epsilon": 1e-10,
    },
    "Adadelta": {"learning_rate": 1.0, "weight_decay": 0.0, "decay_rate": 0.9, "epsilon": 1e-6},
    "Adamax": {
        "learning_rate": 0.002,
        "weight_decay": 0.0,
        "beta1": 0.9,
        "beta2": 0.999,
        "epsilon": 1e-8,
    },
    "NAdam": {
        "learning_rate": 0.002,
        "weight_decay": 0.0,
        "beta1": 0.9,
        "beta2": 0.999,
        "epsilon": 1e-8,
        "momentum_decay": 0.004,
        "decoupled": False,
    },
    "RAdam": {
        "learning_rate": 0.001,
        "weight_decay": 0.0,
        "beta1": 0.9,
        "beta2": 0.999,
        "epsilon": 1e-8,
        "decoupled": False,
    },
    "Rprop": {
        "learning_rate": 0.01,
        "weight_decay": 0.0,
        "eta_minus": 0.5,
        "eta_plus": 1.2,
        "step_size_min": 1e-6,
        "step_size_max": 50.0,
    },
    "Lion": {"learning_rate": 1e-4, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.99},
    "ScheduleFreeAdamW": {
        "learning_rate": 0.0025,
        "weight_decay": 0.0,
        "beta1": 0.9,
        "beta2": 0.999,
        "epsilon": 1e-8,
        "weight_lr_power": 2.0,
    },
}


def run(kind, config, params, grads_per_step):
    c = {**DEFAULTS[kind], **config}
    no_decay = c.get("no_decay", EXCLUDED)
    base_lr = c["learning_rate"]

    def lr_at(t):  # update t (from 1) sees the schedule after t - 1 updates
        return float(base_lr(t - 1)) if callable(base_lr) else float(base_lr)

    p = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    wd = {k: 0.0 if excluded(k, no_decay) else c["weight_decay"] for k in p}
    state = STATE_INIT[kind](c, p)
    for t, grads in enumerate(grads_per_step, start=1):
        scalars = STEP_SCALARS[kind](c, t, lr_at) if kind in STEP_SCALARS else {}
        for k in p:
            g = np.array(grads[k], dtype=np.float64)
            buffers = {f: state[f][k] for f in state}
            p[k], new = UPDATES[kind](c, t, lr_at(t), wd[k], p[k], g, buffers, scalars)
            for f, value in new.items():
                state[f][k] = value
    return p, state


def _zeros(p, *fields):
    return {f: {k: np.zeros_like(v) for k, v in p.items()} for f in fields}


STATE_INIT = {
    "Adagrad": lambda c, p: {
        "accumulators": {k: np.full_like(v, c["initial_accumulator_value"]) for k, v in p.items()}
    },
    "Adadelta": lambda c, p: _zeros(p, "square_avg", "delta_avg"),
    "Adamax": lambda c, p: _zeros(p, "momentums", "norms"),
    "NAdam": lambda c, p: _zeros(p, "momentums", "velocities"),
    "RAdam": lambda c, p: _zeros(p, "momentums", "velocities"),
    "Rprop": lambda c, p: {
        "previous": {k: np.zeros_like(v) for k, v in p.items()},
        "step_sizes": {k: np.full_like(v, c["learning_rate"]) for k, v in p.items()},
    },
    "Lion": lambda c, p: _zeros(p, "momentums"),
    "ScheduleFreeAdamW": lambda c, p: {
        "z": {k: v.copy() for k, v in p.items()},
        "velocities": {k: np.zeros_like(v) for k, v in p.items()},
    },
}


def _nadam_scalars(c, t, lr_at):
    def mu(i):
        return c["beta1"] * (1 - 0.5 * 0.96 ** (i * c["momentum_decay"]))

    return {"mu": mu(t), "mu_next": mu(t + 1), "product": math.prod(mu(i) for i in range(1, t + 1))}


def _schedule_free_scalars(c, t, lr_at):
    weights = []
    top = 0.0
    for i in range(1, t + 1):
        top = max(top, lr_at(i))
        weights.append(top ** c["weight_lr_power"])
    total = sum(weights)
    return {"c": weights[-1] / total if total > 0 else 0.0}


STEP_SCALARS = {"NAdam": _nadam_scalars, "ScheduleFreeAdamW": _schedule_free_scalars}


def _adagrad(c, t, lr, wd, w, g, s, _):
    g = g + wd * w
    acc = s["accumulators"] + g**2
    clr = lr / (1 + (t - 1) * c["learning_rate_decay"])
    return w - clr * g / (np.sqrt(acc) + c["epsilon"]), {"accumulators": acc}


def _adadelta(c, t, lr, wd, w, g, s, _):
    rho, eps = c["decay_rate"], c["epsilon"]
    g = g + wd * w
    a = rho * s["square_avg"] + (1 - rho) * g**2
    d = np.sqrt(s["delta_avg"] + eps) / np.sqrt(a + eps) * g
    b = rho * s["delta_avg"] + (1 - rho) * d**2
    return w - lr * d, {"square_avg": a, "delta_avg": b}


def _adamax(c, t, lr, wd, w, g, s, _):
    b1, b2 = c["beta1"], c["beta2"]
    g = g + wd * w
    m = b1 * s["momentums"] + (1 - b1) * g
    u = np.maximum(b2 * s["norms"], np.abs(g) + c["epsilon"])
    return w - lr / (1 - b1**t) * m / u, {"momentums": m, "norms": u}


def _decays(c, lr, wd, w, g):
    if c["decoupled"]:
        return w * (1 - lr * wd), g
    return w, g + wd * w


def _nadam(c, t, lr, wd, w, g, s, k):
    b1, b2 = c["beta1"], c["beta2"]
    w, g = _decays(c, lr, wd, w, g)
    m = b1 * s["momentums"] + (1 - b1) * g
    v = b2 * s["velocities"] + (1 - b2) * g**2
    d = np.sqrt(v / (1 - b2**t)) + c["epsilon"]
    mu, mu_next, prod = k["mu"], k["mu_next"], k["product"]
    w = w - lr * (1 - mu) / (1 - prod) * g / d - lr * mu_next / (1 - prod * mu_next) * m / d
    return w, {"momentums": m, "velocities": v}


def _radam(c, t, lr, wd, w, g, s, _):
    b1, b2 = c["beta1"], c["beta2"]
    w, g = _decays(c, lr, wd, w, g)
    m = b1 * s["momentums"] + (1 - b1) * g
    v = b2 * s["velocities"] + (1 - b2) * g**2
    m_hat = m / (1 - b1**t)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho_t > 5:
        r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        w = w - lr * m_hat * r * math.sqrt(1 - b2**t) / (np.sqrt(v) + c["epsilon"])
    else:
        w = w - lr * m_hat
    return w, {"momentums": m, "velocities": v}


def _rprop(c, t, lr, wd, w, g, s, _):
    g = g + wd * w
    product = g * s["previous"]
    size = s["step_sizes"].copy()
    size[product > 0] = np.minimum(size[product > 0] * c["eta_plus"], c["step_size_max"])
    size[product < 0] = np.maximum(size[product < 0] * c["eta_minus"], c["step_size_min"])
    g = np.where(product < 0, 0.0, g)
    return w - np.sign(g) * size, {"previous": g, "step_sizes": size}


def _lion(c, t, lr, wd, w, g, s, _):
    b1, b2 = c["beta1"], c["beta2"]
    u = np.sign(b1 * s["momentums"] + (1 - b1) * g)
    w = w - lr * (u + wd * w)
    return w, {"momentums": b2 * s["momentums"] + (1 - b2) * g}


def _schedule_free(c, t, lr, wd, y, g, s, k):
    b1, b2 = c["beta1"], c["beta2"]
    v = b2 * s["velocities"] + (1 - b2) * g**2
    u = g / (np.sqrt(v / (1 - b2**t)) + c["epsilon"]) + wd * y
    x = (y - (1 - b1) * s["z"]) / b1
    z = s["z"] - lr * u
    x = (1 - k["c"]) * x + k["c"] * z
    return b1 * x + (1 - b1) * z, {"z": z, "velocities": v}


UPDATES = {
    "Adagrad": _adagrad,
    "Adadelta": _adadelta,
    "Adamax": _adamax,
    "NAdam": _nadam,
    "RAdam": _radam,
    "Rprop": _rprop,
    "Lion": _lion,
    "ScheduleFreeAdamW": _schedule_free,
}


def average(config, params, state):
    """Schedule-free's evaluation point ``x = (y - (1 - beta1) z) / beta1``."""
    b1 = {**DEFAULTS["ScheduleFreeAdamW"], **config}["beta1"]
    return {k: (np.float64(y) - (1 - b1) * state["z"][k]) / b1 for k, y in params.items()}
