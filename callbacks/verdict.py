"""TrainabilityVerdict: within the first minutes, whether the run will train, and why.

At the verdict step (``verdict_step``: 2% of the planned steps, 50 to 300) it reads what the sampling
diagnostics measured up to then (each samples at step 0, v/4, v/2 and v) and the training loss, applies the
rules of ``verdict_rules`` and says ``trains``, ``fails`` or ``unsure`` with the reasons in words.
"""
from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from .outputs import log_scalars
from .publish import publishing_callbacks
from .records import DiagnosticsTable
from .sampling import SamplingCallback, planned_steps
from .saturation import ActivationSaturationMonitor
from .tags import OverviewScalar
from .tensorboard import tensorboard_writers
from .verdict_rules import CODE_STATISTIC, CODES, LOSS_STATISTIC, VERDICT_CALLBACK, Samples, Verdict, decide
from .verdict_step import check_step, early_steps, verdict_step

VERDICT_SCALAR = OverviewScalar("verdict", "early verdict (-1 fails, 0 unsure, 1 trains)", anchored=True)
TAG = VERDICT_SCALAR.tag


def step_loss(outputs: Any) -> Optional[torch.Tensor]:
    """The training step's loss from what ``training_step`` returned (a tensor or a dict with ``loss``)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach() if outputs.numel() == 1 else None
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"].detach()
    return None


class TrainabilityVerdict(Callback):
    """An early verdict on whether a run will train: ``trains``, ``fails`` or ``unsure``, with its reasons.

    It reads what ``ActivationSaturationMonitor`` (required) and, when present, ``GradientFlowMonitor`` and
    ``ConditionNumberProbe`` measured up to the verdict step, plus the training loss of each step (what
    ``training_step`` returns: a tensor or a dict with ``loss``; accumulated on the device, read at the four
    early samples). It adds no other work than those samples: with it, the sampling diagnostics also sample at
    v/4, v/2 and v (step 0 they sample anyway), whatever their time budget.

    The verdict is logged as ``overview/verdict`` (-1 fails, 0 unsure, 1 trains) to every logger, printed
    once, written to ``diagnostics.csv`` (callback ``verdict``: ``train_loss`` at the early steps, ``code`` at
    the verdict step), drawn as a marker on the depth x time images and ``overview.png``, and kept in
    :attr:`verdict` (``train.py`` writes it to ``summary.json`` and its report).

    Args:
        at_step: the verdict step; None (default): 2% of the planned steps, at least 50 and at most 300.
        stop_if_fails: end the fit at the verdict step when it is ``fails`` (``unsure`` and ``trains`` go on);
            :attr:`stopped` says it did.

    Example::

        import lightning as L
        from deepplain.callbacks import ActivationSaturationMonitor, GradientFlowMonitor, TrainabilityVerdict
        trainer = L.Trainer(max_epochs=20, callbacks=[ActivationSaturationMonitor(), GradientFlowMonitor(),
                                                      TrainabilityVerdict(stop_if_fails=True)])
    """

    overview_scalars = (VERDICT_SCALAR,)

    def __init__(self, at_step: Optional[int] = None, stop_if_fails: bool = False):
        self.at_step = check_step(at_step)
        self.stop_if_fails = bool(stop_if_fails)
        self.reset_for_fit()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.reset_for_fit()  # a resume restores its verdict after this (load_state_dict)
        readers = [cb for cb in trainer.callbacks if isinstance(cb, SamplingCallback)]
        if not any(isinstance(cb, ActivationSaturationMonitor) for cb in readers):
            raise ValueError("TrainabilityVerdict reads what ActivationSaturationMonitor measures; add it to the "
                             "trainer's callbacks (GradientFlowMonitor and ConditionNumberProbe add evidence)")
        for cb in readers:  # their samples at 0, v/4, v/2 and v
            cb.schedule.serves_verdict, cb.schedule.verdict_at = True, self.at_step
        self._readers = readers

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = verdict_step(planned_steps(trainer), self.at_step)
        self._pending = [s for s in early_steps(self.step) if s >= trainer.global_step]
        DiagnosticsTable.keep_early(trainer, self.step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any,
                           batch_idx: int) -> None:
        if self.verdict is not None or self.step is None:
            return
        loss = step_loss(outputs)
        if loss is not None:
            self._loss_sum = loss.float() if self._loss_sum is None else self._loss_sum + loss.float()
            self._loss_count += 1
        done = trainer.global_step  # the optimizer steps taken: the step of this batch is done - 1 or less
        while self._pending and self._pending[0] < done:
            self._write_loss(trainer, self._pending.pop(0))
        if done > self.step:
            self._decide(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.verdict is None and self.step is not None and trainer.global_step > 0:
            self.step = min(self.step, trainer.global_step - 1)  # a run shorter than planned: decide on what it has
            while self._pending and self._pending[0] <= self.step:
                self._write_loss(trainer, self._pending.pop(0))
            self._decide(trainer, stop=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.to_dict() if self.verdict is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("verdict")
        self.verdict = None if saved is None else Verdict(saved["word"], saved["step"], saved["reasons"],
                                                          saved.get("signals", {}))

    def reset_for_fit(self) -> None:
        self.step: Optional[int] = None
        self.verdict: Optional[Verdict] = None
        self.stopped = False
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_count = 0
        self._pending: list[int] = []  # the early steps whose loss is not written yet
        self._readers: list = []  # the sampling diagnostics it reads

    def tensorboard_layout(self) -> dict:
        return {}

    def _write_loss(self, trainer, step: int) -> None:
        if self._loss_sum is None or trainer.global_rank != 0:
            self._loss_sum, self._loss_count = None, 0
            return
        value = float(self._loss_sum) / max(1, self._loss_count)
        self._loss_sum, self._loss_count = None, 0
        self._write(trainer, step, LOSS_STATISTIC, value)

    def _write(self, trainer, step: int, statistic: str, value: float) -> None:
        table = DiagnosticsTable.shared(trainer)
        if table is not None:
            table.write(step, VERDICT_CALLBACK, statistic, {"": value})

    def _decide(self, trainer, stop: bool = True) -> None:
        for cb in self._readers:  # their sample of this step, also those listed after this callback
            cb.finish_sample(trainer)
        verdict = None
        if trainer.global_rank == 0:
            table = DiagnosticsTable.shared(trainer)
            rows = table.early_rows() if table is not None else []
            verdict = decide(Samples(rows), self.step)
        code = verdict.code if verdict is not None else CODES["unsure"]
        if trainer.world_size > 1:  # every rank stops at the same step, or a collective would hang
            code = float(trainer.strategy.broadcast(code, src=0))
        self.verdict = verdict or Verdict(next(w for w, c in CODES.items() if c == code), self.step)
        if trainer.global_rank == 0:
            self._announce(trainer)
        if stop and self.stop_if_fails and self.verdict.word == "fails":
            self.stopped = True
            trainer.should_stop = True

    def _announce(self, trainer) -> None:
        verdict = self.verdict
        self._write(trainer, verdict.step, CODE_STATISTIC, verdict.code)
        log_scalars(trainer, {TAG: verdict.code}, verdict.step)
        for writer in tensorboard_writers(trainer):
            writer.add_text(TAG, f"**{verdict.word}** at step {verdict.step}: " + "; ".join(verdict.reasons),
                            verdict.step)
        for cb in publishing_callbacks(trainer):  # a marker at its step on every depth x time image
            cb.publisher.events[verdict.step] = f"verdict: {verdict.word}"
        stopping = " - stopping the run (stop_if_fails)" if self.stop_if_fails and verdict.word == "fails" else ""
        message = f"{type(self).__name__} at step {verdict.step}: {verdict.line()}{stopping}"
        bar = trainer.progress_bar_callback
        if bar is not None and getattr(bar, "is_enabled", False):
            bar.print(message)  # above the progress bar (rich and tqdm keep it there)
        else:
            rank_zero_info(message)
