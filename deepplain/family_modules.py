"""One thin LightningModule per family: each brings what its method needs via ``configure_callbacks``.

Each family's record (``deepplain.registry``) names its module here; ``module_class(name)`` looks it up.
"""
from __future__ import annotations

import torch

from .callbacks import AlphaScheduler
from .errors import ConfigError
from .models.dirac import _DiracMixin
from .module import ImageClassifier
from .registry import get_family
from .schema import ALPHA_MODES, DEFAULTS


class PlainNetModule(ImageClassifier):
    """PlainNet; the proposed recipe's max-norm 3 comes in as MaxNormConstraint (``max_norm=3``)."""


class ResNetModule(ImageClassifier):
    """Pre-activation ResNet baseline."""


class ResNeXtModule(ImageClassifier):
    """ResNeXt baseline (grouped bottleneck convolutions)."""


class HighwayModule(ImageClassifier):
    """Highway network baseline."""


class VANModule(ImageClassifier):
    """VAN: adds ``deepplain.callbacks.AlphaScheduler`` to drive every alpha to 1.

    ``lambda_lr_ratio`` is eta'/eta (default: the paper's, 0.5 for its MLPs and 0.1 for its conv
    networks; see ``AlphaScheduler``). ``phase_out`` is when the skips must be gone: a share of training
    (< 1) or an epoch (default 120/165, the paper's Fig. 2). ``alpha_mode="off"`` adds no scheduler.
    """

    def __init__(self, *args, alpha_mode: str = DEFAULTS["alpha_mode"], lambda_lr_ratio: float | None = None,
                 phase_out: float | None = None, **kwargs):
        if alpha_mode not in ALPHA_MODES:
            raise ConfigError(f"alpha mode must be one of {', '.join(ALPHA_MODES)}, got {alpha_mode!r}")
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    def make_callbacks(self) -> list:
        callbacks = super().make_callbacks()
        hp = self.hparams
        if hp.alpha_mode != "off":
            callbacks.append(AlphaScheduler(mode=hp.alpha_mode, lambda_lr_ratio=hp.lambda_lr_ratio,
                                            phase_out=hp.phase_out))
        return callbacks


class DiracNetModule(ImageClassifier):
    """DiracNet: logs the mean of ``a`` and ``b`` per Dirac layer every epoch (the paper's Fig. 2)."""

    def on_train_epoch_end(self):
        super().on_train_epoch_end()
        for name, layer in self.model.named_modules():
            if isinstance(layer, _DiracMixin):
                with torch.no_grad():
                    self.log(f"dirac/a/{name}", layer.a.mean().float(), sync_dist=False)
                    self.log(f"dirac/b/{name}", layer.b.mean().float(), sync_dist=False)


def module_class(model_name: str) -> type[ImageClassifier]:
    """The LightningModule of family ``model_name`` (its registry record says which)."""
    return get_family(model_name).module_class()
