"""How a run ended (:class:`RunStatus`) and what it wrote in ``summary.json`` (:class:`RunSummary`).

Shared by training (which writes them), the CLI (exit status), the sweep (what to skip, resume or
train again; its CSV columns) and the plots (which runs count).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional


class RunStatus(str, Enum):
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"  # Ctrl-C: checkpoints/last.ckpt holds the step it stopped at
    PREEMPTED = "preempted"      # SIGTERM (e.g. SLURM): the same
    DIVERGED = "diverged"        # a non-finite loss or weights; the last good checkpoint is kept
    FAILED = "failed"            # an error: the machine, the data or a bug
    STOPPED_EARLY = "stopped-early"  # --stop-if-fails: the early verdict said fails; last.ckpt holds that step

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__  # so that the plain strings read back from summary.json and CSVs find it in sets

    @property
    def finished(self) -> bool:
        """Its result stands: a sweep does not train it again (a diverged run diverges again, a run stopped by its
        verdict was stopped on purpose)."""
        return self in (RunStatus.COMPLETED, RunStatus.DIVERGED, RunStatus.STOPPED_EARLY)

    @property
    def resumable(self) -> bool:
        """Stopped from outside, with a checkpoint of the step it stopped at."""
        return self in (RunStatus.INTERRUPTED, RunStatus.PREEMPTED)


# The metrics a run logs (TensorBoard tags, trainer.callback_metrics keys), by the RunSummary field they fill.
METRIC_TAGS = {"train_loss": "train/loss_epoch", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc",
               "test_loss": "test/loss", "test_acc": "test/acc"}
STEP_LOSS_TAG = "train/loss_step"  # the training loss of each step (the progress bar's)

FINISHED = frozenset(s for s in RunStatus if s.finished)
RESUMABLE = frozenset(s for s in RunStatus if s.resumable)


class RowStatus(str, Enum):
    """What a sweep's results.csv says of a run that has no summary of its own (yet)."""
    NOT_STARTED = "not started"  # no summary and no checkpoint yet
    UNFINISHED = "unfinished"    # a last.ckpt ahead of any summary: training now, or killed before it wrote one

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__


def failed_because(reason: str) -> str:
    """A sweep row's status for a run that failed before or without its own summary: ``failed (<reason>)``."""
    return f"{RunStatus.FAILED} ({reason})"


def column(default=None, csv: bool = True, factory=None) -> Any:
    """A summary field; ``csv``: it is a column of a sweep's results.csv."""
    if factory is not None:
        return field(default_factory=factory, metadata={"csv": csv})
    return field(default=default, metadata={"csv": csv})


@dataclass
class RunSummary:
    """``summary.json``: the outcome, the final metrics and where everything is."""
    status: RunStatus = column(RunStatus.FAILED)
    error: Optional[str] = column(csv=False)
    model: Optional[str] = column()
    arch: Optional[str] = column(csv=False)
    depth: Optional[int] = column()
    seed: Optional[int] = column()
    dataset: Optional[str] = column()
    parameters: Optional[int] = column()
    epochs_done: Optional[int] = column()
    global_step: Optional[int] = column()
    train_loss: Optional[float] = column()
    train_acc: Optional[float] = column()
    val_loss: Optional[float] = column()
    val_acc: Optional[float] = column()
    test_loss: Optional[float] = column()
    test_acc: Optional[float] = column()
    wall_seconds: Optional[float] = column()
    samples_per_second: Optional[float] = column()
    validation_source: Optional[str] = column(csv=False)
    split_sizes: Optional[dict] = column(csv=False)
    data_root: Optional[str] = column(csv=False)
    precision: Optional[str] = column(csv=False)
    best_checkpoint: Optional[str] = column(csv=False)
    interrupt_checkpoint: Optional[str] = column(csv=False)
    resume_from: Optional[str] = column(csv=False)
    run_dir: Optional[str] = column()
    # VAN's AlphaScheduler (None for other families): the residual, the step every skip was gone and the
    # share of units removed; the target step, and the units the projection there closed and their residual
    # the early verdict (TrainabilityVerdict): trains | fails | unsure, its step and its reasons
    verdict: Optional[str] = column()
    verdict_step: Optional[int] = column()
    verdict_reasons: Optional[list] = column(csv=False)
    alpha_residual: Optional[float] = column()
    alpha_removed_step: Optional[int] = column()
    alpha_share_removed: Optional[float] = column(csv=False)
    alpha_target_step: Optional[int] = column()
    alpha_closed_at_target: Optional[int] = column()
    alpha_residual_at_target: Optional[float] = column()
    config: dict = column(csv=False, factory=dict)
    diagnostics: dict = column(csv=False, factory=dict)

    def __post_init__(self):
        self.status = RunStatus(self.status)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def csv_columns(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.metadata["csv"]]
