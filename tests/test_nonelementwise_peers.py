"""LAMB, LARS, Adafactor and Muon against their peers' own trajectories, in float64.

torch.optim's ``Adafactor`` and ``Muon`` (with ``AdamW`` for Muon's non-matrix
parameters) in the ``tests(torch)`` session, optax's ``lamb`` and ``lars`` in the
``tests(jax)`` session: 200 steps on Rosenbrock's function (as a vector, as the rows of
a tall matrix and the columns of a wide one) and on a small MLP, over a grid of
hyperparameters with weight decay.

Each test walks xpoptim's 200-step trajectory and, at every step, lets the peer take the
same step from the same parameters and state (its own buffers overwritten with
xpoptim's): the two must agree to float64 rounding at every step. Free-running
trajectories also agree to rounding at first, but on Rosenbrock's valley and the MLP
the dynamics amplify a 1-ulp difference by up to 1e10 over 200 steps (measured:
differences appear around step 20 to 160 at 1e-14 and grow), so comparing the free runs
at the end would measure the dynamics, not the optimizer. `test_free_runs_agree_at_first`
checks the first 20 free-running steps of each optimizer.

Conventions converted here (documented in the docstrings): the peers decay every
parameter, xpoptim not the names ``no_decay`` selects, so these runs pass
``no_decay=()``; torch's ``eps=(eps1, eps2)`` and ``d`` are ``epsilon``/``min_scale`` and
``clipping_threshold``. torch's Muon runs its Newton-Schulz iteration in bfloat16,
xpoptim in the parameter's dtype: `test_muon_matches_torch_to_bfloat16_per_step` checks
each step from the same point to bfloat16 precision.
"""

from __future__ import annotations

import numpy as np
import pytest

import xpoptim

STEPS = 200


def _like(a, p):
    """The NumPy constant ``a`` as an array of ``p``'s library (torch or JAX)."""
    if hasattr(p, "new_tensor"):  # torch
        return p.new_tensor(a)
    import jax.numpy as jnp

    return jnp.asarray(a)


def _problems():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(16, 3))
    y = rng.normal(size=(16, 2))

    def rosen(a, b):
        return ((1.0 - a) ** 2 + 100.0 * (b - a**2) ** 2).sum()

    return {
        "rosenbrock": (
            {"xy": np.array([-1.5, 1.5])},
            lambda p, tanh: rosen(p["xy"][0], p["xy"][1]),
        ),
        "rosenbrock-rows": (
            {"w": np.array([[-1.5, 1.5], [1.2, -0.5], [0.3, 0.8]])},
            lambda p, tanh: rosen(p["w"][:, 0], p["w"][:, 1]),
        ),
        "rosenbrock-cols": (
            {"w": np.array([[-1.5, 1.2, 0.3], [1.5, -0.5, 0.8]])},
            lambda p, tanh: rosen(p["w"][0], p["w"][1]),
        ),
        "mlp": (
            {
                "w1": rng.normal(size=(3, 8)) * 0.5,
                "b1": rng.normal(size=(8,)) * 0.1,
                "w2": rng.normal(size=(8, 2)) * 0.5,
                "b2": np.zeros(2),
            },
            lambda p, tanh: (
                (
                    (
                        tanh(_like(x, p["w1"]) @ p["w1"] + p["b1"]) @ p["w2"]
                        + p["b2"]
                        - _like(y, p["w1"])
                    )
                    ** 2
                ).sum()
                / y.size
            ),
        ),
    }


PROBLEMS = _problems()


def _ours(opt, start, grad_of, steps=STEPS):
    """xpoptim's free-running trajectory: the parameters after every step."""
    params = {k: v.copy() for k, v in start.items()}
    state = opt.init(params)
    path = []
    for _ in range(steps):
        params, state = opt.update(params, grad_of(params), state)
        path.append({k: np.array(v) for k, v in params.items()})
    return path


def _largest_difference(ours, theirs):
    return max(
        float(np.max(np.abs(a[k] - b[k]))) for a, b in zip(ours, theirs, strict=True) for k in a
    )


def _synced(opt, start, grad_of, peer_step, steps=STEPS):
    """xpoptim's trajectory, with the peer stepping from the same point at every step.

    ``peer_step(params, grads, state)`` returns the peer's parameters after one step
    from xpoptim's ``params`` and ``state`` (before xpoptim's own step). Returns the
    largest difference over all steps (relative to the parameter's size where it is
    above 1), and how far the parameters moved.
    """
    params = {k: v.copy() for k, v in start.items()}
    state = opt.init(params)
    worst = 0.0
    for _ in range(steps):
        before = {k: v.copy() for k, v in params.items()}
        grads = grad_of(params)
        theirs = peer_step(before, grads, state)
        params, state = opt.update(params, grads, state)
        for k in params:
            scale = max(1.0, float(np.max(np.abs(before[k]))))
            worst = max(worst, float(np.max(np.abs(params[k] - theirs[k]))) / scale)
    moved = max(float(np.max(np.abs(params[k] - start[k]))) for k in start)
    return worst, moved


# -- torch.optim --------------------------------------------------------------------------


def _torch_grad_of(torch, loss):
    def grad_of(params):
        tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        loss(tensors, torch.tanh).backward()
        return {k: t.grad.numpy().copy() for k, t in tensors.items()}

    return grad_of


def _torch_trajectory(torch, make_opt, start, loss, steps=STEPS):
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in start.items()}
    opt = make_opt(tensors)
    path = []
    for _ in range(steps):
        opt.zero_grad()
        loss(tensors, torch.tanh).backward()
        opt.step()
        path.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
    return path


def _torch_peer(torch, make_opt, start, buffers):
    """A ``peer_step`` for `_synced`: a torch optimizer whose parameters and buffers
    (``buffers``: xpoptim field -> torch state key) are set from xpoptim's each step."""
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in start.items()}
    opt = make_opt(tensors)

    def peer_step(params, grads, state):
        with torch.no_grad():
            for k, t in tensors.items():
                t.copy_(torch.from_numpy(params[k]))
                t.grad = torch.from_numpy(grads[k].copy())
                torch_state = opt.state[t]
                if not torch_state:
                    continue  # the first step: both start from zeros
                if "step" in torch_state:
                    torch_state["step"].fill_(float(state.step))
                for field, key in buffers.items():
                    value = getattr(state, field)[k]
                    if value.size:
                        torch_state[key].copy_(torch.from_numpy(value))
        opt.step()
        return {k: t.detach().numpy().copy() for k, t in tensors.items()}

    return peer_step


ADAFACTOR_GRID = [
    {},
    {"learning_rate": 0.1, "weight_decay": 0.1},
    {"learning_rate": 0.05, "beta2_decay": -0.5, "clipping_threshold": 2.0},
    {"learning_rate": 0.02, "epsilon": 1e-20, "min_scale": 1e-2, "weight_decay": 0.01},
]


def _torch_adafactor(torch, config):
    c = {
        "learning_rate": 0.01,
        "beta2_decay": -0.8,
        "epsilon": None,
        "min_scale": 1e-3,
        "clipping_threshold": 1.0,
        "weight_decay": 0.0,
        **config,
    }

    def make(tensors):
        return torch.optim.Adafactor(
            list(tensors.values()),
            lr=c["learning_rate"],
            beta2_decay=c["beta2_decay"],
            eps=(c["epsilon"], c["min_scale"]),
            d=c["clipping_threshold"],
            weight_decay=c["weight_decay"],
            foreach=False,
        )

    return make


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("config", ADAFACTOR_GRID, ids=lambda c: "-".join(c) or "defaults")
def test_adafactor_matches_torch(problem, config):
    torch = pytest.importorskip("torch")
    start, loss = PROBLEMS[problem]
    buffers = {"row_var": "row_var", "col_var": "col_var", "variance": "variance"}
    peer = _torch_peer(torch, _torch_adafactor(torch, config), start, buffers)
    worst, moved = _synced(
        xpoptim.Adafactor(**config, no_decay=()), start, _torch_grad_of(torch, loss), peer
    )
    assert worst <= 1e-13, worst
    assert moved > 1e-2


MUON_GRID = [
    {"learning_rate": 0.02},
    {"learning_rate": 0.02, "weight_decay": 0.1, "nesterov": False},
    {"learning_rate": 0.01, "momentum": 0.9, "adjust_lr": "match_rms_adamw", "ns_steps": 3},
]


def _torch_muon_pair(torch, tensors, c):
    """torch.optim.Muon for the matrices, torch.optim.AdamW for the rest (xpoptim's split)."""
    matrices = [t for t in tensors.values() if t.ndim == 2]
    others = [t for t in tensors.values() if t.ndim != 2]
    muon = torch.optim.Muon(
        matrices,
        lr=c["learning_rate"],
        weight_decay=c.get("weight_decay", 0.0),
        momentum=c.get("momentum", 0.95),
        nesterov=c.get("nesterov", True),
        ns_steps=c.get("ns_steps", 5),
        adjust_lr_fn=c.get("adjust_lr"),
    )
    adamw = torch.optim.AdamW(
        others or [torch.zeros(1, dtype=torch.float64, requires_grad=True)],
        lr=c["learning_rate"],
        weight_decay=c.get("weight_decay", 0.0),
    )
    return muon, adamw


@pytest.mark.parametrize("problem", list(PROBLEMS)[1:])
@pytest.mark.parametrize("config", MUON_GRID, ids=lambda c: "-".join(c))
def test_muon_matches_torch_to_bfloat16_per_step(problem, config):
    """From the same parameters and buffers, one torch step and one xpoptim step: the
    matrices agree to bfloat16 precision (torch's iteration runs in bfloat16), the other
    parameters (AdamW on both sides) to float64 rounding; 200 steps of xpoptim's path."""
    torch = pytest.importorskip("torch")
    start, loss = PROBLEMS[problem]
    grad_of = _torch_grad_of(torch, loss)
    opt = xpoptim.Muon(**config, no_decay=())
    params = {k: v.copy() for k, v in start.items()}
    state = opt.init(params)
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in start.items()}
    muon, adamw = _torch_muon_pair(torch, tensors, config)
    worst_matrix = worst_other = 0.0
    least_cosine = 1.0
    for _ in range(STEPS):
        before = {k: v.copy() for k, v in params.items()}
        grads = grad_of(params)
        with torch.no_grad():
            for k, t in tensors.items():
                t.copy_(torch.tensor(before[k]))
                t.grad = torch.tensor(grads[k])
        muon.step()
        adamw.step()
        params, state = opt.update(params, grads, state)
        for k, t in tensors.items():
            ours, theirs = params[k] - before[k], t.detach().numpy() - before[k]
            size = float(np.max(np.abs(theirs)))
            gap = float(np.max(np.abs(ours - theirs)))
            if t.ndim == 2:
                worst_matrix = max(worst_matrix, gap / size)
                cosine = np.sum(ours * theirs) / np.linalg.norm(ours) / np.linalg.norm(theirs)
                least_cosine = min(least_cosine, float(cosine))
            else:
                worst_other = max(worst_other, gap)
        # torch's buffers, from the same point next step (its momentum is exact float64)
        for k, t in tensors.items():
            buf = (muon if t.ndim == 2 else adamw).state[t]
            key = "momentum_buffer" if t.ndim == 2 else "exp_avg"
            np.testing.assert_allclose(buf[key].numpy(), state.momentums[k], rtol=1e-10, atol=1e-14)
            if t.ndim != 2:
                np.testing.assert_allclose(
                    buf["exp_avg_sq"].numpy(), state.velocities[k], rtol=1e-10, atol=1e-16
                )
                buf["exp_avg"].copy_(torch.tensor(state.momentums[k]))
                buf["exp_avg_sq"].copy_(torch.tensor(state.velocities[k]))
            else:
                buf["momentum_buffer"].copy_(torch.tensor(state.momentums[k]))
    # bfloat16 (8 bits of mantissa) through 5 iterations that amplify small singular
    # values ~3.4x each: a few percent of the step, up to 9% on Rosenbrock's valley
    # (measured); the direction agrees closely, and a wrong scale (sqrt(3/2) = 1.22 for the
    # 3x2 matrix) would not pass.
    assert worst_matrix < 0.15, worst_matrix
    assert least_cosine > 0.995, least_cosine
    assert worst_other < 1e-12, worst_other


def test_muon_orthogonalizes_like_torch():
    """The Newton-Schulz iteration alone, on tall, wide and square matrices: torch's
    (bfloat16) and xpoptim's (float64) agree to bfloat16 precision, and xpoptim's
    float64 one has singular values in torch's documented band (about 0.5 to 1.5)."""
    torch = pytest.importorskip("torch")
    from torch.optim._muon import _zeropower_via_newtonschulz

    from xpoptim._rules import newton_schulz

    rng = np.random.default_rng(2)
    for shape in [(6, 3), (3, 6), (5, 5)]:
        g = rng.normal(size=shape)
        theirs = (
            _zeropower_via_newtonschulz(torch.tensor(g), (3.4445, -4.775, 2.0315), 5, 1e-7)
            .double()
            .numpy()
        )
        ours = newton_schulz(g, a=3.4445, b=-4.775, c=2.0315, steps=5, epsilon=1e-7, xp=np)
        assert ours.shape == shape
        assert np.max(np.abs(ours - theirs)) < 5e-2 * np.max(np.abs(theirs))  # 1-4% measured
        s = np.linalg.svd(ours, compute_uv=False)
        assert s.min() > 0.3, s
        assert s.max() < 1.5, s


# -- optax --------------------------------------------------------------------------------


def _jax_grad_of(jax, loss):
    jnp = jax.numpy
    grad = jax.grad(lambda p: loss(p, jnp.tanh))

    def grad_of(params):
        g = grad({k: jnp.asarray(v) for k, v in params.items()})
        return {k: np.asarray(v, dtype=np.float64).copy() for k, v in g.items()}

    return grad_of


def _optax_trajectory(jax, optax, tx, start, loss, steps=STEPS):
    jnp = jax.numpy
    params = {k: jnp.asarray(v) for k, v in start.items()}
    state = tx.init(params)
    grad = jax.grad(lambda p: loss(p, jnp.tanh))
    path = []
    for _ in range(steps):
        updates, state = tx.update(grad(params), state, params)
        params = optax.apply_updates(params, updates)
        path.append({k: np.asarray(v) for k, v in params.items()})
    return path


def _replaced(state, kind, **fields):
    """optax's chained ``state`` with the NamedTuples of class ``kind`` given ``fields``."""
    if type(state).__name__ == kind:
        return state._replace(**fields)
    if isinstance(state, tuple):
        parts = [_replaced(part, kind, **fields) for part in state]
        return type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)
    return state


def _optax_peer(jax, optax, tx, start, fill):
    """A ``peer_step`` for `_synced`: optax's ``tx`` from xpoptim's parameters and state
    (``fill(optax_state, xpoptim_state)`` copies the buffers over)."""
    jnp = jax.numpy
    empty = tx.init({k: jnp.asarray(v) for k, v in start.items()})

    def peer_step(params, grads, state):
        p = {k: jnp.asarray(v) for k, v in params.items()}
        g = {k: jnp.asarray(v) for k, v in grads.items()}
        updates, _ = tx.update(g, fill(empty, state), p)
        return {k: np.asarray(v) for k, v in optax.apply_updates(p, updates).items()}

    return peer_step


def _jax_float64():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    if not jax.config.read("jax_enable_x64"):
        pytest.skip("JAX runs in float32 here (the jax session enables float64)")
    return jax, optax


LAMB_GRID = [
    {"learning_rate": 0.01},
    {"learning_rate": 0.01, "weight_decay": 0.01},
    {"learning_rate": 0.003, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-8, "weight_decay": 0.1},
]


def _optax_lamb(optax, config):
    c = {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-6, "weight_decay": 0.0, **config}
    return optax.lamb(
        c["learning_rate"],
        b1=c["beta1"],
        b2=c["beta2"],
        eps=c["epsilon"],
        weight_decay=c["weight_decay"],
    )


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("config", LAMB_GRID, ids=lambda c: "-".join(c))
def test_lamb_matches_optax(problem, config):
    jax, optax = _jax_float64()
    jnp = jax.numpy
    start, loss = PROBLEMS[problem]

    def fill(empty, state):
        mu = {k: jnp.asarray(v) for k, v in state.momentums.items()}
        nu = {k: jnp.asarray(v) for k, v in state.velocities.items()}
        count = jnp.asarray(state.step, dtype=jnp.int32)
        return _replaced(empty, "ScaleByAdamState", count=count, mu=mu, nu=nu)

    peer = _optax_peer(jax, optax, _optax_lamb(optax, config), start, fill)
    worst, moved = _synced(
        xpoptim.LAMB(**config, no_decay=()), start, _jax_grad_of(jax, loss), peer
    )
    assert worst <= 1e-13, worst
    assert moved > 1e-2


LARS_GRID = [
    {"learning_rate": 1.0},
    {"learning_rate": 2.0, "weight_decay": 0.01, "nesterov": True},
    {"learning_rate": 0.5, "momentum": 0.5, "trust_coefficient": 0.01, "epsilon": 1e-6},
]


def _optax_lars(optax, config):
    c = {
        "weight_decay": 0.0,
        "momentum": 0.9,
        "trust_coefficient": 0.001,
        "epsilon": 0.0,
        "nesterov": False,
        **config,
    }
    return optax.lars(
        c["learning_rate"],
        weight_decay=c["weight_decay"],
        momentum=c["momentum"],
        trust_coefficient=c["trust_coefficient"],
        eps=c["epsilon"],
        nesterov=c["nesterov"],
    )


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("config", LARS_GRID, ids=lambda c: "-".join(c))
def test_lars_matches_optax(problem, config):
    jax, optax = _jax_float64()
    jnp = jax.numpy
    start, loss = PROBLEMS[problem]

    def fill(empty, state):
        trace = {k: jnp.asarray(v) for k, v in state.velocities.items()}
        return _replaced(empty, "TraceState", trace=trace)

    peer = _optax_peer(jax, optax, _optax_lars(optax, config), start, fill)
    worst, moved = _synced(
        xpoptim.LARS(**config, no_decay=()), start, _jax_grad_of(jax, loss), peer
    )
    assert worst <= 1e-13, worst
    assert moved > 1e-3


FREE_STEPS = 20


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_free_runs_agree_at_first(problem):
    """The first 20 steps of each optimizer and its peer, each on its own path."""
    start, loss = PROBLEMS[problem]
    checked = 0
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        config = ADAFACTOR_GRID[1]
        theirs = _torch_trajectory(torch, _torch_adafactor(torch, config), start, loss, FREE_STEPS)
        ours = _ours(
            xpoptim.Adafactor(**config, no_decay=()), start, _torch_grad_of(torch, loss), FREE_STEPS
        )
        assert _largest_difference(ours, theirs) <= 1e-13
        checked += 1
    try:
        jax, optax = _jax_float64()
    except pytest.skip.Exception:
        jax = None
    if jax is not None:
        for make, ours_opt in [
            (_optax_lamb(optax, LAMB_GRID[1]), xpoptim.LAMB(**LAMB_GRID[1], no_decay=())),
            (_optax_lars(optax, LARS_GRID[1]), xpoptim.LARS(**LARS_GRID[1], no_decay=())),
        ]:
            theirs = _optax_trajectory(jax, optax, make, start, loss, FREE_STEPS)
            ours = _ours(ours_opt, start, _jax_grad_of(jax, loss), FREE_STEPS)
            assert _largest_difference(ours, theirs) <= 1e-13
            checked += 1
    if not checked:
        pytest.skip("neither torch nor JAX with float64 is installed here")
