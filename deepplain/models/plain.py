"""PlainNet (Oyedotun et al.): deep networks with no skip connection anywhere.

* ``plain``/``mlp``: ``depth`` hidden layers Linear -> [BatchNorm] -> activation, then a linear
  classifier. The paper's variants are flag combinations: naive (``norm=none``, ReLU),
  PlainNet-BN (``norm=bn``, ReLU) and the proposed recipe (BN + LeakyReLU 0.3 + max-norm 3 +
  He-uniform; max-norm is the MaxNormConstraint callback, added by ``PlainNetModule``).
* ``plain``/``conv``: ``layout="vgg"`` (default) is a VGG-style stack for any depth ``3n+2``: a
  3x3 stem, three groups of ``n`` 3x3 convs of widths 16k/32k/64k with 2x2 max-pool between
  them, global average pool and a linear classifier. ``layout="oyedotun-50"`` is the 50-layer
  PlainNet of the paper's Table A1 (see ``OYEDOTUN_50``). ``layout="coursework"`` is the coursework
  report's VGG08 / VGG38 (``deepplain.models.coursework``, depth 6n+2). ``layout="resnet"`` is the
  pre-activation ResNet of the same depth with every skip path removed (the same layers, stem,
  BN-ReLU-conv residual branches and head, chained; the projection shortcuts go with the skips): the
  plain net of the blog post's PlainNet / ResNet / ResNeXt comparison at 164 layers.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..errors import ConfigError
from ..layers import (ACTIVATION, NEGATIVE_SLOPE, NORM, check_choice, flat_features, init_weights, make_activation,
                      make_norm)
from ..registry import DepthRule, define_family, register
from . import coursework
from .resnet import BASIC_DEPTHS, BOTTLENECK_DEPTHS, resnet_conv
from .residual import SkiplessNet

define_family("plain", "no skip connections: Linear -> [BN] -> activation, repeated",
              "Oyedotun et al., Revisiting the Training of Very Deep Neural Networks without Skip Connections",
              module="deepplain.family_modules:PlainNetModule")
VGG_DEPTHS = DepthRule(3, 2, examples="5, 8, 11, 14, ..., 56, ...")

# Table A1 of Oyedotun et al. as (out_channels, kernel) per conv, "M2"/"M3" for max-pools.
# The printed table skips Conv_49; we use 96 filters of 3x3 there: it continues the last group's
# 96-channel pattern and brings the total to 0.725M parameters, the paper's 0.72M.
_G1 = [(16, 3), (16, 1), (16, 3)] + [(32, 1), (16, 1), (16, 3)] * 4 + [(32, 1), (48, 1)]
_G2 = [(48, 1), (64, 3), (64, 1)] + [(48, 1), (48, 3), (64, 1)] * 5 + [(80, 3)]
_G3 = [(80, 1), (80, 3), (96, 1)] * 4 + [(96, 3), (128, 3)]
OYEDOTUN_50 = _G1 + ["M2"] + _G2 + ["M3"] + _G3
PLAINNET_INIT = "he-uniform"  # the PlainNet paper's init (the other families: layers.INIT)
CONV_LAYOUTS = ("vgg", "oyedotun-50", "coursework", "resnet")


def dense_layer(in_features: int, out_features: int, norm: str, activation: str,
                negative_slope: float) -> nn.Sequential:
    # A bias is redundant in front of batch norm, so it is only kept without one.
    return nn.Sequential(OrderedDict(
        linear=nn.Linear(in_features, out_features, bias=norm == "none"),
        norm=make_norm(norm, out_features, 1),
        act=make_activation(activation, negative_slope, out_features if activation == "prelu" else 1),
    ))


def conv_layer(in_channels: int, out_channels: int, kernel: int, norm: str, activation: str,
               negative_slope: float) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=norm == "none"),
        norm=make_norm(norm, out_channels, 2),
        act=make_activation(activation, negative_slope, out_channels if activation == "prelu" else 1),
    ))


@register("plain", "mlp", default_depth=10)
class PlainMLP(nn.Module):
    def __init__(self, depth: int, input_shape, num_classes: int, width: int = 300, activation: str = ACTIVATION,
                 negative_slope: float = NEGATIVE_SLOPE, norm: str = NORM, init: str = PLAINNET_INIT):
        super().__init__()
        layers, in_features = [nn.Flatten()], flat_features(input_shape)
        for _ in range(depth):
            layers.append(dense_layer(in_features, width, norm, activation, negative_slope))
            in_features = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        init_weights(self, init, activation, negative_slope)

    def forward(self, x):
        return self.classifier(self.features(x))


class PlainConvNet(nn.Module):
    """A chain of conv layers and max-pools, then global average pool and a linear classifier."""

    def __init__(self, spec, input_shape, num_classes: int, activation: str = ACTIVATION,
                 negative_slope: float = NEGATIVE_SLOPE,
                 norm: str = NORM, init: str = PLAINNET_INIT):
        super().__init__()
        layers, channels = [], input_shape[0]
        for item in spec:
            if item == "M2":
                layers.append(nn.MaxPool2d(2, 2))
            elif item == "M3":
                layers.append(nn.MaxPool2d(3, 2))
            else:
                out_channels, kernel = item
                layers.append(conv_layer(channels, out_channels, kernel, norm, activation, negative_slope))
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self, init, activation, negative_slope)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def vgg_spec(depth: int, width: int) -> list:
    n = VGG_DEPTHS.blocks(depth)
    spec = [(16 * width, 3)]
    for group, channels in enumerate((16 * width, 32 * width, 64 * width)):
        if group:
            spec.append("M2")
        spec += [(channels, 3)] * n
    return spec


@register("plain", "conv", default_depth=20, depth=VGG_DEPTHS,
          depth_by_option={("layout", "oyedotun-50"): (DepthRule(fixed=(50,)),),
                           ("layout", "coursework"): (coursework.DEPTHS,),
                           ("layout", "resnet"): (BASIC_DEPTHS, BOTTLENECK_DEPTHS)})
def plain_conv(depth, *, input_shape, num_classes, width=1, activation=ACTIVATION, negative_slope=NEGATIVE_SLOPE,
               norm=NORM,
               init=PLAINNET_INIT, layout="vgg"):
    check_choice("plain conv layout", layout, CONV_LAYOUTS)
    if layout == "coursework":
        return coursework.CourseworkVGG(depth, input_shape, num_classes, width, norm, activation, negative_slope,
                                        init, residual=False)
    if layout == "resnet":
        if (activation, norm) != ("relu", "bn"):
            raise ConfigError(f"plain conv layout resnet is a pre-activation ResNet's layers (BN + ReLU), got "
                              f"--norm {norm} --activation {activation}")
        return SkiplessNet(resnet_conv(depth, input_shape=input_shape, num_classes=num_classes, width=width,
                                       init=init))
    if layout == "oyedotun-50":
        if width != 1:
            raise ConfigError(f"plain conv layout oyedotun-50 has fixed widths (width 1), got {width}")
        spec = OYEDOTUN_50
    else:
        spec = vgg_spec(depth, width)
    return PlainConvNet(spec, input_shape, num_classes, activation, negative_slope, norm, init)
