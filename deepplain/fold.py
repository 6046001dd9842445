"""``fold(model)``: the plain network equivalent to a trained DiracNet or a fully phased-out VAN."""
from __future__ import annotations

from torch import nn

from .errors import ConfigError
from .models.dirac import DiracNet
from .models.residual import ResidualNet


def fold(model: nn.Module) -> nn.Module:
    """Return a plain ``nn.Sequential`` with the same eval-mode outputs as ``model``.

    DiracNet: Dirac parameterisation and batch norm fold into ordinary Conv2d/Linear layers.
    VAN: every alpha must be exactly 1 (then the skip terms are zero and are dropped).
    """
    if isinstance(model, DiracNet):
        return model.fold()
    if isinstance(model, ResidualNet):
        return model.to_plain()
    raise ConfigError(f"fold() supports DiracNet and VAN models, got {type(model).__name__}")
