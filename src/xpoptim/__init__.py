"""xpoptim: neural-network optimizers written once against the Python Array API standard.

The same update rules run on NumPy, CuPy, Dask, PyTorch, JAX and array-api-strict
arrays. Two ways in:

* ``state = opt.init(params)``; ``params, state = opt.update(params, grads, state)``
* ``opt.step(layers)``: the layer protocol of mpneuralnetwork, updating in place.
"""

from ._execution import ExecutionOptions, execution_options, set_execution_options
from ._optimizers import (
    SGD,
    Adam,
    AdamState,
    Optimizer,
    RMSprop,
    RMSpropState,
    SGDState,
)

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adam",
    "AdamState",
    "ExecutionOptions",
    "Optimizer",
    "RMSprop",
    "RMSpropState",
    "SGDState",
    "__version__",
    "execution_options",
    "set_execution_options",
]
