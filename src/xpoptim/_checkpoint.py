"""Checkpoint files: an optimizer (config and state) and optionally its parameters, on disk.

The file is an uncompressed NumPy ``.npz`` (a zip of ``.npy`` members, each with a
CRC-32) with no pickled objects:

* member ``__xpoptim__``: UTF-8 JSON metadata as a 1-d ``uint8`` array::

      {"format": "xpoptim.checkpoint", "format_version": 1, "xpoptim_version": "...",
       "state": <a state dict (see xpoptim._state) whose arrays are replaced by member
                 names>,
       "params": {name: member} or null}

* members ``a0``, ``a1``, ...: the arrays, in host memory (a member name never depends on
  a parameter name, so any name is safe).

It is read with ``allow_pickle=False``. Writing is atomic: the file is written beside
the target under a temporary name, flushed and fsynced, renamed over the target with
``os.replace`` and the directory fsynced, so a crash at any moment leaves either the old
file or the new one. See ``docs/state.md``.
"""

from __future__ import annotations

import json
import numbers
import os
import zipfile
import zlib
from collections.abc import Mapping
from typing import IO, Any, NamedTuple

import numpy as np

from . import _state
from ._atomic import replace_atomically
from ._compat import Array, Namespace, array_namespace
from ._compat import device as device_of
from ._execution import place, to_host
from ._optimizers import Optimizer

FORMAT = "xpoptim.checkpoint"
#: The checkpoint file version this xpoptim writes, and the newest it reads.
FILE_VERSION = 1
META = "__xpoptim__"

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: not one, truncated, corrupt, or too new."""


class Checkpoint(NamedTuple):
    """What `load` returns.

    Attributes:
        optimizer: a new optimizer built from the saved config, whose ``step(layers)``
            continues from the saved state.
        state: that same state, for ``optimizer.update(params, grads, state)``.
        params: the saved parameters (``None`` if none were saved).
    """

    optimizer: Optimizer
    state: Any
    params: dict[str, Array] | None


def _json_default(value: Any) -> Any:
    # Hyperparameters given as NumPy scalars (validation accepts any real number).
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) in checkpoint metadata")


def _optimizer_types() -> dict[str, type[Optimizer]]:
    found: dict[str, type[Optimizer]] = {}
    todo = [Optimizer]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.setdefault(sub.__name__, sub)
            todo.append(sub)
    return found


def save(
    path: PathLike,
    opt: Optimizer,
    params: Any = None,
    *,
    state: Any = None,
) -> None:
    """Write ``opt``'s config and state (and ``params``) to ``path``, atomically.

    Args:
        path: the file to write (``.npz`` is the customary suffix; none is added).
        opt: the optimizer.
        params: optionally the parameters, ``{name: array}`` or the layers given to
            ``opt.step`` (named ``f"{layer_index}.{name}"``, like the state).
        state: a state from ``opt.init``/``opt.update``; by default the state kept by
            ``opt.step``.

    Lazy (Dask) arrays are computed, device arrays copied to the host. A crash at any
    moment leaves ``path`` as it was or complete; a leftover ``.<name>.*.tmp`` beside it
    can be deleted.
    """
    sd = opt.state_dict(state)
    arrays: dict[str, np.ndarray[Any, Any]] = {}

    def member(a: Array) -> str:
        key = f"a{len(arrays)}"
        arrays[key] = to_host(a)
        return key

    sd["buffers"] = {
        field: {name: member(a) for name, a in buffers.items()}
        for field, buffers in sd["buffers"].items()
    }
    saved_params = None
    if params is not None:
        saved_params = {name: member(p) for name, p in _state._as_params(opt, params).items()}
    from . import __version__

    meta = {
        "format": FORMAT,
        "format_version": FILE_VERSION,
        "xpoptim_version": __version__,
        "state": sd,
        "params": saved_params,
    }
    blob = json.dumps(meta, default=_json_default, allow_nan=False).encode("utf-8")
    arrays[META] = np.frombuffer(blob, dtype=np.uint8)

    def write(f: IO[bytes]) -> None:
        np.savez(f, allow_pickle=False, **arrays)

    replace_atomically(path, write)


def _read(path: PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """The metadata and arrays of a checkpoint file, with every decoding error as one."""
    name = os.fspath(path)
    try:
        # Our own handle: np.load leaks its own when a zip turns out broken.
        with open(name, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise CheckpointError(f"{name} is a single .npy array, not an xpoptim checkpoint")
            with loaded as z:
                if META not in z.files:
                    raise CheckpointError(
                        f"{name} has no {META!r} member: not an xpoptim checkpoint"
                    )
                arrays = {key: z[key] for key in z.files}
    except CheckpointError:
        raise
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        ValueError,
        KeyError,
        OSError,
    ) as exc:
        if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError):
            raise
        raise CheckpointError(
            f"{name} is not a readable xpoptim checkpoint (truncated or corrupt?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    blob = arrays.pop(META)
    try:
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise ValueError(f"metadata member has dtype {blob.dtype} and {blob.ndim} dims")
        meta = json.loads(blob.tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{name}: unreadable metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{name}: metadata is not that of an xpoptim checkpoint")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{name}: bad format_version {version!r}")
    if version > FILE_VERSION:
        raise CheckpointError(
            f"{name} has checkpoint format_version {version}, newer than this xpoptim reads "
            f"({FILE_VERSION}): upgrade xpoptim to load it"
        )
    return meta, arrays


def _resolve(
    name: str, refs: Any, arrays: Mapping[str, np.ndarray[Any, Any]], used: set[str], what: str
) -> dict[str, np.ndarray[Any, Any]]:
    if not isinstance(refs, Mapping):
        raise CheckpointError(f"{name}: metadata {what} must map names to members")
    out = {}
    for key, ref in refs.items():
        if not isinstance(ref, str) or ref not in arrays:
            raise CheckpointError(f"{name}: {what}[{key!r}] names a missing member {ref!r}")
        used.add(ref)
        out[key] = arrays[ref]
    return out


def _place_params(
    opt: Optimizer,
    params_np: Mapping[str, np.ndarray[Any, Any]],
    like: Any,
    xp: Namespace | None,
    device: Any,
) -> dict[str, Array]:
    """The saved parameters, placed like ``like``, or in ``xp`` (NumPy by default)."""
    if like is None:
        target = xp if xp is not None else array_namespace(np.empty(0))
        return {key: place(a, target, device=device) for key, a in params_np.items()}
    targets = _state._as_params(opt, like)
    _state._keys(params_np.keys(), targets.keys(), "like, against the saved params")
    placed = {}
    for key, a in params_np.items():
        p = targets[key]
        if tuple(p.shape) != a.shape:
            raise _state.StateDictError(
                f"saved params[{key!r}] has shape {a.shape}, like {tuple(p.shape)}"
            )
        placed[key] = place(a, array_namespace(p), dtype=p.dtype, device=device_of(p), like=p)
    return placed


def load(
    path: PathLike,
    like: Any = None,
    *,
    xp: Namespace | None = None,
    device: Any = None,
) -> Checkpoint:
    """Read a checkpoint written by `save`.

    Args:
        path: the file.
        like: optionally the parameters (``{name: array}`` or layers) to place the state
            (and saved params) like: each array takes its parameter's namespace, device,
            dtype (and Dask chunks), and names and shapes must match.
        xp: without ``like``, the namespace to load into (NumPy by default).
        device: with ``xp``, the device.

    Returns:
        ``Checkpoint(optimizer, state, params)``. Without ``like`` the state follows the
        saved params when there are some; if there are none, ``optimizer.step`` places
        the buffers like the parameters it is given.

    Raises:
        CheckpointError: the file is not a complete, valid checkpoint for this version
            (the message says why); ``FileNotFoundError`` if it does not exist.
    """
    name = os.fspath(path)
    meta, arrays = _read(path)
    used: set[str] = set()
    sd = meta.get("state")
    if not isinstance(sd, dict) or not isinstance(sd.get("buffers"), Mapping):
        raise CheckpointError(f"{name}: metadata has no state dict")
    sd = dict(sd)
    sd["buffers"] = {
        field: _resolve(name, refs, arrays, used, f"state buffers {field!r}")
        for field, refs in sd["buffers"].items()
    }
    params_np = None
    if meta.get("params") is not None:
        params_np = _resolve(name, meta["params"], arrays, used, "params")
    if unused := sorted(set(arrays) - used):
        raise CheckpointError(f"{name}: members {unused} are not named by the metadata")
    kind = sd.get("optimizer")
    cls = _optimizer_types().get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise CheckpointError(f"{name}: unknown optimizer type {kind!r}")
    config = sd.get("config")
    try:
        opt = cls.from_config(config)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{name}: the saved config does not build a {kind}: {exc}") from exc

    try:
        params = None if params_np is None else _place_params(opt, params_np, like, xp, device)
        if like is None and params:
            # Buffers follow the loaded parameters now, and the layers of step() later.
            _state.load_state_dict(opt, sd, params, provisional=True)
        else:
            opt.load_state_dict(sd, like, xp=xp, device=device)
    except _state.StateDictError as exc:
        raise CheckpointError(f"{name}: {exc}") from exc
    return Checkpoint(opt, opt.state, params)
