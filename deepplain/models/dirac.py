"""DiracNet (Zagoruyko & Komodakis): plain networks with Dirac-parameterised weights.

``W_hat = diag(a) I + diag(b) W_norm``: ``I`` is the Dirac delta (identity convolution; a partial
identity when a layer widens), ``W_norm`` is ``W`` with each output filter scaled to unit L2 norm,
``a`` starts at 1 and ``b`` at 0.1. Blocks are ReLU -> DiracConv -> BN. After training,
``fold()`` turns the network, batch norm included, into a plain chain of Conv2d + ReLU.

Forms:
* ``conv``, ``layout="cifar"`` (Table 1 of the paper): a 3x3 stem to 16 channels, three groups of
  ``2n`` Dirac convs (``n = (depth - 4) / 6``) of widths 16k/32k/64k, 2x2 max-pool between groups,
  global average pool, linear classifier. DiracNet-28-10 has 36.5M parameters.
* ``conv``, ``layout="imagenet"``: DiracNet-18/34 (ResNet-18/34 stage sizes without the skips):
  7x7/2 stem + BN + 3x3/2 max-pool, four groups of widths 64/128/256/512, 2x2 max-pool between groups.
* ``mlp``: Linear stem, ``depth`` blocks ReLU -> DiracLinear -> BN, ReLU -> classifier.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import INIT, BatchNorm1d, BatchNorm2d, check_choice, conv3x3, flat_features, fold_batchnorm, init_weights
from ..registry import DepthRule, define_family, register

define_family("dirac", "Dirac-parameterised plain convs, W = diag(a) I + diag(b) W_norm; folds to plain",
              "Zagoruyko & Komodakis, DiracNets: Training Very Deep Neural Networks without Skip-Connections",
              module="deepplain.family_modules:DiracNetModule")
CIFAR_DEPTHS = DepthRule(6, 4, examples="10, 16, 22, 28, 34, ...")
IMAGENET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # ResNet-18/34's blocks per stage
DIRAC_LAYOUTS = ("cifar", "imagenet")


class _DiracMixin:
    """Shared parameterisation of DiracConv2d and DiracLinear (weight layout: out x in x ...)."""

    def _init_dirac(self, out_features: int, a_init: float, b_init: float):
        self.a = nn.Parameter(torch.full((out_features,), float(a_init)))
        self.b = nn.Parameter(torch.full((out_features,), float(b_init)))
        nn.init.normal_(self.weight)  # the scale is irrelevant: every filter is normalised
        self.skip_init = True  # deepplain.layers.init_weights leaves this weight alone

    def effective_weight(self) -> torch.Tensor:
        out_f, in_f = self.weight.shape[:2]
        scale = self.b.view((-1,) + (1,) * (self.weight.dim() - 1))
        w = F.normalize(self.weight.flatten(1), dim=1).view_as(self.weight) * scale
        m = min(out_f, in_f)
        idx = torch.arange(m, device=w.device)
        centre = tuple(torch.full_like(idx, k // 2) for k in self.weight.shape[2:])
        return w.index_put((idx, idx) + centre, self.a[:m].to(w.dtype), accumulate=True)


class DiracConv2d(nn.Conv2d, _DiracMixin):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 a_init: float = 1.0, b_init: float = 0.1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self._init_dirac(out_channels, a_init, b_init)

    def forward(self, x):
        return self._conv_forward(x, self.effective_weight(), None)


class DiracLinear(nn.Linear, _DiracMixin):
    def __init__(self, in_features: int, out_features: int, a_init: float = 1.0, b_init: float = 0.1):
        super().__init__(in_features, out_features, bias=False)
        self._init_dirac(out_features, a_init, b_init)

    def forward(self, x):
        return F.linear(x, self.effective_weight())


class DiracBlock(nn.Module):
    """ReLU -> Dirac layer -> BN."""

    def __init__(self, layer: nn.Module, num_features: int):
        super().__init__()
        self.act = nn.ReLU()
        self.dirac = layer
        self.norm = BatchNorm2d(num_features) if isinstance(layer, nn.Conv2d) else BatchNorm1d(num_features)

    def forward(self, x):
        return self.norm(self.dirac(self.act(x)))

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The Dirac layer and its batch norm (eval statistics) as one ordinary Conv2d/Linear."""
        weight, bias = fold_batchnorm(self.dirac.effective_weight(), None, self.norm)
        if isinstance(self.dirac, nn.Conv2d):
            d = self.dirac
            layer = nn.Conv2d(d.in_channels, d.out_channels, d.kernel_size, d.stride, d.padding)
        else:
            layer = nn.Linear(self.dirac.in_features, self.dirac.out_features)
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        return layer.to(weight.device)


class DiracNet(nn.Module):
    def __init__(self, stem: nn.Sequential, features: list, head: nn.Sequential):
        super().__init__()
        self.stem, self.features, self.head = stem, nn.Sequential(*features), head

    def forward(self, x):
        return self.head(self.features(self.stem(x)))

    @torch.no_grad()
    def fold(self) -> nn.Sequential:
        """A plain Conv2d/Linear + ReLU chain equal to this network in eval mode."""
        stem = [copy.deepcopy(m) for m in self.stem]
        folded = []
        for module in stem:  # fold the stem's batch norm into the layer before it
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                prev = folded.pop()
                w, b = fold_batchnorm(prev.weight, prev.bias, module)
                layer = copy.deepcopy(prev)
                layer.weight = nn.Parameter(w)
                layer.bias = nn.Parameter(b)
                folded.append(layer)
            else:
                folded.append(module)
        for module in self.features:
            if isinstance(module, DiracBlock):
                folded += [nn.ReLU(), module.folded()]
            else:
                folded.append(copy.deepcopy(module))
        plain = nn.Sequential(*folded, *copy.deepcopy(self.head))
        return plain.train(self.training)


def _head(channels: int, num_classes: int, spatial: bool) -> nn.Sequential:
    parts = OrderedDict(act=nn.ReLU())
    if spatial:
        parts.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())
    parts["linear"] = nn.Linear(channels, num_classes)
    return nn.Sequential(parts)


def dirac_cnn(input_shape, num_classes, stem: nn.Sequential, stem_channels: int, widths, convs_per_group,
              init: str) -> DiracNet:
    features, channels = [], stem_channels
    for group, (width, count) in enumerate(zip(widths, convs_per_group)):
        if group:
            features.append(nn.MaxPool2d(2, 2))
        for _ in range(count):
            features.append(DiracBlock(DiracConv2d(channels, width), width))
            channels = width
    model = DiracNet(stem, features, _head(channels, num_classes, spatial=True))
    return init_weights(model, init)


@register("dirac", "conv", default_depth=28, depth=CIFAR_DEPTHS,
          depth_by_option={("layout", "imagenet"): (DepthRule(fixed=tuple(IMAGENET_STAGES)),)})
def dirac_conv(depth, *, input_shape, num_classes, width=1, layout="cifar", init=INIT):
    check_choice("dirac conv layout", layout, DIRAC_LAYOUTS)
    if layout == "imagenet":
        stem = nn.Sequential(nn.Conv2d(input_shape[0], 64 * width, 7, 2, 3, bias=False), BatchNorm2d(64 * width),
                             nn.MaxPool2d(3, 2, 1))
        return dirac_cnn(input_shape, num_classes, stem, 64 * width, [w * width for w in (64, 128, 256, 512)],
                         [2 * s for s in IMAGENET_STAGES[depth]], init)
    n = CIFAR_DEPTHS.blocks(depth)
    stem = nn.Sequential(conv3x3(input_shape[0], 16))
    return dirac_cnn(input_shape, num_classes, stem, 16, [16 * width, 32 * width, 64 * width], [2 * n] * 3, init)


@register("dirac", "mlp", default_depth=10)
def dirac_mlp(depth, *, input_shape, num_classes, width=50, init=INIT):
    stem = nn.Sequential(nn.Flatten(), nn.Linear(flat_features(input_shape), width))
    blocks = [DiracBlock(DiracLinear(width, width), width) for _ in range(depth)]
    model = DiracNet(stem, blocks, _head(width, num_classes, spatial=False))
    return init_weights(model, init)


