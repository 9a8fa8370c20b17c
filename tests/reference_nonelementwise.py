"""Independent float64 NumPy reimplementations of LAMB, LARS, Adafactor and Muon.

Written from the formulas of the papers and of the peers' documentation (optax's
``lamb``/``lars``, torch.optim's ``Adafactor``/``Muon``), not from xpoptim's code: plain
float64 NumPy on one parameter at a time, no in-place tricks. Decay follows
``no_decay`` (``reference.excluded``). Each ``run_*`` applies ``len(grads)`` steps and
returns ``(params, state)``.
"""

from __future__ import annotations

import math

import numpy as np

from reference import EXCLUDED, excluded


def _f64(params):
    return {k: np.array(v, dtype=np.float64) for k, v in params.items()}


def _lr(learning_rate, t):
    """The learning rate of step ``t`` (from 1): a schedule sees ``t - 1``."""
    return float(learning_rate(t - 1)) if callable(learning_rate) else learning_rate


def _trust(p, r, coefficient, eps):
    pn, rn = np.linalg.norm(p.ravel()), np.linalg.norm(r.ravel())
    if pn == 0.0 or rn == 0.0:
        return 1.0
    return coefficient * pn / (rn + eps)


def run_lamb(config, params, grads):
    lr = config.get("learning_rate", 0.001)
    wd = config.get("weight_decay", 0.0)
    b1, b2 = config.get("beta1", 0.9), config.get("beta2", 0.999)
    eps = config.get("epsilon", 1e-6)
    no_decay = config.get("no_decay", EXCLUDED)
    w = _f64(params)
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for t, g in enumerate(grads, start=1):
        for k in w:
            gk = np.asarray(g[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            r = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            if not excluded(k, no_decay):
                r = r + wd * w[k]
            w[k] = w[k] - _lr(lr, t) * _trust(w[k], r, 1.0, 0.0) * r
    return w, {"momentums": m, "velocities": v}


def run_lars(config, params, grads):
    lr = config.get("learning_rate", 1.0)
    wd = config.get("weight_decay", 0.0)
    mu = config.get("momentum", 0.9)
    tc = config.get("trust_coefficient", 0.001)
    eps = config.get("epsilon", 0.0)
    nesterov = config.get("nesterov", False)
    no_decay = config.get("no_decay", EXCLUDED)
    w = _f64(params)
    vel = {k: np.zeros_like(x) for k, x in w.items()}
    for t, g in enumerate(grads, start=1):
        for k in w:
            r = np.asarray(g[k], np.float64)
            if not excluded(k, no_decay):
                r = r + wd * w[k]
            u = -_lr(lr, t) * _trust(w[k], r, tc, eps) * r
            vel[k] = mu * vel[k] + u
            w[k] = w[k] + (mu * vel[k] + u if nesterov else vel[k])
    return w, {"velocities": vel}


def _rms(x):
    return math.sqrt(float(np.mean(np.square(x)))) if x.size else 0.0


def run_adafactor(config, params, grads):
    lr = config.get("learning_rate", 0.01)
    decay = config.get("beta2_decay", -0.8)
    eps1 = config.get("epsilon")
    eps2 = config.get("min_scale", 1e-3)
    d = config.get("clipping_threshold", 1.0)
    wd = config.get("weight_decay", 0.0)
    no_decay = config.get("no_decay", EXCLUDED)
    w = _f64(params)
    eps1 = np.finfo(np.dtype(next(iter(params.values())).dtype)).eps if eps1 is None else eps1
    row = {k: np.zeros(x.shape[:-1]) for k, x in w.items() if x.ndim >= 2}
    col = {k: np.zeros(x.shape[:-2] + x.shape[-1:]) for k, x in w.items() if x.ndim >= 2}
    var = {k: np.zeros_like(x) for k, x in w.items() if x.ndim < 2}
    for t, g in enumerate(grads, start=1):
        lr_t = _lr(lr, t)
        beta2_t = 1.0 - t**decay
        rho = min(lr_t, 1.0 / math.sqrt(t))
        for k in w:
            gk = np.asarray(g[k], np.float64)
            alpha = max(eps2, _rms(w[k])) * rho
            if not excluded(k, no_decay):
                w[k] = w[k] * (1.0 - lr_t * wd)
            if w[k].ndim >= 2:
                n_rows, n_cols = gk.shape[-2:]
                row[k] = beta2_t * row[k] + (1 - beta2_t) * (gk**2).sum(axis=-1) / n_cols
                col[k] = beta2_t * col[k] + (1 - beta2_t) * (gk**2).sum(axis=-2) / n_rows
                # V[..., i, j] = R[..., i] C[..., j] / max(mean_i R[..., i], eps1)
                outer = np.einsum("...i,...j->...ij", row[k], col[k])
                scale = np.maximum(row[k].mean(axis=-1), eps1)[..., None, None]
                estimate = outer / scale
            else:
                var[k] = beta2_t * var[k] + (1 - beta2_t) * gk**2
                estimate = var[k]
            u = gk / np.sqrt(np.maximum(estimate, eps1**2))
            w[k] = w[k] - alpha / max(1.0, _rms(u) / d) * u
    state = {
        "row_var": {k: r[..., None] for k, r in row.items()},
        "col_var": {k: c[..., None, :] for k, c in col.items()},
        "variance": var,
    }
    return w, state


def newton_schulz(x, coefficients=(3.4445, -4.775, 2.0315), steps=5, eps=1e-7):
    """Keller Jordan's quintic iteration on a float64 matrix."""
    a, b, c = coefficients
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / max(np.linalg.norm(y, "fro"), eps)
    for _ in range(steps):
        gram = y @ y.T
        y = a * y + b * (gram @ y) + c * (gram @ (gram @ y))
    return y.T if tall else y


def run_muon(config, params, grads):
    lr = config.get("learning_rate", 0.001)
    wd = config.get("weight_decay", 0.0)
    mu = config.get("momentum", 0.95)
    nesterov = config.get("nesterov", True)
    coefficients = tuple(config.get("ns_coefficients", (3.4445, -4.775, 2.0315)))
    steps = config.get("ns_steps", 5)
    eps = config.get("epsilon", 1e-7)
    adjust = config.get("adjust_lr", "original")
    b1, b2 = config.get("adam_beta1", 0.9), config.get("adam_beta2", 0.999)
    adam_eps = config.get("adam_epsilon", 1e-8)
    no_decay = config.get("no_decay", EXCLUDED)
    w = _f64(params)
    m = {k: np.zeros_like(x) for k, x in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items() if x.ndim != 2}
    for t, g in enumerate(grads, start=1):
        lr_t = _lr(lr, t)
        for k in w:
            gk = np.asarray(g[k], np.float64)
            decay = 0.0 if excluded(k, no_decay) else wd
            if w[k].ndim == 2:
                m[k] = mu * m[k] + (1 - mu) * gk
                u = (1 - mu) * gk + mu * m[k] if nesterov else m[k]
                o = newton_schulz(u, coefficients, steps, eps)
                rows, cols = w[k].shape
                s = 0.2 * math.sqrt(max(rows, cols)) if adjust == "match_rms_adamw" else None
                s = math.sqrt(max(1.0, rows / cols)) if s is None else s
                w[k] = w[k] * (1 - lr_t * decay) - lr_t * s * o
            else:  # AdamW, torch's form
                m[k] = b1 * m[k] + (1 - b1) * gk
                v[k] = b2 * v[k] + (1 - b2) * gk**2
                m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
                w[k] = w[k] * (1 - lr_t * decay) - lr_t * m_hat / (np.sqrt(v_hat) + adam_eps)
    return w, {"momentums": m, "velocities": v}


RUNS = {"LAMB": run_lamb, "LARS": run_lars, "Adafactor": run_adafactor, "Muon": run_muon}


def run(kind, config, params, grads):
    """``RUNS[kind](config, params, grads)``."""
    return RUNS[kind](config, params, grads)
