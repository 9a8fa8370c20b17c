"""Out-of-core optimization: parameters and state in Zarr arrays, streamed by Dask.

One concern per module:

* `store` - `OutOfCore`, the public front: `create`/`open` pick an engine from the
  location (a local path or an object-store URL, see `location`);
* `directory` - the local directory engine (format 2: a version beside the committed one
  and an atomic pointer file, one writer by ``flock``);
* `transactional` - the Icechunk engine: each step one atomic commit, concurrent writers
  refused by the engine's conflict detection, history, tags, expiry and garbage collection;
  on local disk and on object storage;
* `chunk_step` - what both engines share: the per-chunk task running the optimizer's own
  update, gradient checks, Dask scheduling, `StepSummary`;
* `layout`, `lock`, `chunks` - the directory engine's format checks, writer lock and
  checksummed chunk reads; `demo` - the command-line demo.
"""

from .directory import DEFAULT_CHUNK_BYTES, MissingDependencyError, OutOfCore, StepSummary, _lazy
from .layout import StoreError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MissingDependencyError",
    "OutOfCore",
    "StepSummary",
    "StoreError",
    "_lazy",
]
