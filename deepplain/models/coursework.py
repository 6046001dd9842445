"""The coursework report's VGG08 / VGG38 (``../shared/papers/004_*``, MLP coursework 2), with or without
batch norm and residual connections.

Every conv has ``32 * width`` filters of 3x3 and no bias (the report's counts: VGG08 60K, VGG38 336K
parameters; BN adds 64 per conv). An entry conv, then three stages of ``n`` two-conv blocks: ``n - 1``
*processing* blocks (conv-act-conv-act) and one *dimensionality-reduction* block (conv-act-avgpool 2x2-
conv-act); then global average pooling and a linear classifier. Depth ``6n+2`` counts the convs and the
classifier: VGG08 is n=1 (reduction blocks only), VGG38 n=6. With BN, each conv is followed by BN before
the activation. With residual connections (``residual=True``: ``--model resnet --layout coursework``)
each processing block adds its input "from before the convolution layer to before the final activation
function of the block" (the report, after He et al. 2016's Fig. 2): ``act(f(x) + x)``; the reduction
blocks change the shape and keep no skip, which adds no parameter (VGG38 + RC: 336K, as reported).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..layers import conv3x3, init_weights, make_activation, make_norm
from ..registry import DepthRule

DEPTHS = DepthRule(6, 2, examples="8 (VGG08), 14, 20, 26, 32, 38 (VGG38), ...")
FILTERS = 32  # per conv, times the width factor


class ConvUnit(nn.Sequential):
    """conv 3x3 (no bias) -> [BN]."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__(OrderedDict(conv=conv3x3(in_channels, out_channels), norm=make_norm(norm, out_channels, 2)))


class CourseworkBlock(nn.Module):
    """Two conv units with an activation after each; a reduction block average-pools between them, a
    residual one adds its input before the second activation."""

    def __init__(self, channels: int, norm: str, activation: str, negative_slope: float, reduce: bool,
                 residual: bool):
        super().__init__()
        self.unit1 = ConvUnit(channels, channels, norm)
        self.act1 = make_activation(activation, negative_slope)
        self.pool = nn.AvgPool2d(2) if reduce else nn.Identity()
        self.unit2 = ConvUnit(channels, channels, norm)
        self.act2 = make_activation(activation, negative_slope)
        self.residual = residual and not reduce

    def forward(self, x):
        out = self.unit2(self.pool(self.act1(self.unit1(x))))
        return self.act2(out + x if self.residual else out)


class CourseworkVGG(nn.Module):
    def __init__(self, depth: int, input_shape, num_classes: int, width: int, norm: str, activation: str,
                 negative_slope: float, init: str, residual: bool):
        super().__init__()
        channels, n = FILTERS * width, DEPTHS.blocks(depth)
        self.entry = nn.Sequential(OrderedDict(unit=ConvUnit(input_shape[0], channels, norm),
                                               act=make_activation(activation, negative_slope)))
        self.stages = nn.Sequential(*[
            nn.Sequential(*[CourseworkBlock(channels, norm, activation, negative_slope, reduce=index == n - 1,
                                            residual=residual) for index in range(n)])
            for _ in range(3)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self, init, activation, negative_slope)

    def forward(self, x):
        return self.classifier(self.pool(self.stages(self.entry(x))))
