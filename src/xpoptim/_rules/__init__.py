"""Update rules: the math of every optimizer, written once against the Array API standard.

One module per family (``_sgd``, ``_rmsprop``, ``_adam``, ``_adam_variants``, ``_adagrad``,
``_sign``, ``_schedule_free``, ...), the gradient transforms
(``_transforms``) and what several share (``_common``); this package re-exports them all,
so ``_rules.adam`` is the Adam rule.

Each rule is a pure function of arrays and Python scalars. It uses only the namespace
``xp`` it is given and the standard's operators: no backend branches, no output-array arguments, no
``bool()``/``float()`` on arrays. Hyperparameters and bias corrections arrive as Python
floats, so float32 state stays float32 (a NumPy scalar or a 0-d float64 array would
silently promote it).

The rules use the standard's in-place operators (``m *= beta1``). On eager, writeable
arrays (NumPy, CuPy, PyTorch, array-api-strict) they update the buffers in place; on
immutable or lazy arrays (JAX, Dask) the same statements rebind to new arrays. Either
way the rule *returns* its results, and callers must use what it returns. A rule may
also rebind a buffer to a new array (``v_max = xp.maximum(v_max, v)``, which has no
in-place form); where buffers are updated in place, the execution layer writes that
value back into the buffer's memory. How a rule is
executed for a given backend (in place, on copies, lazily, blocked) is decided in
`xpoptim._execution`, never here.

A rule that is elementwise may be applied to any slice of its arrays (the compiled and
blocked paths do); one that is not (a reduction, a matmul) says so in its docstring and
runs on whole arrays.
"""

from ._adagrad import adadelta, adagrad
from ._adam import adam, adam_amsgrad
from ._adam_variants import adamax, nadam, radam
from ._common import penalized_gradient
from ._factored import adafactor
from ._layerwise import lamb, lars
from ._orthogonal import muon, newton_schulz
from ._rmsprop import rmsprop, rmsprop_extended
from ._schedule_free import schedule_free_adamw, schedule_free_average
from ._sgd import sgd, sgd_nesterov
from ._sign import lion, rprop
from ._transforms import accumulate, clip_by_value, clip_scale, sum_of_squares

__all__ = [
    "accumulate",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adam_amsgrad",
    "adamax",
    "clip_by_value",
    "clip_scale",
    "lamb",
    "lars",
    "lion",
    "muon",
    "nadam",
    "newton_schulz",
    "penalized_gradient",
    "radam",
    "rmsprop",
    "rmsprop_extended",
    "rprop",
    "schedule_free_adamw",
    "schedule_free_average",
    "sgd",
    "sgd_nesterov",
    "sum_of_squares",
]
