"""Building blocks shared by the model families: activations, norms and weight initialisation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

ACTIVATIONS = ("relu", "lrelu", "prelu")
NORMS = ("bn", "none")
INITS = ("he-uniform", "he-normal", "glorot-uniform", "orthogonal", "default")
# The builders' defaults, said once (a family that differs, such as PlainNet's He-uniform init, says so itself)
ACTIVATION, NORM, INIT = "relu", "bn", "he-normal"
NEGATIVE_SLOPE = 0.3  # LeakyReLU's slope (PReLU's initial one): the PlainNet paper's


def check_choice(what: str, value: str, choices) -> str:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def make_activation(name: str = ACTIVATION, negative_slope: float = NEGATIVE_SLOPE,
                    num_parameters: int = 1) -> nn.Module:
    """A fresh activation module (never shared, so hooks on it identify one layer)."""
    check_choice("activation", name, ACTIVATIONS)
    if name == "relu":
        return nn.ReLU()
    if name == "lrelu":
        return nn.LeakyReLU(negative_slope)
    return nn.PReLU(num_parameters, init=negative_slope)


class _BatchVarianceNorm:
    """Batch norm whose running variance tracks the variance training normalises with: the biased
    batch variance. PyTorch's own keeps the unbiased one, n/(n-1) times larger (n: samples per channel
    in a batch), so eval mode divides by a slightly larger variance than training did. In a shallow
    net that is noise; through a 100-layer MLP at batch 128 (n/(n-1) = 1.008 per layer) it compounds:
    the PlainNet recipe's 100-layer net on COIL-20 fell from 99.5% to 70% train accuracy in eval mode
    (docs/RESULTS.md section 7). Everything else is ``nn.BatchNorm1d``/``nn.BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.running_var is not None):
            return super().forward(x)
        self._check_input_dim(x)
        F._verify_batch_size(x.size())  # one value per channel: as nn.BatchNorm refuses it
        self.num_batches_tracked.add_(1)
        step = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        # The op normalises with the batch's statistics and updates no running buffer (none is passed), so
        # autograd keeps no reference to them and they can be updated in place afterwards (DDP broadcasts
        # these very tensors) without a copy: (1 - step) old + step * the biased batch variance, which the
        # op returns as 1 / invstd^2 - eps.
        out, mean, invstd = torch.native_batch_norm(x, self.weight, self.bias, None, None, True, step, self.eps)
        # mean and invstd carry no gradient: no no_grad() needed for three small ops (benchmarks/batchnorm_cost.py)
        torch._foreach_lerp_((self.running_mean, self.running_var), (mean, invstd.pow(-2).sub_(self.eps)), step)
        return out


class BatchNorm1d(_BatchVarianceNorm, nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchVarianceNorm, nn.BatchNorm2d):
    pass


def make_norm(norm: str, num_features: int, dims: int) -> nn.Module:
    check_choice("norm", norm, NORMS)
    if norm == "none":
        return nn.Identity()
    return BatchNorm1d(num_features) if dims == 1 else BatchNorm2d(num_features)


def init_weights(model: nn.Module, scheme: str = "he-uniform", activation: str = ACTIVATION,
                 negative_slope: float = NEGATIVE_SLOPE) -> nn.Module:
    """Initialise every Linear/Conv weight of ``model`` and zero their biases.

    He initialisation uses the gain of the activation actually used (LeakyReLU's slope
    enters the fan-in formula), as in He et al. 2015.
    """
    check_choice("init", scheme, INITS)
    if scheme == "default":
        return model
    slope = negative_slope if activation in ("lrelu", "prelu") else 0.0
    nonlinearity = "leaky_relu" if slope else "relu"
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or getattr(module, "skip_init", False):
            continue
        weight = module.weight
        if scheme == "he-uniform":
            nn.init.kaiming_uniform_(weight, a=slope, nonlinearity=nonlinearity)
        elif scheme == "he-normal":
            nn.init.kaiming_normal_(weight, a=slope, nonlinearity=nonlinearity)
        elif scheme == "glorot-uniform":
            nn.init.xavier_uniform_(weight)
        else:
            nn.init.orthogonal_(weight, gain=math.sqrt(2.0 / (1 + slope ** 2)))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def flat_features(input_shape) -> int:
    return int(math.prod(input_shape))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias, groups=groups)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    """Return (weight, bias) of a layer followed by ``bn`` in eval mode, folded into one layer."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.reshape(shape), (bias - bn.running_mean) * scale + shift
