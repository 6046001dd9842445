"""Pre-activation ResNet baselines (He et al., Identity Mappings in Deep Residual Networks).

``conv``: CIFAR ResNets of widths 16k/32k/64k with basic blocks (two 3x3 convs, depth 6n+2) or
bottleneck blocks (1x1-3x3-1x1, depth 9n+2). ``block=None`` picks by depth as He et al. do: a depth
that only one rule gives takes that block (32, 44: basic; 29, 1001: bottleneck); a depth both give
is basic below 164 (ResNet-20, -56, -110) and bottleneck from 164 on (ResNet-164: 1.7M parameters).
``mlp``: a Linear layer, ``depth`` blocks ``x + Linear(ReLU(BN(x)))``, BN -> ReLU -> classifier.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..layers import check_choice
from ..registry import register
from .residual import blocks_for_depth, residual_cnn, residual_mlp

PAPER = "He et al., Identity Mappings in Deep Residual Networks"
BLOCKS = ("basic", "bottleneck")
BOTTLENECK_FROM = 164  # He et al. use bottleneck blocks from ResNet-164 on


def block_for_depth(depth: int) -> str:
    """The block He et al. would use at ``depth`` (see the module docstring)."""
    basic, bottleneck = depth >= 8 and (depth - 2) % 6 == 0, depth >= 11 and (depth - 2) % 9 == 0
    if basic and bottleneck:
        return "bottleneck" if depth >= BOTTLENECK_FROM else "basic"
    if basic or bottleneck:
        return "basic" if basic else "bottleneck"
    raise ConfigError(f"resnet conv depth must be 6n+2 with basic blocks (8, 14, 20, ..., 56, 110) or 9n+2 with "
                      f"bottleneck blocks (11, 20, 29, ..., 164, 1001), got {depth}")


@register("resnet", "mlp", summary="pre-activation ResNet baseline (identity skip connections)", paper=PAPER)
def resnet_mlp(depth, *, input_shape, num_classes, width=50, init="he-normal"):
    return residual_mlp(depth, input_shape, num_classes, width, gated=False, init=init)


@register("resnet", "conv")
def resnet_conv(depth, *, input_shape, num_classes, width=1, block=None, init="he-normal"):
    block = block_for_depth(depth) if block is None else check_choice("resnet block", block, BLOCKS)
    if block == "basic":
        n = blocks_for_depth("resnet conv (basic blocks)", depth, per_block=2, examples="; e.g. 56, 110")
    else:
        n = blocks_for_depth("resnet conv (bottleneck blocks)", depth, per_block=3, examples="; e.g. 164")
    return residual_cnn(input_shape, num_classes, [16 * width, 32 * width, 64 * width], n,
                        bottleneck=block == "bottleneck", gated=False, init=init)
