"""Faces: any xpoptim optimizer inside another framework's training loop.

* `xpoptim.faces.torch` -- ``Optimizer(params, xpoptim_optimizer)``, a
  ``torch.optim.Optimizer``: ``lr_scheduler``, ``GradScaler``, ``zero_grad``,
  ``state_dict``/``load_state_dict`` and gradient clipping work unchanged;
* `xpoptim.faces.optax` -- ``transformation(xpoptim_optimizer)``, an
  ``optax.GradientTransformation``: composes with ``optax.chain``, ``optax.MultiSteps``,
  ``optax.masked``, under ``jax.jit``, over any pytree of parameters.

Each face works with any object that has the optimizers' ``init``/``update``/``get_config``
(the optimizers and the wrappers of `xpoptim.transforms`). Nothing here is imported by
``import xpoptim``: a face imports its framework, and only its own.
"""
