"""Pre-activation ResNet baselines (He et al., Identity Mappings in Deep Residual Networks).

``conv``: CIFAR ResNets of widths 16k/32k/64k with basic blocks (two 3x3 convs, depth 6n+2) or
bottleneck blocks (1x1-3x3-1x1, depth 9n+2). ``block=None`` picks by depth as He et al. do: a depth
that only one rule gives takes that block (32, 44: basic; 29, 1001: bottleneck); a depth both give
is basic below 164 (ResNet-20, -56, -110) and bottleneck from 164 on (ResNet-164: 1.7M parameters).
``layout="coursework"``: the coursework report's VGG38 + RC (``deepplain.models.coursework``; depth 6n+2,
``--norm none`` for RC alone, ``--norm bn`` for BN + RC).
``mlp``: a Linear layer, ``depth`` blocks ``x + Linear(ReLU(BN(x)))``, BN -> ReLU -> classifier.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..layers import ACTIVATION, INIT, NEGATIVE_SLOPE, NORM, check_choice
from ..registry import DepthRule, define_family, register
from . import coursework
from .residual import residual_cnn, residual_mlp

define_family("resnet", "pre-activation ResNet baseline (identity skip connections)",
              "He et al., Identity Mappings in Deep Residual Networks", module="deepplain.family_modules:ResNetModule")
BLOCKS = ("basic", "bottleneck")
LAYOUTS = ("preact", "coursework")
BOTTLENECK_FROM = 164  # He et al. use bottleneck blocks from ResNet-164 on
# 3 groups of n blocks of 2 (basic) or 3 (bottleneck) layers, plus the stem and the classifier
BASIC_DEPTHS = DepthRule(6, 2, examples="8, 14, 20, ..., 56, 110", label="with basic blocks")
BOTTLENECK_DEPTHS = DepthRule(9, 2, examples="11, 20, 29, ..., 164, 1001", label="with bottleneck blocks")


def block_for_depth(depth: int) -> str:
    """The block He et al. would use at ``depth`` (see the module docstring)."""
    basic, bottleneck = BASIC_DEPTHS.allows(depth), BOTTLENECK_DEPTHS.allows(depth)
    if basic and bottleneck:
        return "bottleneck" if depth >= BOTTLENECK_FROM else "basic"
    if basic or bottleneck:
        return "basic" if basic else "bottleneck"
    raise ConfigError(f"resnet conv depth must be {BASIC_DEPTHS.describe()} or {BOTTLENECK_DEPTHS.describe()}, "
                      f"got {depth}")


def _block_by_depth(depth: int, options: dict) -> dict:
    if options.get("block") is not None or options.get("layout") == "coursework":
        return options
    return {**options, "block": block_for_depth(depth)}


@register("resnet", "mlp", default_depth=10)
def resnet_mlp(depth, *, input_shape, num_classes, width=50, init=INIT):
    return residual_mlp(depth, input_shape, num_classes, width, gated=False, init=init)


@register("resnet", "conv", default_depth=56, depth=(BASIC_DEPTHS, BOTTLENECK_DEPTHS),
          depth_by_option={("layout", "coursework"): (coursework.DEPTHS,),
                           ("block", "basic"): (BASIC_DEPTHS,), ("block", "bottleneck"): (BOTTLENECK_DEPTHS,)},
          pick_options=_block_by_depth)
def resnet_conv(depth, *, input_shape, num_classes, width=1, block=None, init=INIT, layout="preact",
                norm=NORM, activation=ACTIVATION, negative_slope=NEGATIVE_SLOPE):
    check_choice("resnet conv layout", layout, LAYOUTS)
    if layout == "coursework":
        if block is not None:
            raise ConfigError("resnet conv layout coursework has its own blocks; --block applies to layout preact")
        return coursework.CourseworkVGG(depth, input_shape, num_classes, width, norm, activation, negative_slope,
                                        init, residual=True)
    if (norm, activation) != ("bn", "relu"):
        raise ConfigError(f"resnet conv layout preact is BN + ReLU (--norm and --activation apply to layout "
                          f"coursework), got --norm {norm} --activation {activation}")
    block = block_for_depth(depth) if block is None else check_choice("resnet block", block, BLOCKS)
    n = (BASIC_DEPTHS if block == "basic" else BOTTLENECK_DEPTHS).blocks(depth)
    return residual_cnn(input_shape, num_classes, [16 * width, 32 * width, 64 * width], n,
                        bottleneck=block == "bottleneck", gated=False, init=init)
