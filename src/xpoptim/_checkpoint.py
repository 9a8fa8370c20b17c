"""Checkpoint files: an optimizer (config and state) and optionally its parameters, on disk.

A checkpoint (file ``format_version`` 2) is a safetensors file (see ``_safetensors``): a
length-prefixed JSON header, then the arrays' raw bytes, uncompressed, nothing pickled.

* the arrays are tensors ``a0``, ``a1``, ... (a name never depends on a parameter name, so
  any parameter name is safe), float16/32/64 in host memory;
* the header's ``__metadata__`` holds three strings: ``"format": "xpoptim.checkpoint"``,
  ``"xpoptim"``: the JSON metadata below, and ``"xpoptim_crc32"``: the CRC-32 of that JSON
  (8 hex digits)::

      {"format_version": 2, "xpoptim_version": "...",
       "state": <a state dict (see xpoptim._state) whose arrays are replaced by tensor
                 names>,
       "params": {name: tensor} or null,
       "tensors": {tensor: {"dtype": "F32", "shape": [4, 3], "crc32": <int>}}}

  so a flipped byte anywhere, in the header or in an array, is detected: the metadata
  repeats each tensor's dtype and shape and gives the CRC-32 of its bytes.

Files of ``format_version`` 1 (``.npz``, written by xpoptim 0.1) are still read, with every
size checked first (``_npz_legacy``). `save` checks everything that `load` checks before
anything is written. Writing is atomic (``_atomic``): a temporary file beside the target,
flushed and fsynced, renamed over it, the directory fsynced. See ``docs/state.md``.
"""

from __future__ import annotations

import json
import numbers
import os
import zlib
from collections.abc import Mapping
from typing import IO, Any, NamedTuple

import numpy as np

from . import _npz_legacy, _safetensors, _state
from ._atomic import replace_atomically
from ._compat import Array, Namespace, array_namespace
from ._compat import device as device_of
from ._execution import place, to_host
from ._optimizers import Optimizer

FORMAT = "xpoptim.checkpoint"
#: The checkpoint file version this xpoptim writes, and the newest it reads.
FILE_VERSION = 2
#: The version of the ``.npz`` files of xpoptim 0.1, still read.
NPZ_VERSION = 1
#: The metadata: a member of a version 1 file, a ``__metadata__`` key of a version 2 one.
META = "__xpoptim__"
META_KEY = "xpoptim"
CRC_KEY = "xpoptim_crc32"

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
            if hasattr(sub, "State"):  # not a shared base (PeerOptimizer): no state of its own
                found.setdefault(sub.__name__, sub)
            todo.append(sub)
    return found


def _build(kind: Any, config: Any) -> Optimizer:
    """The optimizer of type name ``kind`` built from ``config`` (``ValueError`` if none)."""
    cls = _optimizer_types().get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown optimizer type {kind!r}")
    if not isinstance(config, Mapping):
        raise ValueError(f"the saved config of a {kind} is {type(config).__name__}, not a mapping")
    try:
        return cls.from_config(config)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"the saved config does not build a {kind}: {exc}") from None


def save(
    path: PathLike,
    opt: Optimizer,
    params: Any = None,
    *,
    state: Any = None,
) -> None:
    """Write ``opt``'s config and state (and ``params``) to ``path``, atomically.

    Everything `load` will check is checked first; on any error nothing is written and
    an existing ``path`` is left as it was.

    Args:
        path: the file to write (``.safetensors`` is the customary suffix; none is added).
        opt: the optimizer.
        params: optionally the parameters, ``{name: array}`` or the layers given to
            ``opt.step`` (named ``f"{layer_index}.{name}"``, like the state). Their names
            and shapes must be those of the state, their dtypes floating.
        state: a state from ``opt.init``/``opt.update``; by default the state kept by
            ``opt.step`` (an optimizer that never ran ``step`` has none: pass ``state``).

    Raises:
        ValueError: no state to save (`Optimizer.state_dict`), or ``StateDictError``:
            the state or ``params`` would not load (names, shapes, dtypes).
        TypeError: a hyperparameter that cannot be stored (a plain function as a
            learning rate).

    Lazy (Dask) arrays are computed, device arrays copied to the host. A crash at any
    moment leaves ``path`` as it was or complete; a leftover ``.<name>.*.tmp`` beside it
    can be deleted.
    """
    sd = opt.state_dict(state)
    _, _, buffers = _state.parse(opt, sd)
    named = None if params is None else dict(_state._as_params(opt, params))
    if named is not None:
        _state._match(opt, buffers, named)
        for key, p in named.items():  # _match checks only names that have buffers
            if not array_namespace(p).isdtype(p.dtype, "real floating"):
                raise _state.StateDictError(
                    f"params[{key!r}] has dtype {p.dtype}, not real floating"
                )
    config = json.loads(json.dumps(sd["config"], default=_json_default, allow_nan=False))
    _build(sd["optimizer"], config)  # what load does with it

    arrays: dict[str, np.ndarray[Any, Any]] = {}
    tensors: dict[str, dict[str, Any]] = {}

    def member(a: Array, what: str) -> str:
        key = f"a{len(arrays)}"
        host = to_host(a)
        try:
            code = _safetensors.code_of(host.dtype)
        except ValueError as exc:
            raise TypeError(f"{what}: {exc}") from None
        arrays[key] = host
        data = _safetensors.little_endian_bytes(host)
        tensors[key] = {"dtype": code, "shape": list(host.shape), "crc32": zlib.crc32(data)}
        return key

    sd["buffers"] = {
        field: {name: member(a, f"state {field}[{name!r}]") for name, a in arrays_.items()}
        for field, arrays_ in sd["buffers"].items()
    }
    saved_params = None
    if named is not None:
        saved_params = {name: member(p, f"params[{name!r}]") for name, p in named.items()}
    from . import __version__

    meta = {
        "format_version": FILE_VERSION,
        "xpoptim_version": __version__,
        "state": sd,
        "params": saved_params,
        "tensors": tensors,
    }
    blob = json.dumps(meta, default=_json_default, allow_nan=False)
    header = {
        "format": FORMAT,
        META_KEY: blob,
        CRC_KEY: f"{zlib.crc32(blob.encode('utf-8')):08x}",
    }

    def write(f: IO[bytes]) -> None:
        _safetensors.write(f, arrays, header)

    replace_atomically(path, write)


def _meta_version(meta: Any, expected: int) -> dict[str, Any]:
    """The checked metadata dict of a file whose container has version ``expected``."""
    if not isinstance(meta, dict):
        raise ValueError("its metadata is not a JSON object")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"bad format_version {version!r} (an int >= 1)")
    if version > FILE_VERSION:
        raise ValueError(
            f"it has checkpoint format_version {version}, newer than this xpoptim reads "
            f"({FILE_VERSION}): upgrade xpoptim to load it"
        )
    if version != expected:
        container = ".npz" if expected == NPZ_VERSION else "safetensors"
        raise ValueError(f"a {container} checkpoint has format_version {expected}, not {version}")
    return meta


def _read_safetensors(f: Any, size: int) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    metadata, entries = _safetensors.read_header(f, size)
    if metadata.get("format") != FORMAT or META_KEY not in metadata:
        raise ValueError("its metadata is not that of an xpoptim checkpoint")
    blob = metadata[META_KEY].encode("utf-8")
    crc = f"{zlib.crc32(blob):08x}"
    if metadata.get(CRC_KEY) != crc:
        raise ValueError(
            f"its metadata has CRC-32 {crc}, not the recorded {metadata.get(CRC_KEY)!r} (corrupt)"
        )
    meta = _meta_version(_safetensors.parse_json(blob, "the metadata"), FILE_VERSION)
    tensors = meta.get("tensors")
    if not isinstance(tensors, dict):
        raise ValueError("its metadata has no tensor table")
    _state._keys(entries.keys(), tensors.keys(), "tensors of the metadata vs the file")
    arrays = {}
    for key, e in entries.items():
        spec = tensors[key]
        if not isinstance(spec, dict) or (spec.get("dtype"), spec.get("shape")) != (
            _safetensors.code_of(e.dtype),
            list(e.shape),
        ):
            raise ValueError(
                f"tensor {key!r}: the file says {e.dtype} {e.shape}, the metadata {spec!r}"
            )
        a = _safetensors.read_tensor(f, e)
        crc32 = zlib.crc32(_safetensors.little_endian_bytes(a))
        if spec.get("crc32") != crc32:
            raise ValueError(
                f"tensor {key!r} has CRC-32 {crc32}, not the recorded "
                f"{spec.get('crc32')!r} (corrupt)"
            )
        arrays[key] = a
    return meta, arrays


def _read_npz(f: Any, size: int) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    arrays = _npz_legacy.read(f, size)
    blob = arrays.pop(META, None)
    if blob is None:
        raise ValueError(f"it has no {META!r} member: not an xpoptim checkpoint")
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ValueError(f"its metadata member has dtype {blob.dtype} and {blob.ndim} dims")
    meta = _safetensors.parse_json(blob.tobytes(), "the metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError("its metadata is not that of an xpoptim checkpoint")
    return _meta_version(meta, NPZ_VERSION), arrays


def _read(path: PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """The metadata and arrays of a checkpoint file, with every decoding error as one.

    Nothing is allocated beyond what the file holds: every declared size is checked
    against the file's size first.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:  # FileNotFoundError, IsADirectoryError, PermissionError
        size = os.fstat(f.fileno()).st_size
        magic = f.read(4)
        f.seek(0)
        try:
            if magic in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip: xpoptim 0.1
                return _read_npz(f, size)
            if magic == b"\x93NUM":
                raise ValueError("it is a single .npy array, not an xpoptim checkpoint")
            return _read_safetensors(f, size)
        except _state.StateDictError as exc:
            raise CheckpointError(f"{name} is not a readable xpoptim checkpoint: {exc}") from None
        except ValueError as exc:  # FormatError included
            raise CheckpointError(f"{name} is not a readable xpoptim checkpoint: {exc}") from None


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
    try:
        opt = _build(sd.get("optimizer"), sd.get("config"))
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from None

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
