"""Model families. Importing this package registers every family in ``deepplain.registry``."""
from . import dirac, highway, plain, resnet, van  # noqa: F401
from .dirac import DiracConv2d, DiracLinear, DiracNet
from .residual import ResidualNet, SkipGate, iter_skip_gates

__all__ = ["DiracConv2d", "DiracLinear", "DiracNet", "ResidualNet", "SkipGate", "iter_skip_gates"]
