"""The elementwise optimizers of issue 11 against their peers' own trajectories, in float64.

torch.optim (``tests(torch)``): Adagrad, Adadelta, Adamax, NAdam, RAdam, Rprop. optax
(``tests(jax)``): Lion, ScheduleFreeAdamW. Each on the 2-D test functions of torch's own
optimizer tests (Rosenbrock) and friends (Beale, Booth), 250 steps from two starting
points, over a grid of its hyperparameters including weight decay, and on a small MLP.
Both sides take their gradient at their own point: the trajectories are compared step
by step, so a difference in any step compounds and shows.
"""

from __future__ import annotations

import numpy as np
import pytest

import xpoptim

STEPS = 250
#: the largest difference allowed between the two trajectories: float64 rounding
RTOL, ATOL = 1e-12, 1e-14


def rosenbrock(w):
    x, y = w
    return np.array([-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)])


def beale(w):
    x, y = w
    a1, a2, a3 = 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3
    return np.array(
        [
            2 * a1 * (y - 1) + 2 * a2 * (y**2 - 1) + 2 * a3 * (y**3 - 1),
            2 * a1 * x + 2 * a2 * 2 * x * y + 2 * a3 * 3 * x * y**2,
        ]
    )


def booth(w):
    x, y = w
    return np.array(
        [2 * (x + 2 * y - 7) + 4 * (2 * x + y - 5), 4 * (x + 2 * y - 7) + 2 * (2 * x + y - 5)]
    )


FUNCTIONS = {
    "rosenbrock": (rosenbrock, [(1.5, 1.5), (-1.2, 1.0)]),
    "beale": (beale, [(1.0, 1.5), (-0.5, 0.5)]),
    "booth": (booth, [(0.0, 0.0), (8.0, -3.0)]),
}
PROBLEMS = [(name, start) for name, (_, starts) in FUNCTIONS.items() for start in starts]


def problem_id(problem):
    return f"{problem[0]}{problem[1]}"


def run_xpoptim(opt, start, gradients):
    """xpoptim on NumPy float64 (the compiled path), fed ``gradients`` in turn."""
    params = {"w": np.array(start, dtype=np.float64)}
    state = opt.init(params)
    path = []
    for g in gradients:
        params, state = opt.update(params, {"w": g}, state)
        path.append(params["w"].copy())
    return np.array(path)


def assert_trajectories_match(ours, theirs):
    # A diverging trajectory compares nothing useful: pick values under which it stays put.
    assert np.abs(theirs).max() < 1e3, "the peer's trajectory diverged: pick other values"
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)


# -- torch.optim ----------------------------------------------------------------------------

# xpoptim kwargs: a grid where every hyperparameter and both decay forms matter.
TORCH_GRID = {
    "Adagrad": [
        {"learning_rate": 0.1},
        {"learning_rate": 0.5, "weight_decay": 0.1, "learning_rate_decay": 0.01},
        {"learning_rate": 0.05, "initial_accumulator_value": 0.5, "epsilon": 1e-6},
    ],
    "Adadelta": [
        {},
        {"learning_rate": 0.5, "decay_rate": 0.95, "epsilon": 1e-4, "weight_decay": 0.1},
    ],
    "Adamax": [
        {"learning_rate": 0.01},
        {"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6, "weight_decay": 0.1},
    ],
    "NAdam": [
        {"learning_rate": 0.01},
        {"learning_rate": 0.01, "momentum_decay": 0.01, "weight_decay": 0.1},
        {"learning_rate": 0.01, "weight_decay": 0.1, "decoupled": True, "beta1": 0.8},
    ],
    # Small steps: RAdam starts as SGD with momentum, which Rosenbrock's gradients blow up.
    "RAdam": [
        {"learning_rate": 0.001},
        {"learning_rate": 0.001, "weight_decay": 0.1, "beta2": 0.99},
        {"learning_rate": 0.002, "weight_decay": 0.1, "decoupled": True, "epsilon": 1e-6},
    ],
    "Rprop": [
        {},
        {
            "learning_rate": 0.001,
            "eta_minus": 0.3,
            "eta_plus": 1.5,
            "step_size_min": 1e-4,
            "step_size_max": 0.1,
            "weight_decay": 0.1,
        },
    ],
}
TORCH_CASES = [(kind, kwargs) for kind, grid in TORCH_GRID.items() for kwargs in grid]


def torch_kwargs(kind, kwargs):
    """The same optimizer in torch.optim's names."""
    out = {}
    for key, value in kwargs.items():
        if key in ("beta1", "beta2"):
            continue
        if key in ("eta_minus", "eta_plus", "step_size_min", "step_size_max"):
            continue
        out[
            {
                "learning_rate": "lr",
                "epsilon": "eps",
                "learning_rate_decay": "lr_decay",
                "decay_rate": "rho",
                "decoupled": "decoupled_weight_decay",
            }.get(key, key)
        ] = value
    if kind in ("Adamax", "NAdam", "RAdam"):
        out["betas"] = (kwargs.get("beta1", 0.9), kwargs.get("beta2", 0.999))
    if kind == "Rprop":
        out["etas"] = (kwargs.get("eta_minus", 0.5), kwargs.get("eta_plus", 1.2))
        out["step_sizes"] = (kwargs.get("step_size_min", 1e-6), kwargs.get("step_size_max", 50.0))
    return out


@pytest.fixture
def torch64():
    torch = pytest.importorskip("torch")
    # NAdam keeps its momentum product in a tensor of the default dtype: float64 too.
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch
    torch.set_default_dtype(before)


def run_torch_2d(torch, kind, kwargs, gradient, start, steps=STEPS):
    """torch.optim's trajectory, and the gradient it took at each step (before its own
    Rprop decay term, which torch lacks and is added here as xpoptim adds it)."""
    kwargs = torch_kwargs(kind, kwargs)
    decay = kwargs.pop("weight_decay", 0.0) if kind == "Rprop" else 0.0
    w = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = getattr(torch.optim, kind)([w], foreach=False, **kwargs)
    path, gradients = [], []
    for _ in range(steps):
        point = w.detach().numpy().copy()
        gradients.append(gradient(point))
        w.grad = torch.tensor(gradients[-1] + decay * point)
        opt.step()
        path.append(w.detach().numpy().copy())
    return np.array(path), gradients


def case_id(case):
    kind, kwargs = case
    return f"{kind}-" + ("-".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults")


@pytest.mark.parametrize("problem", PROBLEMS, ids=problem_id)
@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_matches_torch_optim_on_2d_functions(torch64, case, problem):
    kind, kwargs = case
    gradient = FUNCTIONS[problem[0]][0]
    theirs, gradients = run_torch_2d(torch64, kind, kwargs, gradient, problem[1])
    ours = run_xpoptim(getattr(xpoptim, kind)(**kwargs), problem[1], gradients)
    assert_trajectories_match(ours, theirs)


def mlp_data(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"0.weights": (5, 8), "0.bias": (8,), "1.weights": (8, 1), "1.bias": (1,)}
    params = {k: rng.normal(size=s) * 0.5 for k, s in shapes.items()}
    x = rng.normal(size=(32, 5))
    y = np.sin(x.sum(axis=1, keepdims=True))
    return params, x, y


def mlp_loss(lib, params, x, y):
    h = lib.tanh(x @ params["0.weights"] + params["0.bias"])
    return ((h @ params["1.weights"] + params["1.bias"] - y) ** 2).mean()


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_matches_torch_optim_on_an_mlp(torch64, case):
    """xpoptim on torch tensors (torch decays every parameter: no_decay=())."""
    torch = torch64
    kind, kwargs = case
    params_np, x_np, y_np = mlp_data()
    x, y = torch.tensor(x_np), torch.tensor(y_np)
    theirs = {k: torch.tensor(v, requires_grad=True) for k, v in params_np.items()}
    tkw = torch_kwargs(kind, kwargs)
    decay = tkw.pop("weight_decay", 0.0) if kind == "Rprop" else 0.0
    topt = getattr(torch.optim, kind)(list(theirs.values()), foreach=False, **tkw)
    opt = getattr(xpoptim, kind)(**kwargs, no_decay=())
    ours = {k: torch.tensor(v) for k, v in params_np.items()}
    state = opt.init(ours)
    for _ in range(200):
        topt.zero_grad()
        mlp_loss(torch, theirs, x, y).backward()
        grads = {k: p.grad.clone() for k, p in theirs.items()}
        if decay:
            for p in theirs.values():
                p.grad += decay * p.detach()
        topt.step()
        ours, state = opt.update(ours, grads, state)
    for name in params_np:
        np.testing.assert_allclose(
            ours[name].numpy(), theirs[name].detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=name
        )


# -- optax ----------------------------------------------------------------------------------

OPTAX_GRID = {
    "Lion": [
        {"learning_rate": 0.01},
        {"learning_rate": 0.003, "beta1": 0.95, "beta2": 0.98, "weight_decay": 0.1},
        {"learning_rate": 0.01, "weight_decay": 1e-3},
    ],
    "ScheduleFreeAdamW": [
        {"learning_rate": 0.05},
        {
            "learning_rate": 0.05,
            "beta1": 0.95,
            "beta2": 0.99,
            "epsilon": 1e-6,
            "weight_decay": 0.05,
            "weight_lr_power": 1.0,
        },
        {},
    ],
}
OPTAX_CASES = [(kind, kwargs) for kind, grid in OPTAX_GRID.items() for kwargs in grid]


def optax_optimizer(optax, kind, kwargs):
    if kind == "Lion":
        return optax.lion(
            kwargs["learning_rate"],
            b1=kwargs.get("beta1", 0.9),
            b2=kwargs.get("beta2", 0.99),
            weight_decay=kwargs.get("weight_decay", 0.0),
        )
    return optax.contrib.schedule_free_adamw(
        kwargs.get("learning_rate", 0.0025),
        b1=kwargs.get("beta1", 0.9),
        b2=kwargs.get("beta2", 0.999),
        eps=kwargs.get("epsilon", 1e-8),
        weight_decay=kwargs.get("weight_decay", 0.0),
        weight_lr_power=kwargs.get("weight_lr_power", 2.0),
    )


@pytest.fixture
def optax64():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield optax
    jax.config.update("jax_enable_x64", before)


def run_optax(optax, tx, params, gradient, steps):
    """optax's trajectory, and the gradient it took at each step (as NumPy)."""
    import jax.numpy as jnp

    params = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}
    state = tx.init(params)
    path, gradients = [], []
    for _ in range(steps):
        grads = {k: jnp.asarray(g) for k, g in gradient(params).items()}
        gradients.append({k: np.asarray(g).copy() for k, g in grads.items()})
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        path.append({k: np.asarray(v).copy() for k, v in params.items()})
    return path, gradients, state, params


@pytest.mark.parametrize("problem", PROBLEMS, ids=problem_id)
@pytest.mark.parametrize("case", OPTAX_CASES, ids=case_id)
def test_matches_optax_on_2d_functions(optax64, case, problem):
    kind, kwargs = case
    gradient = FUNCTIONS[problem[0]][0]
    path, gradients, _, _ = run_optax(
        optax64,
        optax_optimizer(optax64, kind, kwargs),
        {"w": np.array(problem[1])},
        lambda params: {"w": gradient(np.asarray(params["w"]))},
        STEPS,
    )
    theirs = np.array([step["w"] for step in path])
    # optax decays every parameter; so does xpoptim for the name "w".
    ours = run_xpoptim(getattr(xpoptim, kind)(**kwargs), problem[1], [g["w"] for g in gradients])
    assert_trajectories_match(ours, theirs)


@pytest.mark.parametrize("case", OPTAX_CASES, ids=case_id)
def test_matches_optax_on_an_mlp(optax64, case):
    """xpoptim on JAX arrays against optax, 200 steps; and schedule-free's average."""
    import jax
    import jax.numpy as jnp

    kind, kwargs = case
    params_np, x_np, y_np = mlp_data()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    grad = jax.grad(lambda p: mlp_loss(jnp, p, x, y))
    tx = optax_optimizer(optax64, kind, kwargs)
    _, gradients, their_state, theirs = run_optax(optax64, tx, params_np, grad, 200)
    opt = getattr(xpoptim, kind)(**kwargs, no_decay=())
    ours = {k: jnp.asarray(v) for k, v in params_np.items()}
    state = opt.init(ours)
    for grads in gradients:
        ours, state = opt.update(ours, {k: jnp.asarray(g) for k, g in grads.items()}, state)
    for name in params_np:
        np.testing.assert_allclose(
            np.asarray(ours[name]), np.asarray(theirs[name]), rtol=RTOL, atol=ATOL, err_msg=name
        )
    if kind == "ScheduleFreeAdamW":
        want = optax64.contrib.schedule_free_eval_params(their_state, theirs)
        got = opt.average(ours, state)
        for name in params_np:
            np.testing.assert_allclose(
                np.asarray(got[name]), np.asarray(want[name]), rtol=RTOL, atol=ATOL
            )


def test_optax_lion_default_decay_is_one_option_away(optax64):
    """optax.lion decays by 1e-3 by default; xpoptim's Lion does not, unless asked."""
    import inspect

    assert inspect.signature(optax64.lion).parameters["weight_decay"].default == 1e-3
    assert xpoptim.Lion().weight_decay == 0.0
    gradient = FUNCTIONS["rosenbrock"][0]
    path, gradients, _, _ = run_optax(
        optax64,
        optax64.lion(0.01),
        {"w": np.array([1.5, 1.5])},
        lambda params: {"w": gradient(np.asarray(params["w"]))},
        50,
    )
    ours = run_xpoptim(
        xpoptim.Lion(0.01, weight_decay=1e-3), (1.5, 1.5), [g["w"] for g in gradients]
    )
    assert_trajectories_match(ours, np.array([step["w"] for step in path]))
