"""What an update does when a gradient holds NaN or Inf: the ``nonfinite`` policy.

* ``"propagate"`` -- nothing is checked (no cost); the non-finite values flow into the
  parameters and state, as in mpneuralnetwork and torch.optim. The default.
* ``"skip"`` -- the whole update is skipped for every parameter when any gradient
  element is non-finite: parameters, buffers and ``state.step`` stay as they were and
  ``state.skipped`` grows by one (like optax's ``apply_if_finite`` and the skipped steps
  of torch's ``GradScaler``). On arrays whose values can be read cheaply (NumPy, CuPy,
  PyTorch, array-api-strict) it costs one reduction over the gradients and one read of
  a boolean, and a skipped update computes nothing else. On lazy or traced arrays
  (Dask, JAX, also under ``jax.jit``) nothing is read: the update is computed and the
  result chosen with ``xp.where``, so Dask builds no extra compute pass and ``jax.jit``
  traces one program; there the counters become 0-d integer arrays.
* ``"raise"`` -- the same reduction, then an error naming every offending parameter
  before anything changes. It needs the values, so lazy and traced arrays are refused
  (use ``"skip"``).

The reduction and the reading are backend-aware execution, so they live here and in
`xpoptim._execution`, never in the rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._compat import Array, Namespace
from ._execution import select as select_tree
from ._execution import values_readable

POLICIES = ("propagate", "skip", "raise")


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf and the optimizer's policy is ``nonfinite="raise"``."""


def check_policy(value: Any) -> str:
    """``value``, checked to be one of `POLICIES`."""
    if not isinstance(value, str) or value not in POLICIES:
        raise ValueError(f"nonfinite must be one of {list(POLICIES)}, got {value!r}")
    return value


def initial_count(policy: str) -> int | None:
    """The ``skipped`` counter of a new state: 0 under ``"skip"``, else ``None``.

    ``None`` holds no array, so the policies that never skip add no leaf to the state
    that ``jax.jit`` traces (a jitted update compiles once, as before).
    """
    return 0 if policy == "skip" else None


def _finite_flag(grads: Mapping[str, Array], xp: Namespace) -> Array:
    """A 0-d boolean array: whether every element of every gradient is finite."""
    flags = [xp.all(xp.isfinite(g)) for g in grads.values()]
    return xp.all(xp.stack(flags)) if len(flags) > 1 else flags[0]


def all_finite(policy: str, grads: Mapping[str, Array], xp: Namespace) -> Any:
    """Apply the policy's check to ``grads`` (run after validation, before any change).

    Returns:
        ``None`` for ``"propagate"`` or no gradients (nothing checked); a Python bool when
        the values were read; for ``"skip"`` on lazy or traced arrays, a 0-d boolean array
        to give to `select`.

    Raises:
        NonFiniteGradientError: ``"raise"`` and a gradient is not finite.
        TypeError: ``"raise"`` on lazy or traced arrays.
    """
    if policy == "propagate" or not grads:
        return None
    first = next(iter(grads.values()))
    readable = values_readable(first)
    if policy == "raise" and not readable:
        raise TypeError(
            "nonfinite='raise' must read the gradients' values, which lazy or traced "
            f"arrays ({type(first).__module__}.{type(first).__name__}) do not allow "
            "without computing them; use nonfinite='skip', which selects lazily"
        )
    flag = _finite_flag(grads, xp)
    if not readable:
        return flag
    finite = bool(flag)
    if not finite and policy == "raise":
        bad = [name for name, g in grads.items() if not bool(xp.all(xp.isfinite(g)))]
        raise NonFiniteGradientError(
            f"non-finite (NaN or Inf) values in the gradient of {', '.join(map(repr, bad))}; "
            "nothing was updated (nonfinite='raise')"
        )
    return finite


def select(
    finite: Array, new: tuple[Any, Any], old: tuple[Any, Any], xp: Namespace
) -> tuple[dict[str, Array], Any]:
    """``new`` where ``finite`` holds, ``old`` otherwise, for ``(params, state)`` pairs.

    ``new`` is the update computed as if the gradients were finite; the step counter
    advances only with it and ``skipped`` only without it. Lazy: nothing is computed.
    """
    new_params, new_state = new
    old_params, old_state = old
    count = 0 if old_state.skipped is None else old_state.skipped
    chosen: tuple[dict[str, Array], Any] = select_tree(
        finite,
        (new_params, new_state._replace(skipped=count)),
        (old_params, old_state._replace(skipped=count + 1)),
        xp,
    )
    return chosen
