"""The torch.optim face: any xpoptim optimizer as a ``torch.optim.Optimizer``.

``Optimizer(model.named_parameters(), xpoptim.Adam(...))`` is a ``torch.optim.Optimizer``
that runs the xpoptim optimizer (or wrapper: `xpoptim.transforms.Clipped`,
`xpoptim.transforms.MultiSteps`, ...) on the parameters' ``.grad``, so everything written
for torch.optim works unchanged:

* ``param_groups[i]["lr"]`` *is* the learning rate of group ``i``'s next step:
  ``torch.optim.lr_scheduler`` schedulers, which set it, drive the xpoptim optimizer;
  the other hyperparameters of the optimizer (its constructor arguments: ``weight_decay``,
  ``momentum``, ``beta1``, ...) are group entries too, read at every step;
* ``torch.amp.GradScaler`` (``scaler.step(opt)`` unscales, then calls ``step()`` or skips it),
  ``torch.nn.utils.clip_grad_norm_``, ``zero_grad``, closures;
* ``state_dict``/``load_state_dict``: the state lives in ``opt.state[p]`` as torch.optim's
  does (one entry per state field and counter, see `xpoptim.faces._state_tree`), so
  torch's checkpoints, device moves and dtype casts apply.

Parameters without a gradient are skipped, as torch.optim skips them, and each parameter
counts its own steps (as torch.optim's ``state[p]["step"]``): parameters with different
counts are stepped in separate ``update`` calls.

Parameter names: with ``model.named_parameters()`` the xpoptim optimizer sees the module's
names, so its ``no_decay`` rule (by default: names containing bias, beta or gamma are not
regularized, the seed's rule) applies; with ``model.parameters()`` the names are the
positions ``"0"``, ``"1"``, ... and every parameter is regularized, as in torch.optim.

Importing this module imports torch; ``import xpoptim`` does not.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .. import schedules as _schedules
from ..transforms import ParamGroups
from . import _state_tree

__all__ = ["Optimizer"]


def _rate_owner(optimizer: Any) -> Any:
    """The object whose ``learning_rate`` the face sets: the optimizer, or the one a
    wrapper wraps (followed through ``.optimizer``)."""
    node = optimizer
    while not hasattr(node, "learning_rate"):
        node = getattr(node, "optimizer", None)
        if node is None:
            raise TypeError(
                f"{type(optimizer).__name__} has no learning_rate (nor wraps an optimizer "
                "that has one): the face maps param_groups' 'lr' to it"
            )
    return node


def _replace_rate_owner(member: Any, old: Any, new: Any) -> Any:
    """``member`` with ``old`` (its rate owner) replaced by ``new``."""
    if member is old:
        return new
    node = member
    while node.optimizer is not old:
        node = node.optimizer
    node.optimizer = new
    return member


def _hyperparameters(owner: Any) -> dict[str, Any]:
    """The constructor arguments of ``owner`` but its learning rate, with their values
    (the attributes of the same names): what a parameter group may set."""
    signature = inspect.signature(type(owner).__init__)
    return {
        name: getattr(owner, name)
        for name, parameter in signature.parameters.items()
        if name not in ("self", "learning_rate")
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        and hasattr(owner, name)
    }


def _check_xpoptim(optimizer: Any) -> None:
    if not all(callable(getattr(optimizer, m, None)) for m in ("init", "update", "get_config")):
        raise TypeError(
            "optimizer must be an xpoptim optimizer or wrapper (with init, update and "
            f"get_config), got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, ParamGroups):
        raise TypeError(
            "optimizer must not be a ParamGroups: give torch parameter groups instead, "
            "as dicts with 'params' and the entries that differ ('lr', 'weight_decay', ...)"
        )


class Optimizer(torch.optim.Optimizer):  # type: ignore[misc]
    """A ``torch.optim.Optimizer`` that steps with an xpoptim optimizer.

    Each step runs, per parameter group ``i`` (its own copy of ``optimizer`` with the group's
    hyperparameters, ``learning_rate = param_groups[i]["lr"]``)::

        params, state = optimizer.update({name: p}, {name: p.grad}, state)

    on the parameters that have a gradient, under ``torch.no_grad()``, writing the new
    values into the parameters. The results are those of ``update`` itself: the same
    formulas (written out in each optimizer's docstring), in the parameters' dtype.

    Args:
        params: ``model.parameters()``, ``model.named_parameters()`` (the names reach
            ``no_decay``), or parameter groups: dicts with ``"params"`` and the entries
            that differ from the defaults, among ``"lr"`` and the optimizer's constructor
            arguments (for a wrapper, those of the optimizer it wraps).
        optimizer: any xpoptim optimizer or wrapper, with a number as learning rate
            (schedules are torch's here: ``torch.optim.lr_scheduler``). It is copied per
            group; the object given is not changed.

    Raises:
        TypeError: ``optimizer`` is not an xpoptim optimizer, is a
            `xpoptim.transforms.ParamGroups` (use torch's groups), or has a schedule as
            learning rate.

    Examples:
        >>> import torch
        >>> import xpoptim
        >>> from xpoptim.faces.torch import Optimizer
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = Optimizer(model.named_parameters(), xpoptim.Adam(learning_rate=0.01))
        >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        >>> loss = model(torch.ones(4, 3)).pow(2).mean()
        >>> loss.backward()
        >>> opt.step()
        >>> scheduler.step()
        >>> opt.zero_grad()
        >>> sorted(opt.state_dict()["state"][0])
        ['momentums', 'step', 'velocities']
    """

    def __init__(self, params: Iterable[Any], optimizer: Any) -> None:
        _check_xpoptim(optimizer)
        owner = _rate_owner(optimizer)
        rate = owner.learning_rate
        if callable(rate) or isinstance(rate, Mapping):
            raise TypeError(
                f"optimizer's learning_rate is a schedule ({rate!r}): in a torch training "
                "loop, give a number and schedule it with torch.optim.lr_scheduler (its "
                "param_groups[i]['lr'] is the learning rate of each step)"
            )
        config = _hyperparameters(owner)
        #: the hyperparameters a group may set, besides "lr"
        self._hyper_names = tuple(config)
        self.optimizer = optimizer
        #: per group: (its copy of the optimizer, that copy's rate owner, the
        #: hyperparameters it was built with)
        self._members: list[tuple[Any, Any, dict[str, Any]]] = []
        #: per (group, parameter names): the structure of their state
        self._specs: dict[tuple[int, tuple[str, ...]], _state_tree.Spec] = {}
        defaults = {"lr": float(rate), **{k: config[k] for k in self._hyper_names}}
        super().__init__(params, defaults)

    # -- one copy of the optimizer per group, with the group's settings -----------------

    def _member(self, index: int, group: Mapping[str, Any]) -> Any:
        """Group ``index``'s optimizer, set to the group's hyperparameters and ``lr``.

        Checks them (and raises, naming the group) without changing any state.
        """
        while len(self._members) <= index:
            member = copy.deepcopy(self.optimizer)
            owner = _rate_owner(member)
            self._members.append((member, owner, _hyperparameters(owner)))
        member, owner, built = self._members[index]
        where = f"param_groups[{index}]"
        hyper = {k: group[k] for k in self._hyper_names if k in group}
        try:
            if any(built.get(k) != v for k, v in hyper.items()):
                new_owner = type(owner)(**{**built, **hyper, "learning_rate": float(group["lr"])})
                member = _replace_rate_owner(member, owner, new_owner)
                owner, built = new_owner, _hyperparameters(new_owner)
                self._members[index] = (member, owner, built)
                # Other settings may keep other buffers: the structures are found anew.
                self._specs = {k: v for k, v in self._specs.items() if k[0] != index}
            lr = group["lr"]
            lr = float(lr) if isinstance(lr, torch.Tensor) else lr
            owner.learning_rate = _schedules.check_learning_rate(lr)
            if callable(owner.learning_rate):
                raise TypeError(f"'lr' must be a number, got {lr!r}")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        return member

    @staticmethod
    def _names(index: int, group: Mapping[str, Any]) -> list[str]:
        names = group.get("param_names")
        if names is None:
            return [str(i) for i in range(len(group["params"]))]
        if len(set(names)) != len(names):
            raise ValueError(f"param_groups[{index}] names a parameter twice: {names}")
        return [str(n) for n in names]

    # -- the step ----------------------------------------------------------------------

    @torch.no_grad()  # type: ignore[untyped-decorator,unused-ignore]
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient.

        Every group's hyperparameters and gradients (sparse ones are refused) are checked
        before any parameter changes; then each set of parameters is one ``update`` call,
        which checks its state before changing anything.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for index, group in enumerate(self.param_groups):
            member = self._member(index, group)
            active = []
            for name, p in zip(self._names(index, group), group["params"], strict=True):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"param_groups[{index}] parameter {name!r} has a sparse gradient: "
                        "xpoptim steps dense gradients only"
                    )
                active.append((name, p))
            work.append((index, member, active))
        for index, member, active in work:
            for names, tensors in self._by_counters(active):
                self._update(index, member, names, tensors)
        return loss

    def _by_counters(self, active: list[tuple[str, Any]]) -> list[tuple[list[str], list[Any]]]:
        """The parameters in sets that share their counters (step, ...), each one update."""
        sets: dict[tuple[Any, ...], tuple[list[str], list[Any]]] = {}
        for name, p in active:
            stored = self.state.get(p) or {}
            # The counters: Python ints (or 0-d integer tensors), not the buffers.
            key = tuple(
                sorted(
                    (k, int(v) if isinstance(v, torch.Tensor) else v)
                    for k, v in stored.items()
                    if not isinstance(v, torch.Tensor)
                    or (v.ndim == 0 and not v.is_floating_point())
                )
            )
            names, tensors = sets.setdefault(key, ([], []))
            names.append(name)
            tensors.append(p)
        return list(sets.values())

    def _update(self, index: int, member: Any, names: list[str], tensors: list[Any]) -> None:
        params = dict(zip(names, tensors, strict=True))
        grads = {name: p.grad for name, p in params.items()}
        key = (index, tuple(names))
        first = tensors[0]
        if not self.state.get(first):
            state = member.init(params)
            self._specs[key] = _state_tree.spec_of(state, names)
        else:
            spec = self._specs.get(key)
            if spec is None:
                spec = self._specs[key] = _state_tree.spec_of(member.init(params), names)
            per_param = {name: self.state[p] for name, p in params.items()}
            scalars = self.state[first]
            try:
                state = _state_tree.join(spec, per_param, scalars)
            except KeyError:
                # The group's settings now keep a buffer the stored state lacks (say
                # RMSprop's momentum turned on): zeros for it, as for a new parameter.
                fresh_per, fresh_scalars = _state_tree.split(spec, member.init(params))
                per_param = {n: {**fresh_per.get(n, {}), **per_param[n]} for n in params}
                state = _state_tree.join(spec, per_param, {**fresh_scalars, **scalars})
        new_params, new_state = member.update(params, grads, state)
        for name, p in params.items():
            new = new_params[name]
            if new is not p and new.data_ptr() != p.data_ptr():
                p.copy_(new)
        per_param, scalars = _state_tree.split(self._specs[key], new_state)
        # None leaves (unused fields: max_velocities without amsgrad) are not stored.
        kept = {path: value for path, value in scalars.items() if value is not None}
        for name, p in params.items():
            self.state[p] = {**per_param.get(name, {}), **kept}

    # -- checkpoints ---------------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """torch.optim's ``load_state_dict``, refusing a state of another optimizer.

        Each saved parameter state must have the entries this optimizer keeps (say
        ``momentums`` and ``velocities`` for Adam); a mismatch raises before anything
        changes. The buffers are then cast to their parameter's dtype and device, as
        torch.optim does.

        Raises:
            ValueError: the saved entries are not this optimizer's.
        """
        expected = [self._entries(i, g) for i, g in enumerate(self.param_groups)]
        for key, saved in dict(state_dict.get("state", {})).items():
            if not any(required <= set(saved) <= allowed for required, allowed in expected):
                wanted = " or ".join(str(sorted(required)) for required, _ in expected)
                raise ValueError(
                    f"state_dict['state'][{key!r}] has entries {sorted(saved)}, but "
                    f"{type(self.optimizer).__name__} keeps {wanted}: it was saved by "
                    "another optimizer or with other settings"
                )
        super().load_state_dict(state_dict)
        self._specs.clear()

    def _entries(self, index: int, group: Mapping[str, Any]) -> tuple[set[str], set[str]]:
        """The entries one parameter's state of group ``index`` must have, and may have
        (its None leaves are not stored)."""
        probe = {"p": torch.zeros(1, dtype=torch.float64)}
        state = self._member(index, group).init(probe)
        per_param, scalars = _state_tree.split(_state_tree.spec_of(state, probe), state)
        required = set(per_param.get("p", {})) | {k for k, v in scalars.items() if v is not None}
        return required, required | set(scalars)
