"""The LightningModule that wraps any model family for image classification."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .callbacks import MaxNormConstraint
from .errors import ConfigError
from .layers import count_parameters
from .optim import make_optimizer, make_scheduler
from .presets import RECIPES
from .registry import build_model, family_naming, get_family
from .schema import DEFAULTS

# Without a dataset, an ImageClassifier is an MLP on MNIST-sized inputs trained by the MLP recipe
ARCH = "mlp"
RECIPE = RECIPES[ARCH]
DEPTH = get_family(DEFAULTS["model"]).form(ARCH).default_depth
from .status import METRIC_TAGS, STEP_LOSS_TAG


class ImageClassifier(L.LightningModule):
    """Cross-entropy classifier around ``deepplain.build_model(model, depth, ...)`` (``label_smoothing``
    smooths the training target; validation and test report the plain cross-entropy).

    Every constructor argument is saved with ``save_hyperparameters``, so
    ``ImageClassifier.load_from_checkpoint(path)`` (or the family's subclass) rebuilds the model
    with no extra arguments. The training epoch's loss and accuracy are metric states saved in
    checkpoints, so a run resumed in the middle of an epoch reports the whole epoch; they are logged in
    ``on_{train,validation,test}_epoch_end``, so a subclass that overrides one of those calls ``super()``.
    """

    family: str | None = None  # a family's own module takes only that family's models (set from its record)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        named = family_naming(f"{cls.__module__}:{cls.__qualname__}")  # the record that names this class
        if named is not None:
            cls.family = named

    def __init__(self, model: str = DEFAULTS["model"], depth: int = DEPTH, arch: str = ARCH, input_shape=(1, 28, 28),
                 num_classes: int = 10, model_options: dict | None = None, optimizer: str = DEFAULTS["optimizer"],
                 lr: float = RECIPE["lr"], momentum: float = DEFAULTS["momentum"],
                 nesterov: bool = DEFAULTS["nesterov"],
                 weight_decay: float = RECIPE["weight_decay"], schedule: str = RECIPE["schedule"],
                 milestones=tuple(RECIPE["milestones"]),
                 gamma: float = DEFAULTS["gamma"], max_norm: float | None = DEFAULTS["max_norm"],
                 max_norm_classifier: bool = DEFAULTS["max_norm_classifier"],
                 channels_last: bool = DEFAULTS["channels_last"], compile: bool = DEFAULTS["compile"],
                 label_smoothing: float = DEFAULTS["label_smoothing"]):
        super().__init__()
        family = getattr(type(self), "family", None)
        if family is not None and model != family:  # e.g. PlainNetModule.load_from_checkpoint(a VAN run)
            raise ConfigError(f"{type(self).__name__} is the {family} family's module, but this checkpoint or argument "
                              f"is a {model} model; use deepplain.family_modules.module_class({model!r})")
        self.save_hyperparameters()
        self.model = build_model(model, depth, arch=arch, input_shape=tuple(input_shape), num_classes=num_classes,
                                 **(model_options or {}))
        self.example_input_array = torch.zeros(2, *input_shape)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro"))
            setattr(self, f"{stage}_loss", MeanMetric())
        self.train_acc.persistent(True)
        self.train_loss.persistent(True)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._compiled = None
        self._method_callbacks = None

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def forward(self, x):
        if x.is_floating_point() and self.dtype == torch.float64:
            x = x.double()  # --precision 64: the data path yields float32
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
        # Label smoothing shapes the training target only: val/test loss stay the plain cross-entropy,
        # comparable across runs with and without it.
        smoothing = self.hparams.get("label_smoothing", 0.0) if stage == "train" else 0.0
        loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        # update(), not the metrics' forward(), and the epoch values logged once at the epoch's end: forward()
        # computes every batch's own value too, and a Metric object given to self.log is moved to the device
        # by Lightning at every step; together 5% of a small model's step (benchmarks/profile_loop.py).
        getattr(self, f"{stage}_acc").update(logits.detach(), y)
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=y.shape[0])
        if stage == "train" and self._step_loss_is_read():
            self.log(STEP_LOSS_TAG, loss.detach(), on_step=True, on_epoch=False, prog_bar=True,
                     batch_size=y.shape[0])
        return loss

    def _step_loss_is_read(self) -> bool:
        """Whether this step's loss reaches anyone: a progress bar, or a logger at one of its logging steps.
        Logging it at the other steps cost 2% of a small model's step (benchmarks/framework_overhead.py)."""
        trainer = self._trainer
        if trainer is None or trainer.progress_bar_callback is not None:
            return True
        connector = getattr(trainer, "_logger_connector", None)  # Lightning's own rule for a logging step
        return bool(getattr(connector, "should_update_logs", True))

    def _log_epoch(self, stage: str) -> None:
        """The epoch's mean loss and accuracy (over every DDP rank: torchmetrics gathers them in compute())."""
        for what in ("loss", "acc"):
            value = getattr(self, f"{stage}_{what}").compute()
            # the value is already the all-rank one; sync_dist averages equal numbers (and keeps Lightning quiet)
            self.log(METRIC_TAGS[f"{stage}_{what}"], value, on_step=False, on_epoch=True, prog_bar=True,
                     sync_dist=self.trainer.world_size > 1)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        """The logits of a batch (``(x, y)``, ``[x]`` or ``x``), for ``trainer.predict``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)

    def on_train_epoch_start(self):
        # The training metrics are saved in checkpoints for a resume in mid-epoch; an epoch that
        # starts from its first batch starts them from zero.
        loop = self.trainer.fit_loop.epoch_loop
        if not (loop.restarting and loop.batch_progress.current.completed > 0):
            self.train_acc.reset()
            self.train_loss.reset()

    def on_train_epoch_end(self):
        self._log_epoch("train")

    def on_validation_epoch_start(self):
        self.val_acc.reset()  # also after the sanity check's batches
        self.val_loss.reset()

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_start(self):
        self.test_acc.reset()
        self.test_loss.reset()

    def on_test_epoch_end(self):
        self._log_epoch("test")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = make_optimizer(self.model, hp.optimizer, hp.lr, hp.momentum, hp.nesterov, hp.weight_decay)
        scheduler = make_scheduler(optimizer, hp.schedule, self._planned_epochs, hp.milestones, hp.gamma)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _planned_epochs(self) -> int:
        trainer = self._trainer
        return trainer.max_epochs if trainer is not None and trainer.max_epochs and trainer.max_epochs > 0 else 1

    def on_train_start(self):
        # After a resume the optimizer holds the learning rate the saved run computed for this epoch;
        # recompute it from the schedule of this run's length (the same value when --epochs is unchanged).
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                               scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)

    def configure_callbacks(self):
        # Lightning asks again at every fit/test; the same instances keep their state across them.
        if self._method_callbacks is None:
            self._method_callbacks = self.make_callbacks()
        return list(self._method_callbacks)

    def method_callbacks(self) -> list:
        """The callbacks the method itself needs (the same instances Lightning gets)."""
        return self.configure_callbacks()

    def make_callbacks(self) -> list:
        """The callbacks the method itself needs (max-norm here; subclasses add theirs)."""
        callbacks = []
        if self.hparams.max_norm:
            # The PlainNet paper constrains "every hidden unit": the classifier is free unless asked.
            callbacks.append(MaxNormConstraint(self.hparams.max_norm,
                                               skip_classifier=not self.hparams.get("max_norm_classifier", False)))
        return callbacks
