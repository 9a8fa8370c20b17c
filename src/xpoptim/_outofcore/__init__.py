"""Out-of-core optimization: parameters and state in Zarr arrays, streamed by Dask.

One concern per module:

* `store` - `OutOfCore`, the public front: `create`/`open` parse the location
  (`location`: a local path or an object-store URL) and pick an engine;
* `directory` - the directory engine, the default for local paths (format 2: a version
  beside the committed one and an atomic pointer file, one writer by ``flock``), with its
  format checks (`layout`), writer lock (`lock`) and checksummed chunk reads (`chunks`);
* `transactional` - the Icechunk engine, on local disk or object storage: each step one
  atomic commit, concurrent writers refused by the engine's conflict detection, history,
  tags, rollback, expiry and garbage collection, over `repository` (Icechunk storage,
  descriptions, snapshots, errors);
* `chunk_step` - what both engines share: the per-chunk task running the optimizer's own
  update, gradient checks, Dask scheduling, `StepSummary`;
* `migrate` - reading a directory store for `OutOfCore.upgrade`;
* `errors` - `StoreError`, `ConcurrentWriterError`; `demo` - the command-line demo.
"""

from .chunk_step import DEFAULT_CHUNK_BYTES, MissingDependencyError, StepSummary, _lazy
from .errors import ConcurrentWriterError, StoreError
from .store import Commit, OutOfCore

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Commit",
    "ConcurrentWriterError",
    "MissingDependencyError",
    "OutOfCore",
    "StepSummary",
    "StoreError",
    "_lazy",
]
