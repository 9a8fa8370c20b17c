"""The execution layer: how a pure rule runs on each backend, apart from the math.

The rules in `xpoptim._rules` are pure math. This package decides, per parameter, how
they run (`dispatch`), on one of three paths that give the same bits:

* ``compiled/`` -- the compiler: the rule traced once into a small graph, emitted as one
  fused kernel per backend (numba for NumPy and Dask chunks, CUDA for CuPy);
* ``blocked.py`` -- the unchanged rule over cache-sized blocks of NumPy arrays, threaded;
* ``plain.py`` -- the rule once per whole array: in place, rebinding (JAX, Dask) or on a
  copy (read-only arrays).

Around them: ``options.py`` (`execution_options`), ``threads.py`` (the pool and its
tuner), ``flat.py`` (the flat state of small parameters), ``lazy.py`` (Dask graphs:
`persist`), ``placement.py`` (moving arrays between backends and devices).

Gradients are inputs only: no path writes to them. Parameters (and state buffers) must
not overlap one another: tied weights are passed once.
"""

from __future__ import annotations

from .dispatch import StepPath, explain, run_rule
from .flat import relayout_state, zeros_state
from .lazy import MAX_LAZY_LAYERS, LazyGraphWarning, persist, warn_if_deep
from .options import ExecutionOptions, current_options, execution_options, set_execution_options
from .placement import place, same_device, to_host
from .plain import apply_rule, owned, scalars_like, select, updates_in_place, values_readable

__all__ = [
    "MAX_LAZY_LAYERS",
    "ExecutionOptions",
    "LazyGraphWarning",
    "StepPath",
    "apply_rule",
    "current_options",
    "execution_options",
    "explain",
    "owned",
    "persist",
    "place",
    "relayout_state",
    "run_rule",
    "same_device",
    "scalars_like",
    "select",
    "set_execution_options",
    "to_host",
    "updates_in_place",
    "values_readable",
    "warn_if_deep",
    "zeros_state",
]
