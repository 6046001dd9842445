"""MaxNormConstraint: cap the norm of every unit's incoming weight vector after each optimizer step."""
from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from . import outputs
from .arguments import check_int, check_number
from .probing import glob_list, weight_layers
from .publish import DepthTimeSpec, Publisher, finish_run_files
from .records import DiagnosticsTable
from .sampling import every_percent
from .tags import OverviewScalar, overview_values
from .tensorboard import write_layout


@torch.no_grad()
def apply_max_norm(weight: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Rescale, in place, each row of a Linear weight / each output filter of a Conv weight whose L2
    norm exceeds ``max_norm`` to norm ``max_norm``. Rows within the bound are multiplied by exactly 1.
    Returns the boolean mask of rescaled units."""
    norms = weight.detach().reshape(weight.shape[0], -1).float().norm(dim=1)
    over = norms > max_norm
    scale = torch.where(over, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
    weight.mul_(scale.to(weight.dtype).view((-1,) + (1,) * (weight.dim() - 1)))
    return over


class MaxNormConstraint(Callback):
    """Max-norm regularisation (Srivastava et al.; the PlainNet paper uses ``max_norm=3`` on every
    hidden unit).

    After every real optimizer step -- not after every batch when gradients accumulate -- each
    unit's incoming weight vector (a row of a Linear weight, an output filter of a Conv weight)
    with norm above ``max_norm`` is scaled back to ``max_norm``. ``include``/``exclude`` globs pick
    layers; ``skip_classifier=True`` leaves the last Linear layer (the output layer) free, as the
    paper does. Layers with a reparameterised weight (``effective_weight()``, e.g. DiracNet's,
    which normalises its filters itself) are skipped.

    Every ``log_every_n_steps`` optimizer steps (default: every 1% of the run, or the trainer's
    ``log_every_n_steps`` when its length is unknown) it logs the share of all units it rescaled
    at that step (``max_norm/rescaled``, ``overview/max_norm_rescaled``), each layer's share into
    ``diagnostics.csv`` and the depth x time image ``max_norm/depth_time/rescaled`` (redrawn at
    epoch ends), and with ``per_layer_scalars=True`` also as ``max_norm/rescaled/<layer>``.

    Example::

        import lightning as L
        from deepplain.callbacks import MaxNormConstraint
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                            callbacks=[MaxNormConstraint(max_norm=3.0, skip_classifier=True)])
    """

    prefix = "max_norm"
    overview_scalars = (OverviewScalar("max_norm_rescaled", "max-norm: share of units rescaled"),)
    overview_images = {"train": ("rescaled",)}

    def __init__(self, max_norm: float = 3.0, include: Optional[list[str]] = None, exclude: Optional[list[str]] = None,
                 skip_classifier: bool = False, log_every_n_steps: Optional[int] = None,
                 per_layer_scalars: bool = False):
        self.max_norm = check_number("max_norm", max_norm, 0, low_open=True, what="a positive finite number")
        self.include, self.exclude = glob_list("include", include), glob_list("exclude", exclude)
        self.skip_classifier = bool(skip_classifier)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self._layers = []
        self._last_step: Optional[int] = None
        self._every = 1
        self.publisher = Publisher(self.prefix, {"rescaled": DepthTimeSpec("share of units rescaled",
                                                                          vmin=0.0, vmax=1.0, cmap="magma",
                                                                          label="share")},
                                   {}, per_layer_scalars=per_layer_scalars)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(max_norm=self.max_norm, include=self.include, exclude=self.exclude,
                                        skip_classifier=self.skip_classifier)

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self._layers]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._layers = [(n, m) for n, m in weight_layers(pl_module, self.include, self.exclude, self.skip_classifier)
                        if not callable(getattr(m, "effective_weight", None))]
        if not self._layers:
            raise ValueError(f"MaxNormConstraint found no Linear or Conv layer to constrain in "
                             f"{type(pl_module).__name__} (include={self.include}, exclude={self.exclude}, "
                             f"skip_classifier={self.skip_classifier})")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_layout(trainer, self)
        outputs.announce(trainer)  # where the run's files go, said once
        self._last_step = trainer.global_step
        self._every = self.log_every_n_steps or every_percent(trainer, trainer.log_every_n_steps)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # accumulating: no optimizer step happened
            return
        self._last_step = trainer.global_step
        # a frozen layer (requires_grad=False) is not trained, so it is not constrained either
        rescaled = {name: apply_max_norm(module.weight, self.max_norm) for name, module in self._layers
                    if module.weight.requires_grad}
        if trainer.global_step % self._every == 0 and rescaled and trainer.global_rank == 0:
            counts = torch.stack([torch.stack([mask.float().sum(), torch.tensor(float(mask.numel()),
                                                                                 device=mask.device)])
                                  for mask in rescaled.values()]).cpu()
            total = float(counts[:, 0].sum() / counts[:, 1].sum())
            self.publisher.publish(trainer, trainer.global_step, "train",
                                   {n: {"rescaled": float(c / u)} for n, (c, u) in zip(rescaled, counts.tolist())},
                                   extra_scalars={f"{self.prefix}/rescaled": total, **overview_values(
                                       self.overview_scalars, {"max_norm_rescaled": total})})

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.publisher.draw(trainer, trainer.global_step)  # the image grows epoch by epoch

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw_at_end(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.draw_at_end(trainer)  # a run that diverged or was stopped gets its pictures too

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        DiagnosticsTable.close_for(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def tensorboard_layout(self) -> dict:
        charts = {"share of units rescaled": f"{self.prefix}/rescaled$"}
        if self.publisher.per_layer_scalars:
            charts["share rescaled per layer"] = f"{self.prefix}/rescaled/.*"
        return {self.prefix: charts}

    def draw_at_end(self, trainer) -> None:
        """The image at the run's last step, overview.png and the uploads, however the run ended."""
        self.publisher.draw(trainer, trainer.global_step)
        finish_run_files(trainer, self)
