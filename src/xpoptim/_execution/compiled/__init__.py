"""The compiler: each rule traced once, emitted as one fused kernel per backend.

``trace`` (a recording namespace) -> ``ir`` (a small graph) -> an emitter per backend
(``numba_emit`` for NumPy and Dask chunks, ``cuda_emit`` for CuPy) -> ``kernels`` (cached
per rule, dtype and hyperparameter signature, on disk too) -> the runners
(``numpy_path``, ``accelerated``).
"""
