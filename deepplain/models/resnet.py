"""Pre-activation ResNet baselines (He et al., Identity Mappings in Deep Residual Networks).

``conv``: CIFAR ResNets with basic blocks (depth 6n+2: 20, 56, 110, ...) or, with
``block="bottleneck"``, bottleneck blocks (depth 9n+2: ResNet-164), widths 16k/32k/64k.
``mlp``: a Linear layer, ``depth`` blocks ``x + Linear(ReLU(BN(x)))``, BN -> ReLU -> classifier.
"""
from __future__ import annotations

from ..layers import check_choice
from ..registry import register
from .residual import blocks_for_depth, residual_cnn, residual_mlp

PAPER = "He et al., Identity Mappings in Deep Residual Networks"


@register("resnet", "mlp", summary="pre-activation ResNet baseline (identity skip connections)", paper=PAPER)
def resnet_mlp(depth, *, input_shape, num_classes, width=50, init="he-normal"):
    return residual_mlp(depth, input_shape, num_classes, width, gated=False, init=init)


@register("resnet", "conv")
def resnet_conv(depth, *, input_shape, num_classes, width=1, block="basic", init="he-normal"):
    check_choice("resnet block", block, ("basic", "bottleneck"))
    if block == "basic":
        n = blocks_for_depth("resnet conv (basic blocks)", depth, per_block=2, examples="; e.g. 56, 110")
    else:
        n = blocks_for_depth("resnet conv (bottleneck blocks)", depth, per_block=3, examples="; e.g. 164")
    return residual_cnn(input_shape, num_classes, [16 * width, 32 * width, 64 * width], n,
                        bottleneck=block == "bottleneck", gated=False, init=init)
