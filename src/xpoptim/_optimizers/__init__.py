"""The optimizers, one module per family, on the shared base `Optimizer` (``_base``).

The seed's three (mpneuralnetwork 1.1.1's names and defaults): `SGD` (``_sgd``),
`RMSprop` (``_rmsprop``), `Adam` and `AdamW` (``_adam``). Each runs a rule of
`xpoptim._rules`.
"""

from ._adam import Adam, AdamState, AdamW
from ._base import NOT_DECAYED, Optimizer
from ._factored import Adafactor, AdafactorState
from ._layerwise import LAMB, LARS, LAMBState, LARSState
from ._orthogonal import Muon, MuonState
from ._rmsprop import RMSprop, RMSpropState
from ._sgd import SGD, SGDState

__all__ = [
    "LAMB",
    "LARS",
    "NOT_DECAYED",
    "SGD",
    "Adafactor",
    "AdafactorState",
    "Adam",
    "AdamState",
    "AdamW",
    "LAMBState",
    "LARSState",
    "Muon",
    "MuonState",
    "Optimizer",
    "RMSprop",
    "RMSpropState",
    "SGDState",
]
