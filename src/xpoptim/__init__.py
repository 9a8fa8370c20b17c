"""xpoptim: neural-network optimizers written once against the Python Array API standard.

The same update rules run on NumPy, CuPy, Dask, PyTorch, JAX and array-api-strict
arrays. Two ways in:

* ``state = opt.init(params)``; ``params, state = opt.update(params, grads, state)``
* ``opt.step(layers)``: the layer protocol of mpneuralnetwork, updating in place.

State: ``opt.state_dict()`` / ``opt.load_state_dict(sd)``, ``state_to_dict`` /
``state_from_dict`` for a functional state, and ``save`` / ``load`` for checkpoint files
(see docs/state.md).
"""

from . import schedules, transforms
from ._checkpoint import Checkpoint, CheckpointError, load, save
from ._execution import (
    ExecutionOptions,
    LazyGraphWarning,
    StepPath,
    execution_options,
    explain,
    persist,
    set_execution_options,
)
from ._nonfinite import NonFiniteGradientError
from ._optimizers import (
    LAMB,
    LARS,
    SGD,
    Adadelta,
    AdadeltaState,
    Adafactor,
    AdafactorState,
    Adagrad,
    AdagradState,
    Adam,
    Adamax,
    AdamaxState,
    AdamState,
    AdamW,
    LAMBState,
    LARSState,
    Lion,
    LionState,
    Muon,
    MuonState,
    NAdam,
    NAdamState,
    Optimizer,
    RAdam,
    RAdamState,
    RMSprop,
    RMSpropState,
    Rprop,
    RpropState,
    ScheduleFreeAdamW,
    ScheduleFreeAdamWState,
    SGDState,
)
from ._outofcore import Commit, ConcurrentWriterError, OutOfCore, StepSummary, StoreError
from ._state import FORMAT_VERSION, StateDictError, state_from_dict, state_to_dict

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "LAMB",
    "LARS",
    "SGD",
    "Adadelta",
    "AdadeltaState",
    "Adafactor",
    "AdafactorState",
    "Adagrad",
    "AdagradState",
    "Adam",
    "AdamState",
    "AdamW",
    "Adamax",
    "AdamaxState",
    "Checkpoint",
    "CheckpointError",
    "Commit",
    "ConcurrentWriterError",
    "ExecutionOptions",
    "LAMBState",
    "LARSState",
    "LazyGraphWarning",
    "Lion",
    "LionState",
    "Muon",
    "MuonState",
    "NAdam",
    "NAdamState",
    "NonFiniteGradientError",
    "Optimizer",
    "OutOfCore",
    "RAdam",
    "RAdamState",
    "RMSprop",
    "RMSpropState",
    "Rprop",
    "RpropState",
    "SGDState",
    "ScheduleFreeAdamW",
    "ScheduleFreeAdamWState",
    "StateDictError",
    "StepPath",
    "StepSummary",
    "StoreError",
    "__version__",
    "execution_options",
    "explain",
    "load",
    "persist",
    "save",
    "schedules",
    "set_execution_options",
    "state_from_dict",
    "state_to_dict",
    "transforms",
]
