"""State dicts: an optimizer's state as a plain, versioned, backend-free nested dict, and back.

The format (``format_version`` 1)::

    {
        "format_version": 1,            # int; readers refuse a newer one
        "optimizer": "Adam",            # the class name
        "config": {...},                # opt.get_config(): JSON-able Python scalars
        "step": 12,                     # updates applied (Adam's bias-correction count)
        "skipped": 0,                   # updates skipped by nonfinite="skip"
        "buffers": {                    # one entry per state buffer of the optimizer
            "momentums": {"0.weights": array, ...},
            "velocities": {"0.weights": array, ...},
        },
    }

Arrays may belong to any Array API namespace and device; a load places each buffer on
its parameter's namespace, device and dtype (casting like ``torch.optim``'s
``load_state_dict``). Every check runs before anything changes. See ``docs/state.md``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Protocol

from ._compat import Array, Namespace, array_namespace, is_array_api_obj
from ._compat import device as device_of
from ._execution import place, relayout_state, updates_in_place

#: The version this xpoptim writes, and the newest it reads.
FORMAT_VERSION = 1
#: The state's counters; every other field of a state NamedTuple is a per-parameter buffer.
COUNTERS = ("step", "skipped")
KEYS = ("format_version", "optimizer", "config", "step", "skipped", "buffers")


class Optimizer(Protocol):
    """What this module needs of an optimizer (`xpoptim.Optimizer` has it all).

    A protocol, so that the optimizers import this module and not the other way round.
    """

    #: the state NamedTuple type
    State: ClassVar[type[Any]]
    nonfinite: str
    #: the state kept by ``step(layers)``, and the names of its buffers not yet placed
    _state: Any
    _unplaced: set[str]

    def get_config(self) -> dict[str, Any]: ...

    #: buffers not shaped like their parameter: field -> buffer shape of a parameter shape
    _buffer_shapes: ClassVar[Mapping[str, Any]]

    def _buffer_fields(self) -> tuple[str, ...]: ...

    def _buffer_shape(self, field: str, shape: tuple[int, ...]) -> tuple[int, ...]: ...

    def _param_scalars(self, name: str) -> dict[str, Any]: ...

    def _collect(self, layers: Iterable[Any]) -> tuple[dict[str, Array], dict[str, Array]]: ...


class StateDictError(ValueError):
    """A state dict (or checkpoint) that cannot be loaded into this optimizer."""


def buffer_fields(state_type: type[Any]) -> tuple[str, ...]:
    """The per-parameter buffer fields of a state NamedTuple type, in order (an optimizer's
    options may leave some unused: ``opt._buffer_fields()`` lists those in use)."""
    return tuple(f for f in state_type._fields if f not in COUNTERS)


def _counter(value: Any, what: str) -> int:
    """A state counter as a Python int (computing a lazy 0-d array)."""
    try:
        return int(value)
    except Exception as exc:  # a tracer under jax.jit raises its own error type
        raise TypeError(
            f"state.{what} is {type(value).__name__}, which has no concrete value here "
            "(a state dict is taken outside jax.jit)"
        ) from exc


def _snapshot(a: Array) -> Array:
    """``a``, or a copy of it if later steps could change it in place."""
    if updates_in_place(a):
        return array_namespace(a).asarray(a, copy=True)
    return a


def state_to_dict(opt: Optimizer, state: Any) -> dict[str, Any]:
    """``state`` of ``opt`` as a versioned plain dict (the format above).

    Args:
        opt: the optimizer the state belongs to.
        state: its state (from ``init``/``update``), or ``None`` for an empty one.

    Returns:
        A new dict; its arrays are copies wherever the state could later be updated in
        place (immutable JAX and lazy Dask arrays are shared, they cannot change).
        Lazy counters are computed (two integers).
    """
    fields = opt._buffer_fields()
    buffers: dict[str, dict[str, Array]]
    if state is None:
        step, skipped, buffers = 0, 0, {field: {} for field in fields}
    else:
        if not isinstance(state, opt.State):
            raise TypeError(
                f"state must be a {opt.State.__name__} of {type(opt).__name__}, "
                f"got {type(state).__name__}"
            )
        step = _counter(state.step, "step")
        skipped = 0 if state.skipped is None else _counter(state.skipped, "skipped")
        buffers = {
            field: {name: _snapshot(a) for name, a in getattr(state, field).items()}
            for field in fields
        }
    return {
        "format_version": FORMAT_VERSION,
        "optimizer": type(opt).__name__,
        "config": opt.get_config(),
        "step": step,
        "skipped": skipped,
        "buffers": buffers,
    }


# -- validation ---------------------------------------------------------------------------


def _keys(expected: Iterable[str], got: Iterable[Any], what: str) -> None:
    expected, got = set(expected), set(got)
    if expected != got:
        parts = []
        if missing := sorted(map(str, expected - got)):
            parts.append(f"missing {missing}")
        if extra := sorted(map(str, got - expected)):
            parts.append(f"unexpected {extra}")
        raise StateDictError(f"{what}: " + ", ".join(parts))


def _int(sd: Mapping[str, Any], key: str) -> int:
    value = sd[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise StateDictError(f"state_dict[{key!r}] must be an int, got {value!r}")
    if value < 0:
        raise StateDictError(f"state_dict[{key!r}] must be >= 0, got {value}")
    return int(value)


def parse(opt: Optimizer, sd: Any) -> tuple[int, int, dict[str, dict[str, Array]]]:
    """Check ``sd`` for ``opt`` without any parameters; return ``(step, skipped, buffers)``.

    Raises:
        StateDictError: with a message naming the problem.
    """
    if not isinstance(sd, Mapping):
        raise StateDictError(f"a state dict must be a mapping, got {type(sd).__name__}")
    if "format_version" not in sd:
        raise StateDictError("state_dict has no 'format_version': not an xpoptim state dict")
    version = _int(sd, "format_version")
    if version > FORMAT_VERSION:
        raise StateDictError(
            f"state_dict has format_version {version}, newer than this xpoptim reads "
            f"({FORMAT_VERSION}): upgrade xpoptim to load it"
        )
    if version < 1:
        raise StateDictError(f"state_dict has format_version {version}; versions start at 1")
    _keys(KEYS, sd.keys(), "state_dict keys")
    kind = sd["optimizer"]
    if kind != type(opt).__name__:
        raise StateDictError(f"state_dict is for optimizer {kind!r}, not {type(opt).__name__!r}")
    config = sd["config"]
    if not isinstance(config, Mapping) or config.get("type", kind) != kind:
        raise StateDictError(f"state_dict['config'] must be the get_config() of a {kind}")
    step, skipped = _int(sd, "step"), _int(sd, "skipped")
    buffers = sd["buffers"]
    if not isinstance(buffers, Mapping):
        raise StateDictError(f"state_dict['buffers'] must be a mapping, got {type(buffers)}")
    fields = opt._buffer_fields()
    _keys(fields, buffers.keys(), f"state_dict['buffers'] fields of {kind}")
    names: set[str] | None = None
    shapes: dict[str, tuple[int, ...]] = {}
    for field in fields:
        arrays = buffers[field]
        where = f"state_dict['buffers'][{field!r}]"
        if not isinstance(arrays, Mapping):
            raise StateDictError(f"{where} must map names to arrays, got {type(arrays)}")
        if names is None:
            names = set(arrays)
        else:
            _keys(names, arrays.keys(), f"{where} names (against {fields[0]!r})")
        for name, a in arrays.items():
            label = f"{where}[{name!r}]"
            if not isinstance(name, str):
                raise StateDictError(f"{where} has a key {name!r} that is not a str")
            if not is_array_api_obj(a):
                raise StateDictError(f"{label} is not an array: {type(a).__name__}")
            if not array_namespace(a).isdtype(a.dtype, "real floating"):
                raise StateDictError(f"{label} has dtype {a.dtype}, not real floating")
            shape = tuple(a.shape)
            if field in opt._buffer_shapes:
                continue  # not shaped like its parameter: checked against it at placement
            if shapes.setdefault(name, shape) != shape:
                raise StateDictError(
                    f"{label} has shape {shape}, but {fields[0]!r} has {shapes[name]} "
                    "for the same parameter"
                )
    return step, skipped, {field: dict(buffers[field]) for field in fields}


def _as_params(opt: Optimizer, like: Any) -> Mapping[str, Array]:
    """``like`` as ``{name: array}``: a mapping as it is, layers by ``step``'s names."""
    if isinstance(like, Mapping):
        return like
    params, _ = opt._collect(like)
    return params


def _match(
    opt: Optimizer, buffers: Mapping[str, Mapping[str, Array]], params: Mapping[str, Array]
) -> None:
    for field, arrays in buffers.items():
        _keys(params.keys(), arrays.keys(), f"state_dict['buffers'][{field!r}] names vs params")
        for name, a in arrays.items():
            p = params[name]
            if not is_array_api_obj(p):
                raise StateDictError(f"params[{name!r}] is not an array: {type(p).__name__}")
            expected = opt._buffer_shape(field, tuple(p.shape))
            if tuple(a.shape) != expected:
                raise StateDictError(
                    f"state_dict['buffers'][{field!r}][{name!r}] has shape {tuple(a.shape)}, "
                    f"{_wanted(expected, p)}"
                )
            if not array_namespace(p).isdtype(p.dtype, "real floating"):
                raise StateDictError(f"params[{name!r}] has dtype {p.dtype}, not real floating")


def _wanted(expected: tuple[int, ...], p: Array) -> str:
    """What a buffer's shape should have been, for an error message."""
    if expected == tuple(p.shape):
        return f"the parameter {expected}"
    return f"not {expected} (the shape it takes for a parameter of shape {tuple(p.shape)})"


def _like_param(a: Array, p: Array) -> Array:
    """``a`` on ``p``'s namespace, device and dtype (and Dask chunks, if shaped like ``p``)."""
    like = p if tuple(a.shape) == tuple(p.shape) else None
    return place(a, array_namespace(p), dtype=p.dtype, device=device_of(p), like=like)


def _relayout(
    opt: Optimizer, params: Mapping[str, Array], buffers: Mapping[str, Mapping[str, Array]]
) -> dict[str, dict[str, Array]]:
    """``buffers`` in the memory layout ``init`` makes (the fields shaped like their
    parameters; the others as they are)."""
    fields = [f for f in buffers if f not in opt._buffer_shapes]
    xp_params = array_namespace(*params.values())
    laid_out = relayout_state(params, [buffers[f] for f in fields], opt._param_scalars, xp_params)
    out = {field: dict(arrays) for field, arrays in buffers.items()}
    out.update(zip(fields, laid_out, strict=True))
    return out


def state_from_dict(
    opt: Optimizer,
    sd: Mapping[str, Any],
    like: Any = None,
    *,
    xp: Namespace | None = None,
    device: Any = None,
) -> Any:
    """The state NamedTuple of ``opt`` described by ``sd`` (the inverse of `state_to_dict`).

    Args:
        opt: the optimizer (its type must be the dict's).
        sd: a state dict, from any backend or device.
        like: the parameters, ``{name: array}`` (or the layers of ``step``): names and
            shapes must match, and each buffer takes its parameter's namespace, device,
            dtype (and Dask chunks).
        xp: without ``like``, the target namespace (dtypes kept).
        device: with ``xp``, the target device.

    Returns:
        A new state whose arrays share no memory with ``sd``. Without ``like`` or ``xp``
        each buffer is copied in its own namespace and on its own device.

    Raises:
        StateDictError: the dict does not fit ``opt`` or ``like``; nothing was changed.
    """
    step, skipped, buffers = parse(opt, sd)
    if like is not None:
        params = _as_params(opt, like)
        _match(opt, buffers, params)
        placed = {
            field: {name: _like_param(a, params[name]) for name, a in arrays.items()}
            for field, arrays in buffers.items()
        }
        # NumPy: in the layout init() makes, so the fast path steps it as fast as a new one.
        placed = _relayout(opt, params, placed)
    elif xp is not None:
        placed = {
            field: {name: place(a, xp, device=device) for name, a in arrays.items()}
            for field, arrays in buffers.items()
        }
    else:  # a copy where each buffer is (Dask chunks kept)
        placed = {
            field: {
                name: place(a, array_namespace(a), device=device_of(a), like=a)
                for name, a in arrays.items()
            }
            for field, arrays in buffers.items()
        }
    # Policies other than "skip" count nothing (None), unless there is a count to keep.
    count = skipped if skipped or opt.nonfinite == "skip" else None
    return opt.State(step=step, skipped=count, **placed)


def load_state_dict(
    opt: Optimizer,
    sd: Mapping[str, Any],
    like: Any = None,
    *,
    xp: Namespace | None = None,
    device: Any = None,
    provisional: bool = False,
) -> None:
    """Make ``sd`` the state that ``opt.step(layers)`` continues from (all checks first).

    Shapes are checked wherever they are known: against ``like``, and against the state
    the optimizer keeps now (a buffer of a parameter it has seen must keep its shape).
    Without ``like`` (or with ``provisional``: ``like`` are not the parameters that
    ``step`` will see), the buffers are placed like their parameters when ``step`` first
    sees them (`adopt`), after their shapes are checked again.
    """
    state = state_from_dict(opt, sd, like, xp=xp, device=device)
    if opt._state is not None:
        for field in opt._buffer_fields():
            current = getattr(opt._state, field)
            for name, a in getattr(state, field).items():
                if name in current and tuple(a.shape) != tuple(current[name].shape):
                    raise StateDictError(
                        f"state_dict['buffers'][{field!r}][{name!r}] has shape "
                        f"{tuple(a.shape)}, but this optimizer's state for that parameter has "
                        f"{tuple(current[name].shape)}; nothing was loaded"
                    )
    names = set().union(*(getattr(state, f).keys() for f in opt._buffer_fields()))
    opt._state = state
    opt._unplaced = names if like is None or provisional else set()


def adopt(opt: Optimizer, params: Mapping[str, Array]) -> None:
    """Place the loaded buffers of the names in ``params`` like their parameters.

    Called by ``step`` before it uses a loaded state. Shapes are all checked before the
    state is replaced; buffers already of the parameter's namespace, device and dtype
    are kept (they were copied at load).
    """
    names = opt._unplaced & params.keys()
    if not names:
        return
    fields = opt._buffer_fields()
    state = opt._state
    for field in fields:
        for name in names:
            a, p = getattr(state, field)[name], params[name]
            expected = opt._buffer_shape(field, tuple(p.shape))
            if tuple(a.shape) != expected:
                raise StateDictError(
                    f"loaded state {field}[{name!r}] has shape {tuple(a.shape)}, "
                    f"{_wanted(expected, p)}"
                )

    def fits(a: Array, p: Array) -> bool:
        return bool(
            array_namespace(a) is array_namespace(p)
            and a.dtype == p.dtype
            and device_of(a) == device_of(p)
        )

    new = {
        field: {
            name: (
                _like_param(a, params[name]) if name in names and not fits(a, params[name]) else a
            )
            for name, a in getattr(state, field).items()
        }
        for field in fields
    }
    # NumPy: in the layout init() makes, so the fast path steps it as fast as a new one.
    placed = {name: p for name, p in params.items() if name in names}
    laid_out = _relayout(opt, placed, {f: {n: new[f][n] for n in placed} for f in fields})
    for field, buffers in laid_out.items():
        new[field].update(buffers)
    opt._state = opt.State(step=state.step, skipped=state.skipped, **new)
    opt._unplaced = opt._unplaced - names
