"""The LightningModule that wraps any model family for image classification."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from .layers import count_parameters
from .optim import make_optimizer, make_scheduler
from .registry import build_model


class ImageClassifier(L.LightningModule):
    """Cross-entropy classifier around ``deepplain.build_model(model, depth, ...)``.

    Every constructor argument is saved with ``save_hyperparameters``, so
    ``ImageClassifier.load_from_checkpoint(path)`` (or the family's subclass) rebuilds the model
    with no extra arguments.
    """

    def __init__(self, model: str = "plain", depth: int = 10, arch: str = "mlp", input_shape=(1, 28, 28),
                 num_classes: int = 10, model_options: dict | None = None, optimizer: str = "sgd", lr: float = 0.1,
                 momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0, schedule: str = "none",
                 milestones=(0.5, 0.75), gamma: float = 0.1, max_norm: float | None = None,
                 channels_last: bool = False, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model, depth, arch=arch, input_shape=tuple(input_shape), num_classes=num_classes,
                                 **(model_options or {}))
        self.example_input_array = torch.zeros(2, *input_shape)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro"))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._compiled = None

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def forward(self, x):
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.hparams.compile:
            if self._compiled is None:  # kept out of the module tree so checkpoints keep plain names
                object.__setattr__(self, "_compiled", torch.compile(self.model))
            return self._compiled(x)
        return self.model(x)

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        metric = getattr(self, f"{stage}_acc")
        metric(logits.detach(), y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), on_step=on_step, on_epoch=True, prog_bar=True,
                 sync_dist=stage != "train", batch_size=y.shape[0])
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = make_optimizer(self.model, hp.optimizer, hp.lr, hp.momentum, hp.nesterov, hp.weight_decay)
        epochs = self.trainer.max_epochs if self.trainer and self.trainer.max_epochs else 1
        scheduler = make_scheduler(optimizer, hp.schedule, epochs, hp.milestones, hp.gamma)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def configure_callbacks(self):
        callbacks = []
        if self.hparams.max_norm:
            from callbacks import MaxNormConstraint
            callbacks.append(MaxNormConstraint(self.hparams.max_norm))
        return callbacks
