"""One thin LightningModule per family: each brings what its method needs via ``configure_callbacks``."""
from __future__ import annotations

import torch

from .errors import ConfigError
from .models.dirac import _DiracMixin
from .module import ImageClassifier

ALPHA_MODES = ("lagrangian", "unconstrained", "linear", "cosine", "off")


class PlainNetModule(ImageClassifier):
    """PlainNet; the proposed recipe's max-norm 3 comes in as MaxNormConstraint (``max_norm=3``)."""


class ResNetModule(ImageClassifier):
    """Pre-activation ResNet baseline."""


class HighwayModule(ImageClassifier):
    """Highway network baseline."""


class VANModule(ImageClassifier):
    """VAN: adds ``callbacks.AlphaScheduler`` to drive every alpha to 1.

    ``lambda_lr_ratio`` is eta'/eta: the paper uses 0.5 for its MLPs and 0.1 on CIFAR.
    ``phase_out_epochs`` is when the deterministic ``linear``/``cosine`` modes reach alpha = 1.
    """

    def __init__(self, *args, alpha_mode: str = "lagrangian", lambda_lr_ratio: float | None = None,
                 phase_out_epochs: int | None = None, **kwargs):
        if alpha_mode not in ALPHA_MODES:
            raise ConfigError(f"alpha mode must be one of {', '.join(ALPHA_MODES)}, got {alpha_mode!r}")
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    def configure_callbacks(self):
        callbacks = super().configure_callbacks()
        hp = self.hparams
        if hp.alpha_mode != "off":
            from callbacks import AlphaScheduler
            ratio = hp.lambda_lr_ratio if hp.lambda_lr_ratio is not None else (0.1 if hp.arch == "conv" else 0.5)
            callbacks.append(AlphaScheduler(mode=hp.alpha_mode, lambda_lr_ratio=ratio, end_epoch=hp.phase_out_epochs))
        return callbacks


class DiracNetModule(ImageClassifier):
    """DiracNet: logs the mean of ``a`` and ``b`` per Dirac layer every epoch (the paper's Fig. 2)."""

    def on_train_epoch_end(self):
        for name, layer in self.model.named_modules():
            if isinstance(layer, _DiracMixin):
                with torch.no_grad():
                    self.log(f"dirac/a/{name}", layer.a.mean().float(), sync_dist=False)
                    self.log(f"dirac/b/{name}", layer.b.mean().float(), sync_dist=False)


FAMILY_MODULES = {"plain": PlainNetModule, "van": VANModule, "dirac": DiracNetModule, "resnet": ResNetModule,
                  "highway": HighwayModule}


def module_class(model_name: str) -> type[ImageClassifier]:
    return FAMILY_MODULES.get(model_name, ImageClassifier)
