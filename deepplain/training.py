"""Building and running one training run from a checked configuration (the CLI's second half).

``run(config, datamodule)`` reads the data, reserves the run folder, trains, tests and writes
``summary.json``; ``deepplain.cli`` parses and checks the flags and maps the outcome to an exit code.
"""
from __future__ import annotations

import shutil
import signal
from datetime import timedelta
from pathlib import Path

from .config import VAN_ONLY, check_diagnostics, default_name, model_options
from .errors import DatasetError, DeepplainError, DivergenceError, RunFailure, one_line
from .report import trainability_findings

FINAL_STATUSES = ("completed", "interrupted", "preempted", "diverged", "failed")


def make_datamodule(config: dict):
    from .datamodules import get_datamodule
    kwargs = dict(data_dir=config.get("data_dir"), batch_size=config["batch_size"], val_split=config["val_split"],
                  seed=config["seed"], download=config["download"], num_workers=config["num_workers"])
    if config["dataset"] != "imagefolder":
        kwargs["verify_checksums"] = config["verify_checksums"]
    if config.get("image_size") is not None:
        kwargs["image_size"] = config["image_size"]
    return get_datamodule(config["dataset"], **kwargs)


def make_module(config: dict, input_shape, num_classes: int):
    from .family_modules import VANModule, module_class
    cls = module_class(config["model"])
    kwargs = dict(model=config["model"], depth=config["depth"], arch=config["arch"], input_shape=tuple(input_shape),
                  num_classes=num_classes, model_options=model_options(config), optimizer=config["optimizer"],
                  lr=config["lr"], momentum=config["momentum"], nesterov=config["nesterov"],
                  weight_decay=config["weight_decay"], schedule=config["schedule"], milestones=config["milestones"],
                  gamma=config["gamma"], max_norm=config["max_norm"],
                  max_norm_classifier=config.get("max_norm_classifier", False),
                  channels_last=config["channels_last"], compile=config["compile"])
    if cls is VANModule:
        kwargs.update(alpha_mode=config["alpha_mode"], lambda_lr_ratio=config["lambda_lr_ratio"],
                      phase_out=config["phase_out"])
    return cls(**kwargs)


# The share of training time each diagnostic may spend on samples beyond the ten each run gets anyway
# (sampling.SamplingSchedule.min_samples): 1% together, most of it where a sample is cheap.
DIAGNOSTICS_BUDGET = {"saturation": 0.004, "condition": 0.004, "grad_flow": 0.002}


def make_diagnostics(config: dict) -> list:
    """The diagnostics ``--diagnostics`` names, each with its share of :data:`DIAGNOSTICS_BUDGET`."""
    from .callbacks import DIAGNOSTICS
    names = check_diagnostics(config["diagnostics"])
    return [DIAGNOSTICS[name](every_n_steps=config.get("diag_every"), max_overhead=DIAGNOSTICS_BUDGET[name],
                              per_layer_scalars=config.get("per_layer_scalars", False)) for name in names]


def make_strategy(config: dict, strategy_class: str):
    """The strategy object, with ``--dist-timeout`` for DDP: a rank that never arrives ends the run
    with Lightning's timeout error instead of a hang."""
    name = config["strategy"]
    from lightning.pytorch.strategies import StrategyRegistry
    if name == "auto" and strategy_class == "DDPStrategy":
        name = "ddp"
    entry = StrategyRegistry[name] if isinstance(name, str) and name.startswith("ddp") and name in StrategyRegistry \
        else None
    if not entry:
        return config["strategy"]
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=config["dist_timeout"]))


def run(config: dict, datamodule=None, strategy_class: str = "") -> dict:
    """Train, test and summarise one run; returns the summary written to ``summary.json``."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, RichModelSummary
    from lightning.pytorch.loggers import TensorBoardLogger

    from .checkpoints import AtomicCheckpointIO, RunCheckpoint, remove_stale_temporaries
    from .layers import count_parameters
    from .rundir import atomic_write_json, run_dir_for
    from .runtime import DivergenceGuard, RNGState, RunFolderSync, RunProgressBar, RunStats, RunStopped, StopSignals

    L.seed_everything(config["seed"], workers=True, verbose=False)
    datamodule = datamodule or make_datamodule(config)
    datamodule.setup("fit")  # decode once, here: shapes and class counts are needed to build the model
    module = make_module(config, datamodule.input_shape, datamodule.num_classes)
    for cb in module.method_callbacks():  # max-norm and VAN's scheduler log per layer only when asked, too
        if getattr(cb, "publisher", None) is not None:
            cb.publisher.per_layer_scalars = bool(config.get("per_layer_scalars", False))
    root = getattr(datamodule, "root", None)
    config["data_root"] = str(Path(root).resolve()) if root is not None and str(root) != "." else None

    if config.get("run_dir"):
        run_dir, created = Path(config["run_dir"]), False
    else:
        run_dir, created = run_dir_for(config["logdir"], default_name(config))
    config["run_dir"] = str(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if created or config.get("resume"):
        remove_stale_temporaries(ckpt_dir)  # what a save killed half-way left behind
    if created and not config.get("resume"):
        atomic_write_json(run_dir / "config.json", dict(config))
    logger = TensorBoardLogger(save_dir=str(run_dir.parent.parent), name=run_dir.parent.name, version=run_dir.name,
                               default_hp_metric=False)
    stats, stop = RunStats(), StopSignals(ckpt_dir / "last.ckpt")
    diagnostics = make_diagnostics(config)
    # Two checkpointers: save_last alone would only refresh last.ckpt when val/acc improves.
    callbacks = [RunCheckpoint(dirpath=ckpt_dir, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
                               monitor="val/acc", mode="max", save_top_k=1),
                 RunCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False),
                 LearningRateMonitor(logging_interval="epoch"), RichModelSummary(max_depth=2), stats, stop,
                 RNGState(), DivergenceGuard(), RunFolderSync(run_dir, [stop]), *diagnostics]
    if config.get("progress", True):
        callbacks.append(RunProgressBar())
    trainer = L.Trainer(
        max_epochs=config["epochs"], accelerator=config["accelerator"], devices=config["devices"],
        strategy=make_strategy(config, strategy_class), num_nodes=config["num_nodes"], precision=config["precision"],
        logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir),
        fast_dev_run=config["fast_dev_run"], limit_train_batches=config["limit_train_batches"],
        limit_val_batches=config["limit_val_batches"], accumulate_grad_batches=config["accumulate_grad_batches"],
        deterministic=config["deterministic"], enable_progress_bar=config.get("progress", True),
        log_every_n_steps=min(50, max(1, _batches_per_epoch(datamodule, config))))
    if trainer.is_global_zero and datamodule.validation_source == "test set":
        logger.experiment.add_text("warnings", "val_split=0: validation metrics are measured on the TEST set")

    status, error, metrics, data_fault = "completed", None, {}, False
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after the first one; restored below
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=config.get("resume"))
        metrics.update(_floats(trainer.callback_metrics))  # trainer.test() resets callback_metrics
        if trainer.state.status.value == "interrupted":
            status = "interrupted"
        else:
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(_floats(trainer.callback_metrics))
    except RunStopped as exc:
        status = exc.reason
    except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C; Lightning's own handling ends in sys.exit(1)
        status = "interrupted"
    except Exception as exc:  # recorded in summary.json, then reported by the CLI or as a traceback (a bug)
        status = "diverged" if isinstance(exc, DivergenceError) else "failed"
        error = str(exc) if isinstance(exc, (DeepplainError, OSError)) else f"{type(exc).__name__}: {exc}"
        # bad data met before the run saved anything: bad input, so a new run folder is not left behind
        data_fault = isinstance(exc, DatasetError) and created and not any(ckpt_dir.glob("*.ckpt"))
        if _is_distributed_failure(exc):
            error = (f"the DDP processes could not reach each other within --dist-timeout "
                     f"{config['dist_timeout']} s ({one_line(exc)})")
            raise RunFailure(error) from None
        raise
    finally:
        signal.signal(signal.SIGINT, sigint)
        if not metrics:
            metrics.update(_floats(trainer.callback_metrics))
        summary = _summary(config, trainer, metrics, datamodule, stats, stop, status, error,
                           count_parameters(module.model), module)
        if trainer.is_global_zero and data_fault:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif trainer.is_global_zero:
            _write_summary(run_dir, summary)
    if trainer.is_global_zero:
        _log_hparams(logger, config, summary)
    if trainer.is_global_zero and status == "completed":
        from .report import print_run_end, print_trainability_report
        print_trainability_report(diagnostics + module.method_callbacks())
        for line in _method_reports(module, trainer):
            print(line)
        print_run_end(summary)
    return summary


HPARAM_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
# What tells the runs of a sweep apart, in the HParams table's column order (the rest is in config.json).
HPARAM_KEYS = ("model", "arch", "depth", "width", "dataset", "activation", "norm", "init", "max_norm", "alpha_mode",
               "optimizer", "lr", "momentum", "weight_decay", "schedule", "batch_size", "epochs", "seed",
               "precision")


def _log_hparams(logger, config: dict, summary: dict) -> None:
    """The run's identifying options (:data:`HPARAM_KEYS`) with its final metrics (``hparam/<metric>``),
    so TensorBoard's HParams dashboard lists the runs of a sweep in one table."""
    params = {k: (config[k] if isinstance(config[k], (int, float, str, bool)) else str(config[k]))
              for k in HPARAM_KEYS if config.get(k) is not None and (k not in VAN_ONLY or config["model"] == "van")}
    metrics = {f"hparam/{k}": float(summary[k]) for k in HPARAM_METRICS if summary.get(k) is not None}
    if metrics:
        try:
            logger.log_hyperparams(params, metrics=metrics)
            logger.finalize("success")  # written and closed now: nothing touches the run folder after the run
        except Exception as exc:  # an odd value must not cost the run its summary
            print(f"warning: hyperparameters not logged to TensorBoard ({one_line(exc)})")


def _is_distributed_failure(exc: BaseException) -> bool:
    """A rendezvous or collective that timed out or lost its peer (torch's DistError family, or the
    RuntimeError gloo and NCCL raise)."""
    import torch.distributed as dist
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("gloo" in text or "nccl" in text) and (
        "timed out" in text or "timeout" in text or "connection" in text)


def _write_summary(run_dir: Path, summary: dict) -> None:
    from .rundir import atomic_write_json
    try:
        atomic_write_json(run_dir / "summary.json", summary)
    except OSError as exc:  # a full disk: the run's outcome still reaches the terminal
        import sys
        print(f"warning: could not write {run_dir / 'summary.json'} ({exc.strerror or exc}); "
              f"status {summary['status']}", file=sys.stderr)


def _batches_per_epoch(datamodule, config) -> int:
    sizes = getattr(datamodule, "split_sizes", None) or {"train": 1}
    n, size = sizes["train"], config["batch_size"]
    return -(-n // size) - (1 if n > 1 and n % size == 1 else 0)  # a last batch of one sample is left out


def _floats(metrics) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def _method_reports(module, trainer) -> list[str]:
    """One line per method callback that has something to say (VAN: where the skips went)."""
    return [cb.report(trainer.global_step) for cb in (module._method_callbacks or []) if callable(getattr(cb, "report",
                                                                                                         None))]


def _alpha_summary(module) -> dict:
    from .callbacks import AlphaScheduler
    scheduler = next((cb for cb in (module._method_callbacks or []) if isinstance(cb, AlphaScheduler) and cb._gates),
                     None)
    if scheduler is None:
        return {}
    s = scheduler.summary()
    closed = scheduler.closed_at_target or {}
    return {"alpha_residual": s["residual"], "alpha_share_removed": s["share_removed"],
            "alpha_removed_step": s["removed_step"], "alpha_target_step": scheduler.target_step,
            "alpha_closed_at_target": closed.get("units"), "alpha_residual_at_target": closed.get("residual")}


def _summary(config, trainer, metrics, datamodule, stats, stop, status, error, parameters, module) -> dict:
    ckpt = next((cb for cb in trainer.checkpoint_callbacks), None)
    last = Path(config["run_dir"]) / "checkpoints" / "last.ckpt"
    return {
        "status": status, "error": error,
        "model": config["model"], "arch": config["arch"], "depth": config["depth"], "dataset": config["dataset"],
        "parameters": parameters, "epochs_done": trainer.current_epoch, "global_step": trainer.global_step,
        "train_loss": metrics.get("train/loss_epoch"), "train_acc": metrics.get("train/acc"),
        "val_loss": metrics.get("val/loss"), "val_acc": metrics.get("val/acc"),
        "test_loss": metrics.get("test/loss"), "test_acc": metrics.get("test/acc"),
        "wall_seconds": stats.wall_seconds, "samples_per_second": stats.samples_per_second,
        "validation_source": getattr(datamodule, "validation_source", None),
        "split_sizes": getattr(datamodule, "split_sizes", None), "data_root": config.get("data_root"),
        "precision": str(trainer.precision),
        "best_checkpoint": (ckpt.best_model_path or None) if ckpt else None,
        "interrupt_checkpoint": str(stop.saved) if stop.saved else None,
        "resume_from": str(last) if last.is_file() and status != "completed" else None,
        "run_dir": config["run_dir"], "config": dict(config), **_alpha_summary(module),
        "diagnostics": trainability_findings(getattr(trainer, "callbacks", [])),
    }
