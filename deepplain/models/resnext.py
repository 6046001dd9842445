"""ResNeXt (Xie et al., Aggregated Residual Transformations for Deep Neural Networks), CIFAR form.

Our pre-activation ResNet's bottleneck network (``deepplain.models.residual``: depth 9n+2, three
groups, stride 2 at the start of groups 2 and 3, projection shortcuts where the shape changes) with the
3x3 conv of each block split into ``cardinality`` groups of ``bottleneck_width`` channels at the first
stage, doubling at each stage. Block outputs are ``64k / 128k / 256k`` for widening factor ``width=k``
and the stem ``16k``, as in our ResNet: ``width=4`` is the paper's CIFAR net (stem 64, outputs 256 /
512 / 1024), e.g. ResNeXt-29 8x64d (34.4M parameters in the paper); ``width=1, cardinality=1,
bottleneck_width=16`` is exactly our ResNet-164 at depth 164. The paper's blocks are post-activation
(conv-BN-ReLU); ours are pre-activation like the ResNet baseline, so that the two differ only in the
grouped convolution (the parameter count is the same up to the BN layers).
"""
from __future__ import annotations

from ..layers import INIT
from ..registry import define_family, register
from .residual import residual_cnn
from .resnet import BOTTLENECK_DEPTHS

define_family("resnext", "pre-activation ResNet with grouped bottleneck convs (cardinality x bottleneck width)",
              "Xie et al., Aggregated Residual Transformations for Deep Neural Networks",
              module="deepplain.family_modules:ResNeXtModule")


@register("resnext", "conv", default_depth=29, depth=BOTTLENECK_DEPTHS)
def resnext_conv(depth, *, input_shape, num_classes, width=4, cardinality=8, bottleneck_width=64, init=INIT):
    inner = [cardinality * bottleneck_width * 2 ** stage for stage in range(3)]
    return residual_cnn(input_shape, num_classes, [16 * width, 32 * width, 64 * width], BOTTLENECK_DEPTHS.blocks(depth),
                        bottleneck=True, gated=False, init=init, inner_widths=inner, groups=cardinality)
