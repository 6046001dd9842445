"""Pre-activation residual networks, with or without VAN skip gates.

One implementation serves two families, since VAN is a pre-activation ResNet whose skip path
is scaled by ``(1 - alpha)``:

* ``resnet``: He et al.'s pre-activation ResNet (CIFAR basic blocks 6n+2, bottleneck 9n+2) and
  an MLP residual form.
* ``van`` (Monti et al.): ``x_{l+1} = F(x_l) + (1 - alpha_l) * x_l``, see ``deepplain.models.van``.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import BatchNorm1d, BatchNorm2d, conv3x3, flat_features, init_weights


class SkipGate(nn.Module):
    """Scales a skip path by ``1 - alpha``, one alpha per unit (MLP) or channel (conv).

    This is the VAN interface every callback relies on: a module with a parameter named
    ``alpha`` (initialised to 0, kept in [0, 1]) and a buffer named ``lagrange_lambda`` (the
    Lagrange multipliers, initialised to -1, saved in checkpoints); ``deepplain.callbacks.probing.skip_gates``
    finds them.
    """

    def __init__(self, units: int, lambda_init: float = -1.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(units))
        self.register_buffer("lagrange_lambda", torch.full((units,), float(lambda_init)))

    def factor(self, like: torch.Tensor) -> torch.Tensor:
        """``1 - alpha``, shaped to scale ``like`` (units on dimension 1)."""
        return (1 - self.alpha).to(like.dtype).view((1, -1) + (1,) * (like.dim() - 2))

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        return self.factor(skip) * skip

    def add_to(self, out: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``out + (1 - alpha) * skip`` (a block's output) in one multiply-add."""
        return torch.addcmul(out, skip, self.factor(skip))


class ResidualBlock(nn.Module):
    """``residual(x) + shortcut(x)``, with the shortcut scaled by ``(1 - alpha)`` when gated."""

    def __init__(self, residual: nn.Module, shortcut: nn.Module | None, units: int, gated: bool):
        super().__init__()
        self.residual = residual
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.gate = SkipGate(units) if gated else None

    def forward(self, x):
        skip = self.shortcut(x)
        out = self.residual(x)
        return out + skip if self.gate is None else self.gate.add_to(out, skip)


def preact_mlp_residual(width: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(norm=BatchNorm1d(width), act=nn.ReLU(), linear=nn.Linear(width, width)))


def preact_basic_residual(in_channels: int, channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        norm1=BatchNorm2d(in_channels), act1=nn.ReLU(), conv1=conv3x3(in_channels, channels, stride),
        norm2=BatchNorm2d(channels), act2=nn.ReLU(), conv2=conv3x3(channels, channels),
    ))


def preact_bottleneck_residual(in_channels: int, channels: int, stride: int, inner: int | None = None,
                               groups: int = 1) -> nn.Sequential:
    """1x1 -> 3x3 -> 1x1 to ``4 * channels``; the 3x3 works on ``inner`` channels (default ``channels``) in
    ``groups`` groups: He et al.'s bottleneck with the defaults, a ResNeXt block (Xie et al.) otherwise."""
    inner = channels if inner is None else inner
    return nn.Sequential(OrderedDict(
        norm1=BatchNorm2d(in_channels), act1=nn.ReLU(), conv1=nn.Conv2d(in_channels, inner, 1, bias=False),
        norm2=BatchNorm2d(inner), act2=nn.ReLU(), conv2=conv3x3(inner, inner, stride, groups=groups),
        norm3=BatchNorm2d(inner), act3=nn.ReLU(), conv3=nn.Conv2d(inner, 4 * channels, 1, bias=False),
    ))


class ResidualNet(nn.Module):
    """``stem -> blocks -> head``; each block is a ``ResidualBlock``."""

    def __init__(self, stem: nn.Module, blocks: list, head: nn.Module, init: str):
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head
        init_weights(self, init)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))

    def skip_gates(self):
        return [block.gate for block in self.blocks if block.gate is not None]

    def to_plain(self) -> nn.Sequential:
        """The network with every skip path removed: exact when every VAN alpha is 1.

        Raises ConfigError if a skip path still contributes (an ungated block, or any alpha < 1).
        """
        open_blocks = [i for i, b in enumerate(self.blocks) if b.gate is None]
        if open_blocks:
            raise ConfigError("only a VAN (every block gated) can be exported as a plain network; "
                              f"{len(open_blocks)} block(s) have ungated skip connections")
        alphas = torch.cat([g.alpha.detach().flatten() for g in self.skip_gates()])
        if not bool(torch.all(alphas == 1)):
            below = int((alphas < 1).sum())
            raise ConfigError(f"VAN export needs every alpha == 1; {below} of {alphas.numel()} alphas are below 1 "
                              f"(min {float(alphas.min()):.4g}); keep training with AlphaScheduler until they reach 1")
        parts = [copy.deepcopy(self.stem)] + [copy.deepcopy(b.residual) for b in self.blocks]
        return nn.Sequential(*parts, copy.deepcopy(self.head))


def residual_mlp(depth: int, input_shape, num_classes: int, width: int, gated: bool, init: str) -> ResidualNet:
    stem = nn.Sequential(nn.Flatten(), nn.Linear(flat_features(input_shape), width))
    blocks = [ResidualBlock(preact_mlp_residual(width), None, width, gated) for _ in range(depth)]
    head = nn.Sequential(OrderedDict(norm=BatchNorm1d(width), act=nn.ReLU(), linear=nn.Linear(width, num_classes)))
    return ResidualNet(stem, blocks, head, init)


def residual_cnn(input_shape, num_classes: int, group_widths, blocks_per_group: int, bottleneck: bool, gated: bool,
                 init: str, inner_widths=None, groups: int = 1) -> ResidualNet:
    """A 3x3 stem of ``group_widths[0]`` channels, then per group ``blocks_per_group`` blocks (stride 2 at the
    start of every group but the first, a 1x1 projection skip where the shape changes), then BN-ReLU-pool-linear.
    Bottleneck blocks put out ``4 * width``; ``inner_widths`` and ``groups`` make them ResNeXt blocks."""
    stem_width = group_widths[0]
    inner_widths = list(inner_widths) if inner_widths is not None else [None] * len(group_widths)
    stem = conv3x3(input_shape[0], stem_width)
    blocks, channels = [], stem_width
    for group, (width, inner) in enumerate(zip(group_widths, inner_widths)):
        for index in range(blocks_per_group):
            stride = 2 if group > 0 and index == 0 else 1
            out_channels = 4 * width if bottleneck else width
            residual = (preact_bottleneck_residual(channels, width, stride, inner, groups) if bottleneck
                        else preact_basic_residual(channels, width, stride))
            shortcut = None
            if stride != 1 or channels != out_channels:
                shortcut = nn.Conv2d(channels, out_channels, 1, stride=stride, bias=False)
            blocks.append(ResidualBlock(residual, shortcut, out_channels, gated))
            channels = out_channels
    head = nn.Sequential(OrderedDict(norm=BatchNorm2d(channels), act=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                                     flatten=nn.Flatten(), linear=nn.Linear(channels, num_classes)))
    return ResidualNet(stem, blocks, head, init)


class SkiplessNet(nn.Sequential):
    """A residual network's stem, residual branches and head in a chain: the same layers, no skip paths."""

    def __init__(self, net: ResidualNet):
        super().__init__(OrderedDict(stem=net.stem, blocks=nn.Sequential(*[b.residual for b in net.blocks]),
                                     head=net.head))
