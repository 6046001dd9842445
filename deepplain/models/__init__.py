"""Model families. Importing this package registers every family in ``deepplain.registry``."""
from . import dirac, highway, plain, resnet, resnext, van  # noqa: F401
from .dirac import DiracConv2d, DiracLinear, DiracNet
from .residual import ResidualNet, SkipGate

__all__ = ["DiracConv2d", "DiracLinear", "DiracNet", "ResidualNet", "SkipGate"]
