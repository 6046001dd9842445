"""Carrying out a checked :class:`~deepplain.plan.Plan`: build the module and the Trainer, train,
test and summarise (``summary.json``, the terminal report).

``deepplain.cli`` parses the flags and maps the outcome to an exit code; ``deepplain.plan``
checks everything before this module reads or writes anything.
"""
from __future__ import annotations

import shutil
import signal
import sys
from dataclasses import dataclass, field
from typing import Optional
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch.distributed as dist
from torch import nn
from lightning.pytorch.callbacks import LearningRateMonitor, RichModelSummary
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerStatus

from . import hparams_table
from .callbacks import DIAGNOSTICS, AlphaScheduler, SamplingCallback, TrainabilityVerdict
from .checkpoints import AtomicCheckpointIO, RunCheckpoint, remove_stale_temporaries
from .config import check_diagnostics, model_options
from .datamodules.splits import ValidationSource
from .errors import ConfigError, DatasetError, DeepplainError, DivergenceError, RunFailure, one_line
from .files import atomic_write_json
from .inputs import FolderLock
from .layers import count_parameters
from .loggers import build_loggers, close_trackers, log_run_identity
from .plan import Plan
from .registry import get_family
from .report import print_run_end, print_trainability_report, trainability_findings
from .rundir import RunFolder, run_dir_for
from .runtime import DivergenceGuard, RNGState, RunFolderSync, RunProgressBar, RunStats, RunStopped, StopSignals
from .schema import MODULE, RunConfig, options_for
from .status import METRIC_TAGS, RunStatus, RunSummary

# The share of training time each diagnostic may spend on optional samples (beyond the ten saturation and
# gradient flow take anyway, and the condition probe's first and last): 1% together, most where a sample is cheap.
DIAGNOSTICS_BUDGET = {"saturation": 0.004, "condition": 0.004, "grad_flow": 0.002}
OTHER_DIAGNOSTIC_BUDGET = 0.002  # a sampling diagnostic of DIAGNOSTICS that has no share above


def make_module(config: RunConfig, input_shape, num_classes: int):
    """The family's LightningModule with every option that goes to it (``schema.MODULE``)."""
    cls = get_family(config.model).module_class()
    module = cls(**options_for(config, MODULE), input_shape=tuple(input_shape), num_classes=num_classes,
                 model_options=model_options(config))
    for cb in module.method_callbacks():  # max-norm and VAN's scheduler log per layer only when asked, too
        if getattr(cb, "publisher", None) is not None:
            cb.publisher.per_layer_scalars = config.per_layer_scalars
    return module


def make_diagnostics(config: RunConfig) -> list:
    """The diagnostics ``--diagnostics`` names, the sampling ones each with its share of :data:`DIAGNOSTICS_BUDGET`,
    the verdict (which reads them) last."""
    names = check_diagnostics(config.diagnostics)
    made = [DIAGNOSTICS[name](every_n_steps=config.diag_every, per_layer_scalars=config.per_layer_scalars,
                              max_overhead=DIAGNOSTICS_BUDGET.get(name, OTHER_DIAGNOSTIC_BUDGET))
            for name in names if issubclass(DIAGNOSTICS[name], SamplingCallback)]
    if "verdict" in names:
        made.append(TrainabilityVerdict(at_step=config.verdict_step, stop_if_fails=config.stop_if_fails))
    return made


def verdict_of(diagnostics: list) -> Optional[TrainabilityVerdict]:
    return next((cb for cb in diagnostics if isinstance(cb, TrainabilityVerdict)), None)


def make_strategy(config: RunConfig, strategy_class: str):
    """The strategy object, with ``--dist-timeout`` for DDP: a rank that never arrives ends the run
    with Lightning's timeout error instead of a hang."""
    name = config.strategy
    if name == "auto" and strategy_class == "DDPStrategy":
        name = "ddp"
    entry = StrategyRegistry[name] if isinstance(name, str) and name.startswith("ddp") and name in StrategyRegistry \
        else None
    if not entry:
        return config.strategy
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=config.dist_timeout))


@dataclass
class Run:
    """What one training run is made of, once built."""
    config: RunConfig
    created: bool  # this process created the run folder
    module: L.LightningModule
    datamodule: object
    trainer: L.Trainer
    logger: TensorBoardLogger
    stats: RunStats
    stop: StopSignals
    diagnostics: list = field(default_factory=list)
    lock: Optional[FolderLock] = None  # held from the folder's creation to the run's end (this process made it)
    summary: Optional[RunSummary] = None  # once train() wrote it

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.config.run_dir)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
            self.lock = None


def run(plan: Plan) -> RunSummary:
    """Train, test and summarise one run; returns the summary written to ``summary.json``. Every run that
    trained ends with its report, whatever ended it (completed, diverged, interrupted, preempted, failed):
    the runs that went wrong are the ones a user most needs explained."""
    built = build(plan)
    try:
        summary = train(built)
    finally:
        try:
            # the trackers end first: W&B prints its own run summary, and the run's report must be the last screen
            close_trackers(built.trainer.loggers)
            if built.summary is not None and built.trainer.is_global_zero:
                _log_hparams(built.logger, built.config, built.summary)
                if built.summary.status is RunStatus.COMPLETED or built.summary.global_step:
                    print_trainability_report(built.diagnostics + built.module.method_callbacks())
                    for line in _method_reports(built.module, built.trainer):
                        print(line)
                    print_run_end(built.summary)
        finally:
            built.release()
            leave_process_group()
    return summary


def leave_process_group() -> None:
    """Stop the process group (DDP) while the interpreter is fully alive: a process that exits with gloo's worker
    threads still up can abort in interpreter finalisation, SIGABRT after a finished run ("terminate called
    without an active exception": seen in this project's DDP test, and described in pytorch/pytorch#179291)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build(plan: Plan) -> Run:
    """Read the data, build the module, reserve the run folder, write config.json and build the Trainer."""
    config, datamodule = plan.config, plan.datamodule
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule.setup("fit")  # decode once, here: shapes and class counts are needed to build the model
    module = make_module(config, datamodule.input_shape, datamodule.num_classes)
    if config.batch_size == 1 and any(isinstance(m, nn.BatchNorm1d) for m in module.modules()):
        raise ConfigError(f"--batch-size 1 cannot train the batch norm of this {config.model} MLP: a batch of one "
                          "sample has one value per unit and no batch statistics; use --batch-size 2 or more"
                          + (" or --norm none" if config.applies("norm") else ""))
    root = datamodule.root if plan.dataset.reads_files else None
    config = config.replace(data_root=str(Path(root).resolve()) if root is not None else None)
    if config.run_dir:
        run_dir, created = Path(config.run_dir), False
    else:
        run_dir, created = run_dir_for(config.logdir, config.default_name)
    # the process that made the folder holds its lock while it trains: a --resume of it meanwhile (or a
    # sweep's rerun while an orphan still trains it) is refused, naming this pid (a resume holds the lock
    # itself, taken by the CLI before this)
    lock = FolderLock(run_dir, "the run folder").__enter__() if created else None
    try:
        return _build_in(plan, config.replace(run_dir=str(run_dir)), datamodule, module, created, lock)
    except BaseException:
        if lock is not None:
            lock.__exit__(None, None, None)
        raise


def _build_in(plan: Plan, config: RunConfig, datamodule, module, created: bool, lock) -> Run:
    """The rest of :func:`build`, once the run folder is there (and locked, when this process made it)."""
    folder = RunFolder(config.run_dir)
    if created or config.resume:
        remove_stale_temporaries(folder.checkpoints)  # what a save killed half-way left behind
    if created and not config.resume:
        atomic_write_json(folder.config, config.to_dict())
    loggers = build_loggers(config.logger, folder.path, Path(config.logdir))
    stats, stop = RunStats(), StopSignals(folder.last_checkpoint)
    diagnostics = make_diagnostics(config)
    trainer = make_trainer(config, plan.strategy_class, loggers, stats, stop, diagnostics, datamodule)
    if trainer.is_global_zero:
        log_run_identity(loggers[1:], hparams_table.run_identity(config))  # TensorBoard's: with the final metrics
        if datamodule.validation_source == ValidationSource.TEST:
            loggers[0].experiment.add_text("warnings", "val_split=0: validation metrics are measured on the TEST set")
    return Run(config, created, module, datamodule, trainer, loggers[0], stats, stop, diagnostics, lock)


def make_trainer(config: RunConfig, strategy_class: str, loggers: list, stats: RunStats, stop: StopSignals,
                 diagnostics: list, datamodule) -> L.Trainer:
    ckpt_dir = RunFolder(config.run_dir).checkpoints
    # Two checkpointers: save_last alone would only refresh last.ckpt when val/acc improves.
    callbacks = [RunCheckpoint(dirpath=ckpt_dir, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
                               monitor=METRIC_TAGS["val_acc"], mode="max", save_top_k=1),
                 RunCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False),
                 LearningRateMonitor(logging_interval="epoch"), RichModelSummary(max_depth=2), stats, stop,
                 RNGState(), DivergenceGuard(), RunFolderSync(Path(config.run_dir), [stop]), *diagnostics]
    if config.progress:
        callbacks.append(RunProgressBar())
    return L.Trainer(
        max_epochs=config.epochs, accelerator=config.accelerator, devices=config.devices,
        strategy=make_strategy(config, strategy_class), num_nodes=config.num_nodes, precision=config.precision,
        logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()], default_root_dir=config.run_dir,
        fast_dev_run=config.fast_dev_run, limit_train_batches=config.limit_train_batches,
        limit_val_batches=config.limit_val_batches, accumulate_grad_batches=config.accumulate_grad_batches,
        deterministic=config.deterministic, enable_progress_bar=config.progress,
        log_every_n_steps=min(50, max(1, _batches_per_epoch(datamodule, config.batch_size))))


def train(run: Run) -> RunSummary:
    """Fit and test; whatever happens, the summary is written (a bad dataset met before the first
    checkpoint removes the new run folder instead: that is bad input, not a run)."""
    trainer, status, error, metrics, data_fault = run.trainer, RunStatus.COMPLETED, None, {}, False
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after the first one; restored below
    try:
        trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.config.resume)
        metrics.update(_floats(trainer.callback_metrics))  # trainer.test() resets callback_metrics
        verdict = verdict_of(run.diagnostics)
        if trainer.state.status == TrainerStatus.INTERRUPTED:
            status = RunStatus.INTERRUPTED
        else:
            if verdict is not None and verdict.stopped:  # --stop-if-fails: kept resumable at the step it stopped
                status = RunStatus.STOPPED_EARLY
                trainer.save_checkpoint(run.folder.last_checkpoint)
            trainer.test(run.module, datamodule=run.datamodule, verbose=False)
            metrics.update(_floats(trainer.callback_metrics))
    except RunStopped as exc:
        status = exc.reason
    except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C; Lightning's own handling ends in sys.exit(1)
        status = RunStatus.INTERRUPTED
    except Exception as exc:  # recorded in summary.json, then reported by the CLI or as a traceback (a bug)
        status = RunStatus.DIVERGED if isinstance(exc, DivergenceError) else RunStatus.FAILED
        error = str(exc) if isinstance(exc, (DeepplainError, OSError)) else f"{type(exc).__name__}: {exc}"
        data_fault = isinstance(exc, DatasetError) and run.created and not any(run.folder.checkpoints.glob("*.ckpt"))
        if _is_distributed_failure(exc):
            error = (f"the DDP processes could not reach each other within --dist-timeout "
                     f"{run.config.dist_timeout} s ({one_line(exc)})")
            raise RunFailure(error) from None
        raise
    finally:
        signal.signal(signal.SIGINT, sigint)
        if not metrics:
            metrics.update(_floats(trainer.callback_metrics))
        summary = run.summary = summarise(run, status, error, metrics)
        if trainer.is_global_zero and data_fault:
            shutil.rmtree(run.config.run_dir, ignore_errors=True)
        elif trainer.is_global_zero:
            _write_summary(Path(run.config.run_dir), summary)
    return summary


def summarise(run: Run, status: RunStatus, error, metrics: dict) -> RunSummary:
    config, trainer, datamodule = run.config, run.trainer, run.datamodule
    ckpt = next((cb for cb in trainer.checkpoint_callbacks), None)
    last = run.folder.last_checkpoint
    return RunSummary(
        status=status, error=error, model=config.model, arch=config.arch, depth=config.depth, seed=config.seed,
        dataset=config.dataset, parameters=count_parameters(run.module.model), epochs_done=trainer.current_epoch,
        global_step=trainer.global_step, **{name: metrics.get(tag) for name, tag in METRIC_TAGS.items()},
        wall_seconds=run.stats.wall_seconds,
        samples_per_second=run.stats.samples_per_second,
        validation_source=getattr(datamodule, "validation_source", None),
        split_sizes=getattr(datamodule, "split_sizes", None), data_root=config.data_root,
        precision=str(trainer.precision), best_checkpoint=(ckpt.best_model_path or None) if ckpt else None,
        interrupt_checkpoint=str(run.stop.saved) if run.stop.saved else None,
        resume_from=str(last) if last.is_file() and status is not RunStatus.COMPLETED else None,
        run_dir=config.run_dir, config=config.to_dict(), **_alpha_summary(run.module),
        diagnostics=trainability_findings(getattr(trainer, "callbacks", [])), **_verdict_summary(run.diagnostics))


def _log_hparams(logger, config: RunConfig, summary: RunSummary) -> None:
    """The run's row of TensorBoard's HParams table, so the dashboard lists the runs of a sweep in one table."""
    try:
        if hparams_table.write(logger, config, summary):
            logger.finalize("success")  # written and closed now: nothing touches the run folder after the run
    except Exception as exc:  # an odd value must not cost the run its summary
        print(f"warning: hyperparameters not logged to TensorBoard ({one_line(exc)})")


def _is_distributed_failure(exc: BaseException) -> bool:
    """A rendezvous or collective that timed out or lost its peer (torch's DistError family, or the
    RuntimeError gloo and NCCL raise)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("gloo" in text or "nccl" in text) and (
        "timed out" in text or "timeout" in text or "connection" in text)


def _write_summary(run_dir: Path, summary: RunSummary) -> None:
    path = RunFolder(run_dir).summary
    try:
        atomic_write_json(path, summary.to_dict())
    except OSError as exc:  # a full disk: the run's outcome still reaches the terminal
        print(f"warning: could not write {path} ({exc.strerror or exc}); "
              f"status {summary.status}", file=sys.stderr)


def _batches_per_epoch(datamodule, batch_size: int) -> int:
    sizes = getattr(datamodule, "split_sizes", None) or {"train": 1}
    n = sizes["train"]
    return -(-n // batch_size) - (1 if n > 1 and n % batch_size == 1 else 0)  # a last batch of one sample is left out


def _floats(metrics) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def _method_reports(module, trainer) -> list[str]:
    """One line per method callback that has something to say (VAN: where the skips went)."""
    return [cb.report(trainer.global_step) for cb in module.method_callbacks() if callable(getattr(cb, "report", None))]


def _verdict_summary(diagnostics: list) -> dict:
    cb = verdict_of(diagnostics)
    if cb is None or cb.verdict is None:
        return {}
    return {"verdict": cb.verdict.word, "verdict_step": cb.verdict.step, "verdict_reasons": cb.verdict.reasons}


def _alpha_summary(module) -> dict:
    scheduler = next((cb for cb in module.method_callbacks() if isinstance(cb, AlphaScheduler) and cb.gates), None)
    if scheduler is None:
        return {}
    s = scheduler.summary()
    closed = scheduler.closed_at_target or {}
    return {"alpha_residual": s["residual"], "alpha_share_removed": s["share_removed"],
            "alpha_removed_step": s["removed_step"], "alpha_target_step": scheduler.target_step,
            "alpha_closed_at_target": closed.get("units"), "alpha_residual_at_target": closed.get("residual")}
