"""The optimizers, one module per family, on the shared base `Optimizer` (``_base``).

The seed's three (mpneuralnetwork 1.1.1's names and defaults): `SGD` (``_sgd``),
`RMSprop` (``_rmsprop``), `Adam` and `AdamW` (``_adam``). Each runs a rule of
`xpoptim._rules`.
"""

from ._adam import Adam, AdamState, AdamW
from ._base import NOT_DECAYED, Optimizer
from ._rmsprop import RMSprop, RMSpropState
from ._sgd import SGD, SGDState

__all__ = [
    "NOT_DECAYED",
    "SGD",
    "Adam",
    "AdamState",
    "AdamW",
    "Optimizer",
    "RMSprop",
    "RMSpropState",
    "SGDState",
]
