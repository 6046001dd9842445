"""VAN: Variable Activation Networks (Monti, Tootoonian & Cao, 2018).

``x_{l+1} = F(x_l) + (1 - alpha_l) * x_l`` with one alpha per unit (MLP) or channel (conv),
initialised to 0 (a ResNet) and driven to 1 (a plain network) by Lagrange multipliers. The
update rule lives in ``callbacks.AlphaScheduler``; the model only holds the state:

* every ``SkipGate`` module has a parameter ``alpha`` and a buffer ``lagrange_lambda`` (-1 at
  start), found with ``deepplain.callbacks.probing.skip_gates`` (or ``model.skip_gates()``);
* ``model.to_plain()`` (also ``deepplain.fold``) returns the plain network once every alpha is 1.

Forms: ``mlp`` -- a plain Linear layer, then ``depth`` blocks BN -> ReLU -> Linear (width 50 by
default, as in the paper), then BN -> ReLU -> Linear classifier. ``conv`` -- a 3x3 stem, 4 groups
of ``n`` pre-activation blocks (BN-ReLU-conv-BN-ReLU-conv) of widths 16k/32k/64k/128k, stride 2 at
the start of groups 2-4 (with a 1x1 projection skip, gated like the others), depth ``8n+2``.
"""
from __future__ import annotations

from ..layers import INIT
from ..registry import DepthRule, define_family, register
from .residual import residual_cnn, residual_mlp

define_family("van", "skip connections scaled by (1 - alpha), alpha driven to 1 by Lagrange multipliers",
              "Monti et al., Avoiding degradation in deep feed-forward networks by phasing out skip-connections",
              module="deepplain.family_modules:VANModule")
CONV_DEPTHS = DepthRule(8, 2, examples="10, 18, 26, 34, ...; VAN-26 is n=3")  # 4 groups of n two-conv blocks


@register("van", "mlp", default_depth=10)
def van_mlp(depth, *, input_shape, num_classes, width=50, init=INIT):
    return residual_mlp(depth, input_shape, num_classes, width, gated=True, init=init)


@register("van", "conv", default_depth=26, depth=CONV_DEPTHS)
def van_conv(depth, *, input_shape, num_classes, width=1, init=INIT):
    n = CONV_DEPTHS.blocks(depth)
    return residual_cnn(input_shape, num_classes, [16 * width, 32 * width, 64 * width, 128 * width], n,
                        bottleneck=False, gated=True, init=init)
