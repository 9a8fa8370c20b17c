"""xpoptim: neural-network optimizers written once against the Python Array API standard.

The same update rules run on NumPy, CuPy, Dask, PyTorch, JAX and array-api-strict
arrays. Two ways in:

* ``state = opt.init(params)``; ``params, state = opt.update(params, grads, state)``
* ``opt.step(layers)``: the layer protocol of mpneuralnetwork, updating in place.
"""

from . import schedules, transforms
from ._execution import (
    ExecutionOptions,
    LazyGraphWarning,
    execution_options,
    persist,
    set_execution_options,
)
from ._optimizers import (
    SGD,
    Adam,
    AdamState,
    AdamW,
    Optimizer,
    RMSprop,
    RMSpropState,
    SGDState,
)
from ._outofcore import OutOfCore, StepSummary, StoreError

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adam",
    "AdamState",
    "AdamW",
    "ExecutionOptions",
    "LazyGraphWarning",
    "Optimizer",
    "OutOfCore",
    "RMSprop",
    "RMSpropState",
    "SGDState",
    "StepSummary",
    "StoreError",
    "__version__",
    "execution_options",
    "persist",
    "schedules",
    "set_execution_options",
    "transforms",
]
