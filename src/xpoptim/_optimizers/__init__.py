"""The optimizers, one module per family, on the shared base `Optimizer` (``_base``).

The seed's three (mpneuralnetwork 1.1.1's names and defaults): `SGD` (``_sgd``),
`RMSprop` (``_rmsprop``), `Adam` and `AdamW` (``_adam``). Beyond them, with their
peer's conventions (``_peer``: torch.optim's defaults, else optax's): `Adagrad` and
`Adadelta` (``_adagrad``), `Adamax`, `NAdam`, `RAdam` (``_adam_variants``), `Rprop`
and `Lion` (``_sign``), `ScheduleFreeAdamW` (``_schedule_free``). Each runs a rule of
`xpoptim._rules`.
"""

from __future__ import annotations

from ._adagrad import Adadelta, AdadeltaState, Adagrad, AdagradState
from ._adam import Adam, AdamState, AdamW
from ._adam_variants import Adamax, AdamaxState, NAdam, NAdamState, RAdam, RAdamState
from ._base import NOT_DECAYED, Optimizer
from ._factored import Adafactor, AdafactorState
from ._layerwise import LAMB, LARS, LAMBState, LARSState
from ._orthogonal import Muon, MuonState
from ._peer import PeerOptimizer
from ._rmsprop import RMSprop, RMSpropState
from ._schedule_free import ScheduleFreeAdamW, ScheduleFreeAdamWState
from ._sgd import SGD, SGDState
from ._sign import Lion, LionState, Rprop, RpropState

#: Every optimizer class, by name (what a config's ``"type"`` names).
OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.__name__: cls
    for cls in (
        SGD,
        RMSprop,
        Adam,
        AdamW,
        Adagrad,
        Adadelta,
        Adamax,
        NAdam,
        RAdam,
        Rprop,
        Lion,
        ScheduleFreeAdamW,
        LAMB,
        LARS,
        Adafactor,
        Muon,
    )
}

__all__ = [
    "LAMB",
    "LARS",
    "NOT_DECAYED",
    "OPTIMIZERS",
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
    "LAMBState",
    "LARSState",
    "Lion",
    "LionState",
    "Muon",
    "MuonState",
    "NAdam",
    "NAdamState",
    "Optimizer",
    "PeerOptimizer",
    "RAdam",
    "RAdamState",
    "RMSprop",
    "RMSpropState",
    "Rprop",
    "RpropState",
    "SGDState",
    "ScheduleFreeAdamW",
    "ScheduleFreeAdamWState",
]
