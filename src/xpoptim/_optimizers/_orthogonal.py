"""Orthogonalized momentum: `Muon` (torch.optim's ``Muon``), with AdamW for the
parameters that are not matrices.

The Newton-Schulz iteration multiplies whole matrices: the rule is not elementwise, so
it runs on whole arrays (the plain path, as `xpoptim.explain` says) and `OutOfCore`
refuses it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

from .. import _rules
from .. import _validation as check
from .._compat import Array
from ._base import NOT_DECAYED
from ._decoupled import DecoupledOnly

#: Keller Jordan's quintic Newton-Schulz coefficients (torch.optim's defaults).
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
ADJUST_LR = ("original", "match_rms_adamw")


class MuonState(NamedTuple):
    """State of `Muon`.

    Attributes:
        step: number of updates applied so far.
        momentums: parameter name -> momentum buffer (2-D parameters) or AdamW's first
            moment (the others).
        velocities: parameter name -> AdamW's second moment (parameters that are not
            2-D); empty (shape ``(0,)``) for the 2-D parameters, which do not use it.
        skipped: number of updates skipped by ``nonfinite="skip"``; ``None`` under the
            other policies.
    """

    step: Any
    momentums: dict[str, Array]
    velocities: dict[str, Array]
    skipped: Any = None


def _velocity_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (0,) if len(shape) == 2 else shape


def _finite_real(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Real) and math.isfinite(value)


def _coefficients(value: Any) -> tuple[float, float, float]:
    """``ns_coefficients`` checked: three finite real numbers, as a tuple of floats."""
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or len(value) != 3
        or not all(_finite_real(c) for c in value)
    ):
        raise ValueError(f"ns_coefficients must be three finite numbers (a, b, c), got {value!r}")
    a, b, c = (float(c) for c in value)
    return a, b, c


class Muon(DecoupledOnly):
    """Muon: momentum orthogonalized by a Newton-Schulz iteration (2-D parameters).

    Update rule for a parameter of shape ``(A, B)``:

    1. ``m = momentum * m + (1 - momentum) * g``
    2. ``u = (1 - momentum) * g + momentum * m`` (``nesterov=True``), else ``u = m``
    3. ``X = u / max(||u||_F, epsilon)`` (transposed if ``A > B``); ``ns_steps`` times:
       ``G = X @ X^T``; ``X = a * X + (b * G + c * G @ G) @ X``, with
       ``(a, b, c) = ns_coefficients``; ``O = X`` (transposed back)
    4. ``w = w * (1 - learning_rate * weight_decay)``
    5. ``w = w - learning_rate * s * O``, ``s = sqrt(max(1, A / B))``
       (``adjust_lr="original"``) or ``s = 0.2 * sqrt(max(A, B))``
       (``"match_rms_adamw"``)

    Every other parameter (vectors, scalars, 3-D kernels) takes AdamW, torch.optim's
    form, with the same learning rate and decay: ``m = adam_beta1 * m + (1 -
    adam_beta1) * g``; ``v = adam_beta2 * v + (1 - adam_beta2) * g**2``;
    ``w = w * (1 - learning_rate * weight_decay)``;
    ``w = w - learning_rate * m_hat / (sqrt(v_hat) + adam_epsilon)``.

    Paper: Keller Jordan et al., "Muon: An optimizer for hidden layers in neural
    networks" (2024); Liu et al., "Muon is Scalable for LLM Training" (2025) for
    ``match_rms_adamw``. Peer: ``torch.optim.Muon`` (2-D parameters) and
    ``torch.optim.AdamW`` (the others), same defaults except the decay. Differences:
    torch runs the Newton-Schulz iteration in bfloat16, xpoptim in the parameter's
    dtype (so the two agree to bfloat16 precision per step, and xpoptim is exact in
    float64); torch refuses parameters that are not 2-D, xpoptim gives them AdamW (as
    optax.contrib's ``muon`` gives them Adam); torch decays by 0.1 by default, xpoptim
    not at all (pass ``weight_decay=0.1`` for torch's default).

    Not elementwise (matmuls over whole matrices): it runs on whole arrays, and
    `OutOfCore` refuses it.

    Args:
        learning_rate: step size, or a schedule (see [schedules][xpoptim.schedules]).
            Defaults to 0.001.
        weight_decay: decoupled decay strength, >= 0. Defaults to 0 (off).
        momentum: momentum factor in [0, 1). Defaults to 0.95.
        nesterov: use Nesterov momentum. Defaults to True.
        ns_coefficients: the iteration's ``(a, b, c)``. Defaults to
            ``(3.4445, -4.775, 2.0315)``.
        ns_steps: the number of Newton-Schulz iterations, an int in [1, 100). Defaults
            to 5.
        epsilon: the floor of ``||u||_F``, > 0. Defaults to 1e-7.
        adjust_lr: ``"original"`` or ``"match_rms_adamw"``: the step's scale ``s`` by
            shape (torch's ``adjust_lr_fn``). Defaults to ``"original"``.
        adam_beta1: AdamW's ``beta1`` for the parameters that are not 2-D, in [0, 1).
            Defaults to 0.9.
        adam_beta2: AdamW's ``beta2``, in [0, 1). Defaults to 0.999.
        adam_epsilon: AdamW's ``epsilon``, > 0. Defaults to 1e-8.
        no_decay: names that are not decayed: patterns or a predicate. Defaults to the
            seed's ``("bias", "beta", "gamma")``.
        nonfinite: ``"propagate"`` (default), ``"skip"`` or ``"raise"``: what an update
            does with NaN/Inf gradients (see [Optimizer][xpoptim.Optimizer]).

    Examples:
        >>> import numpy as np
        >>> import xpoptim
        >>> opt = xpoptim.Muon(learning_rate=0.02)
        >>> params = {"w": np.eye(2), "b": np.zeros(2)}
        >>> grads = {"w": np.diag([4.0, 1.0]), "b": np.ones(2)}
        >>> params, state = opt.update(params, grads, opt.init(params))
        >>> np.round(np.diag(params["w"]), 3)  # both directions step alike, unlike g
        array([0.985, 0.985])
        >>> params["b"]  # AdamW: -learning_rate * sign(g) on the first step
        array([-0.02, -0.02])
    """

    State = MuonState
    _rule = staticmethod(_rules.muon)
    _hyperparameters = (
        "momentum",
        "nesterov",
        "ns_coefficients",
        "ns_steps",
        "epsilon",
        "adjust_lr",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
    )
    _buffer_shapes: ClassVar[dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]]] = {
        "velocities": _velocity_shape
    }

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any] = 0.001,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        *,
        nesterov: bool = True,
        ns_coefficients: Sequence[float] = NS_COEFFICIENTS,
        ns_steps: int = 5,
        epsilon: float = 1e-7,
        adjust_lr: str = "original",
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_epsilon: float = 1e-8,
        no_decay: Any = NOT_DECAYED,
        nonfinite: str = "propagate",
    ) -> None:
        self.momentum = momentum
        self.nesterov = nesterov
        # A tuple, so that a config read back from JSON (a list) compares equal.
        self.ns_coefficients = _coefficients(ns_coefficients)
        self.ns_steps = ns_steps
        self.epsilon = epsilon
        self.adjust_lr = adjust_lr
        self.adam_beta1 = adam_beta1
        self.adam_beta2 = adam_beta2
        self.adam_epsilon = adam_epsilon
        self.no_decay = no_decay
        self.nonfinite = nonfinite
        super().__init__(learning_rate, None, weight_decay)  # type: ignore[arg-type]

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        check.unit_interval(self.momentum, "momentum")
        check.flag(self.nesterov, "nesterov")
        _coefficients(self.ns_coefficients)
        if check.positive_integer(self.ns_steps, "ns_steps") >= 100:
            raise ValueError(f"ns_steps must be < 100, got {self.ns_steps}")
        check.positive(self.epsilon, "epsilon")
        if self.adjust_lr not in ADJUST_LR:
            raise ValueError(
                f"adjust_lr must be 'original' or 'match_rms_adamw', got {self.adjust_lr!r}"
            )
        check.unit_interval(self.adam_beta1, "adam_beta1")
        check.unit_interval(self.adam_beta2, "adam_beta2")
        check.positive(self.adam_epsilon, "adam_epsilon")

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (``ns_coefficients`` as a list, as JSON gives it back)."""
        config = super().get_config()
        config["ns_coefficients"] = list(self.ns_coefficients)
        return config

    def _step_scalars(self, step: Any) -> dict[str, Any]:
        lr = self._learning_rate(step)
        a, b, c = self.ns_coefficients
        b1, b2 = float(self.adam_beta1), float(self.adam_beta2)
        return {
            "learning_rate": lr,
            "momentum": float(self.momentum),
            "nesterov": self.nesterov,
            "ns_a": a,
            "ns_b": b,
            "ns_c": c,
            "ns_steps": int(self.ns_steps),
            "epsilon": float(self.epsilon),
            "match_rms_adamw": self.adjust_lr == "match_rms_adamw",
            "adam_beta1": b1,
            "adam_beta2": b2,
            "adam_epsilon": float(self.adam_epsilon),
            "adam_step_size": lr / (1.0 - b1**step),
            "adam_sqrt_bias_correction2": (1.0 - b2**step) ** 0.5,
        }

    def _param_scalars(self, name: str) -> dict[str, Any]:
        return {"decoupled_decay": self._decay(name)}
