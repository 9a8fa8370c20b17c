"""The base of the optimizers that are not elementwise (LAMB, LARS, Adafactor, Muon):
decay is their own decoupled ``weight_decay`` (no ``regularization`` argument)."""

from __future__ import annotations

from typing import Any, ClassVar

from ._base import Optimizer


class DecoupledOnly(Optimizer):
    """An optimizer whose only decay is its own (no ``regularization`` argument)."""

    elementwise: ClassVar[bool] = False

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        if self.regularization is not None:
            raise ValueError(
                f"{type(self).__name__} has only its own weight decay, got "
                f"regularization={self.regularization!r}"
            )

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (no ``regularization``: the decay is built in)."""
        config = super().get_config()
        del config["regularization"]
        return config

    def _decay(self, name: str) -> float:
        """The decay strength of parameter ``name``: 0 where ``no_decay`` selects it."""
        return float(self.weight_decay) if self.is_decayed(name) else 0.0
