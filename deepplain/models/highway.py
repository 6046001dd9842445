"""Highway networks (Srivastava, Greff & Schmidhuber, Training Very Deep Networks).

MLP form: a plain Linear -> BN -> ReLU layer, then ``depth`` highway layers
``y = H(x) * T(x) + x * (1 - T(x))`` with ``H = ReLU(BN(W_H x))`` and the transform gate
``T = sigmoid(W_T x + b_T)``; ``b_T`` starts negative (``gate_bias``, default -2) so each layer
begins by carrying its input, as the paper recommends for deep highway nets. Width 50 by default.

``W_T`` starts at zero, so at initialisation every gate is the constant ``sigmoid(b_T)`` (it then learns
from the first step: its gradient ``(H - x) T (1 - T) x`` is not zero). With ``W_T`` initialised like
``W_H`` the gate's own Jacobian term ``(H - x) T (1 - T) W_T`` is of order one in every layer, so the
backward pass grows geometrically with depth: on a Fashion-MNIST batch at depth 30 the first layer's
gradient was 3e2-7e3 (4 seeds) against 0.6 with ``W_T = 0`` and 2.8 for the pre-activation ResNet.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers import INIT, NORM, flat_features, init_weights, make_norm
from ..registry import define_family, register

define_family("highway", "gated skip connections: y = H*T + x*(1-T)", "Srivastava et al., Training Very Deep Networks",
              module="deepplain.family_modules:HighwayModule")


class HighwayLayer(nn.Module):
    def __init__(self, width: int, norm: str, gate_bias: float):
        super().__init__()
        self.transform = nn.Sequential(OrderedDict(linear=nn.Linear(width, width, bias=norm == "none"),
                                                   norm=make_norm(norm, width, 1), act=nn.ReLU()))
        self.gate = nn.Linear(width, width)
        self.gate_bias = gate_bias

    def reset_gate(self):
        nn.init.zeros_(self.gate.weight)  # an input-independent gate at init: see the module docstring
        nn.init.constant_(self.gate.bias, self.gate_bias)

    def forward(self, x):
        t = torch.sigmoid(self.gate(x))
        return self.transform(x) * t + x * (1 - t)


@register("highway", "mlp", default_depth=10)
class HighwayMLP(nn.Module):
    def __init__(self, depth, input_shape, num_classes, width=50, norm=NORM, gate_bias=-2.0, init=INIT):
        super().__init__()
        gate_bias = float(gate_bias)
        self.stem = nn.Sequential(OrderedDict(flatten=nn.Flatten(),
                                              linear=nn.Linear(flat_features(input_shape), width, bias=norm == "none"),
                                              norm=make_norm(norm, width, 1), act=nn.ReLU()))
        self.blocks = nn.Sequential(*[HighwayLayer(width, norm, gate_bias) for _ in range(depth)])
        self.classifier = nn.Linear(width, num_classes)
        init_weights(self, init)
        for layer in self.blocks:
            layer.reset_gate()  # after init_weights, which would give the gate W_H's init

    def forward(self, x):
        return self.classifier(self.blocks(self.stem(x)))

