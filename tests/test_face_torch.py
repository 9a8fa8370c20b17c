"""The torch.optim face: a real nn.Module trained with schedulers, GradScaler, clipping and
checkpoints, against torch.optim's own optimizers (float64) and against xpoptim's
functional ``update`` called directly.

Where torch has the optimizer, the conventions match as follows (see docs/torch.md):
``Adam(regularization=None)`` is ``torch.optim.Adam``; ``RMSprop(regularization=None,
decay_rate=a)`` is ``torch.optim.RMSprop(alpha=a)``; ``SGD(momentum=mu)`` is
``torch.optim.SGD(momentum=mu)`` at a constant learning rate (xpoptim's velocity holds
``-lr * b``: the two part ways when the learning rate changes), and its ``"L2"`` is
torch's coupled ``weight_decay`` when no parameter name matches ``no_decay``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import xpoptim  # noqa: E402
from xpoptim.faces.torch import Optimizer  # noqa: E402

TOL = 1e-12


def make_model(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    ).double()


def data(seed: int = 1) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 16, 5, generator=g, dtype=torch.float64)
    y = torch.randn(6, 16, 3, generator=g, dtype=torch.float64)
    return x, y


def train(
    model: Any,
    opt: Any,
    *,
    epochs: int = 4,
    scheduler: Callable[[Any], Any] | None = None,
    scaler: Any = None,
    clip: float | None = None,
    poison: tuple[int, int] | None = None,
) -> None:
    """A usual loop: zero_grad, backward (scaled), clip, step, scheduler per epoch."""
    sched = scheduler(opt) if scheduler else None
    xs, ys = data()
    for epoch in range(epochs):
        for batch, (x, y) in enumerate(zip(xs, ys, strict=True)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            if poison == (epoch, batch):
                loss = loss * float("inf")  # an overflow: GradScaler must skip this step
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        if sched is not None:
            sched.step()


def max_diff(a: Any, b: Any) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p - q).detach().abs().max()) for p, q in pairs)


PEERS = {
    "adam": (
        lambda: xpoptim.Adam(learning_rate=0.01, regularization=None, beta1=0.8, beta2=0.99),
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99)),
    ),
    "adam-amsgrad": (
        lambda: xpoptim.Adam(learning_rate=0.01, regularization=None, amsgrad=True),
        lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True),
    ),
    "rmsprop": (
        lambda: xpoptim.RMSprop(learning_rate=0.005, regularization=None, decay_rate=0.95),
        lambda ps: torch.optim.RMSprop(ps, lr=0.005, alpha=0.95, eps=1e-8),
    ),
}


@pytest.mark.parametrize("name", list(PEERS))
def test_equals_torch_optim_with_scheduler_scaler_and_clipping(name: str) -> None:
    make_xp, make_torch = PEERS[name]
    ours, theirs = make_model(), make_model()
    schedule = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)  # noqa: E731
    face = Optimizer(ours.parameters(), make_xp())
    for model, opt in ((ours, face), (theirs, make_torch(theirs.parameters()))):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        train(model, opt, scheduler=schedule, scaler=scaler, clip=0.5, poison=(1, 2))
    assert face.state[ours[0].weight]["step"] == 4 * 6 - 1  # the poisoned step was skipped
    assert face.param_groups[0]["lr"] == 0.25 * face.defaults["lr"]
    assert max_diff(ours, theirs) < TOL
    assert max_diff(ours, make_model()) > 1e-3  # it trained


def test_sgd_equals_torch_at_a_constant_rate_with_coupled_l2() -> None:
    ours, theirs = make_model(), make_model()
    train(ours, Optimizer(ours.parameters(), xpoptim.SGD(0.05, "L2", 0.01, momentum=0.9)))
    train(theirs, torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01))
    assert max_diff(ours, theirs) < TOL


def test_sgd_under_a_scheduler_parts_from_torch_as_documented() -> None:
    """xpoptim's velocity carries the old learning rates (v = mu v - lr g); torch's buffer
    does not (w -= lr b). A test that the documented difference is real."""
    ours, theirs = make_model(), make_model()
    schedule = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.1)  # noqa: E731
    train(
        ours,
        Optimizer(ours.parameters(), xpoptim.SGD(0.05, None, momentum=0.9)),
        scheduler=schedule,
    )
    train(theirs, torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9), scheduler=schedule)
    assert max_diff(ours, theirs) > 1e-4


def test_named_parameters_reach_no_decay() -> None:
    """With names, biases are not regularized (the seed's rule): torch with weight decay
    on the weights only."""
    ours, theirs = make_model(), make_model()
    train(ours, Optimizer(ours.named_parameters(), xpoptim.SGD(0.05, "L2", 0.1, momentum=0.5)))
    weights = [p for n, p in theirs.named_parameters() if "bias" not in n]
    biases = [p for n, p in theirs.named_parameters() if "bias" in n]
    groups = [{"params": weights}, {"params": biases, "weight_decay": 0.0}]
    train(theirs, torch.optim.SGD(groups, lr=0.05, momentum=0.5, weight_decay=0.1))
    assert max_diff(ours, theirs) < TOL


def direct_training(optimizer: Any, gamma: float, epochs: int = 4) -> Any:
    """The same loop with xpoptim's functional update on the module's tensors, the wrapped
    optimizer's learning rate multiplied by ``gamma`` after each epoch (as ExponentialLR)."""
    model = make_model()
    params = {str(i): p for i, p in enumerate(model.parameters())}
    state = optimizer.init({k: p.detach() for k, p in params.items()})
    xs, ys = data()
    for _ in range(epochs):
        for x, y in zip(xs, ys, strict=True):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            detached = {k: p.detach() for k, p in params.items()}
            grads = {k: p.grad for k, p in params.items()}
            new, state = optimizer.update(detached, grads, state)
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(new[k])
        optimizer.optimizer.learning_rate *= gamma
    return model


@pytest.mark.parametrize(
    "make",
    [
        lambda: xpoptim.transforms.MultiSteps(xpoptim.AdamW(0.02, weight_decay=0.1), every_k=3),
        lambda: xpoptim.transforms.Clipped(xpoptim.SGD(0.1, momentum=0.5), max_global_norm=0.1),
    ],
    ids=["multisteps-adamw", "clipped-sgd"],
)
def test_wrappers_equal_xpoptim_called_directly(make: Callable[[], Any]) -> None:
    ours = make_model()
    opt = Optimizer(ours.parameters(), make())
    train(ours, opt, scheduler=lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7))
    direct = direct_training(make(), gamma=0.7)
    assert max_diff(ours, direct) == 0.0


def test_state_dict_round_trip_through_torch_save() -> None:
    """Three epochs, a checkpoint through torch.save/torch.load(weights_only=True) into a
    new model and optimizer, three more: the same as six without a stop."""
    make = lambda: xpoptim.Adam(learning_rate=0.01, weight_decay=0.01)  # noqa: E731
    whole = make_model()
    train(whole, Optimizer(whole.parameters(), make()), epochs=6)

    first = make_model()
    opt = Optimizer(first.parameters(), make())
    train(first, opt, epochs=3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = Optimizer(resumed.parameters(), make())
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[next(iter(resumed.parameters()))]["step"] == 18
    train(resumed, opt2, epochs=3)
    assert max_diff(resumed, whole) == 0.0


def test_loading_another_optimizers_state_is_refused_and_changes_nothing() -> None:
    model = make_model()
    adam = Optimizer(model.parameters(), xpoptim.Adam(0.01))
    train(model, adam, epochs=1)
    sgd = Optimizer(model.parameters(), xpoptim.SGD(0.01))
    with pytest.raises(ValueError, match=r"entries \['momentums', 'step', 'velocities'\].*SGD"):
        sgd.load_state_dict(adam.state_dict())
    assert len(sgd.state) == 0


def test_groups_set_their_own_hyperparameters_and_lr() -> None:
    """Per-group lr and momentum, as torch's groups."""
    a, b = make_model(), make_model()

    def groups(model: Any) -> list[dict[str, Any]]:
        return [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "lr": 0.001, "momentum": 0.0},
        ]

    train(a, Optimizer(groups(a), xpoptim.SGD(0.05, None, momentum=0.9)))
    train(b, torch.optim.SGD(groups(b), lr=0.05, momentum=0.9))
    assert max_diff(a, b) < TOL


def test_a_group_setting_that_adds_a_buffer_starts_it_from_zeros() -> None:
    """RMSprop's momentum turned on mid-training: its buffer starts at zero, as it would
    for xpoptim's own RMSprop(momentum=...) from that state."""
    model = make_model()
    opt = Optimizer(model.parameters(), xpoptim.RMSprop(0.01, None, momentum=0.0))
    train(model, opt, epochs=1)
    p = model[0].weight
    assert "momentum_buffer" not in opt.state[p]
    cache = opt.state[p]["cache"].clone()
    opt.param_groups[0]["momentum"] = 0.5
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt.step()
    # b = 0.5 * 0 + g / (sqrt(cache') + eps); w -= lr * b, with cache' = 0.9 cache + 0.1 g^2
    cache = 0.9 * cache + 0.1
    want = before - 0.01 * (1.0 / (cache.sqrt() + 1e-8))
    assert torch.allclose(p.detach(), want, rtol=1e-12, atol=1e-14)
    buffer = opt.state[p]["momentum_buffer"]
    assert torch.allclose(buffer, 1.0 / (cache.sqrt() + 1e-8), rtol=1e-12, atol=0)


def test_a_group_added_later_steps_from_its_own_first_step() -> None:
    """add_param_group mid-training (unfreezing a layer), as torch.optim.Adam."""
    a, b = make_model(), make_model()
    oa = Optimizer(a[0].parameters(), xpoptim.Adam(0.01, regularization=None))
    ob = torch.optim.Adam(b[0].parameters(), lr=0.01)
    for model, opt in ((a, oa), (b, ob)):
        train(model, opt, epochs=1)
        opt.add_param_group({"params": model[2].parameters(), "lr": 0.003})
        train(model, opt, epochs=1)
    assert oa.state[a[2].weight]["step"] == 6
    assert max_diff(a, b) < TOL


def test_parameters_without_gradients_are_skipped_and_count_their_own_steps() -> None:
    a, b = make_model(), make_model()
    frozen_a, frozen_b = a[2].weight, b[2].weight
    oa = Optimizer(a.parameters(), xpoptim.Adam(0.01, regularization=None))
    ob = torch.optim.Adam(b.parameters(), lr=0.01)
    for model, opt, frozen in ((a, oa, frozen_a), (b, ob, frozen_b)):
        frozen.requires_grad_(False)
        train(model, opt, epochs=1)
        frozen.requires_grad_(True)  # from now on it steps, from step 1
        train(model, opt, epochs=1)
    assert oa.state[frozen_a]["step"] == 6
    assert oa.state[a[0].weight]["step"] == 12
    assert max_diff(a, b) < TOL


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: "adam", TypeError, "xpoptim optimizer or wrapper"),
        (lambda: xpoptim.Adam(xpoptim.schedules.StepDecay(0.1, 10)), TypeError, "schedule"),
        (
            lambda: xpoptim.transforms.ParamGroups(xpoptim.SGD(), [{"params": ["x"]}]),
            TypeError,
            "torch parameter groups",
        ),
    ],
)
def test_bad_optimizers_are_refused(make: Callable[[], Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Optimizer(make_model().parameters(), make())


@pytest.mark.parametrize(
    ("entry", "value", "match"),
    [("lr", -1.0, r"param_groups\[0\]: learning_rate must be > 0"),
     ("momentum", 1.5, r"param_groups\[0\]: momentum must be in \[0, 1\)")],
)  # fmt: skip
def test_bad_group_values_raise_naming_the_group_and_change_nothing(
    entry: str, value: float, match: str
) -> None:
    model = make_model()
    opt = Optimizer(model.parameters(), xpoptim.SGD(0.1, momentum=0.5))
    train(model, opt, epochs=1)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: dict(v) for k, v in opt.state.items()}
    torch.nn.functional.mse_loss(model(data()[0][0]), data()[1][0]).backward()
    opt.param_groups[0][entry] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert {k: dict(v) for k, v in opt.state.items()}.keys() == state_before.keys()
    assert all(opt.state[p]["step"] == state_before[p]["step"] for p in model.parameters())


def test_sparse_gradients_are_refused() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    opt = Optimizer(emb.named_parameters(), xpoptim.SGD())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"'weight' has a sparse gradient"):
        opt.step()


def test_closure_returns_the_loss() -> None:
    model = make_model()
    opt = Optimizer(model.parameters(), xpoptim.Adam(0.01))
    x, y = data()

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[0]), y[0])
        loss.backward()
        return loss

    first = opt.step(closure)
    assert first.item() > opt.step(closure).item()


def test_float32_model_keeps_float32_state() -> None:
    model = make_model().float()
    opt = Optimizer(model.parameters(), xpoptim.RMSprop(0.01, momentum=0.5, centered=True))
    x, y = data()
    torch.nn.functional.mse_loss(model(x[0].float()), y[0].float()).backward()
    opt.step()
    p = next(iter(model.parameters()))
    assert {k: v.dtype for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} == {
        "cache": torch.float32,
        "mean_grad": torch.float32,
        "momentum_buffer": torch.float32,
    }


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the face's CUDA run needs one"
)
def test_cuda_equals_torch_optim_adam_on_cuda() -> None:  # pragma: no cover - GPU only
    ours, theirs = make_model().cuda(), make_model().cuda()
    xs, ys = (t.cuda() for t in data())
    oa = Optimizer(ours.parameters(), xpoptim.Adam(0.01, regularization=None))
    ob = torch.optim.Adam(theirs.parameters(), lr=0.01)
    for model, opt in ((ours, oa), (theirs, ob)):
        for x, y in zip(xs, ys, strict=True):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert max_diff(ours, theirs) < TOL
    assert next(iter(oa.state.values()))["momentums"].is_cuda


def test_import_xpoptim_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, xpoptim, xpoptim.faces; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
