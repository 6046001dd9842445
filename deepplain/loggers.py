"""The loggers of a ``train.py`` run: TensorBoard always (``curves``, the HParams table and the run
folder's tools read it), plus those ``--logger`` names.

* ``wandb``: Weights & Biases, **offline** unless ``$WANDB_MODE`` says otherwise (nothing is uploaded by
  surprise); its files under ``<run>/wandb/``; project ``$WANDB_PROJECT`` or ``deepplain``; the run's W&B id
  is derived from the run folder, so ``--resume`` continues the same W&B run.
* ``mlflow``: MLflow with one SQLite store per ``--logdir`` (``<logdir>/mlflow.db``, artifacts in
  ``<logdir>/mlartifacts``), so a sweep's runs share one MLflow view, unless ``$MLFLOW_TRACKING_URI`` is set;
  experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``deepplain``; the run is tagged with its folder, so ``--resume``
  continues the same MLflow run.
* ``csv``: Lightning's ``CSVLogger``, ``<run>/csv/metrics.csv``.

The run folder, ``summary.json`` and checkpoints are the same whatever the loggers. Where the
diagnostics' images and files go in each logger is ``deepplain.callbacks.outputs``' business.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

from .errors import ConfigError, one_line


@dataclass(frozen=True)
class LoggerRecord:
    """One logger ``--logger`` can add: how it is built, and the package it needs beyond the core install with
    the pip extra that installs it (None: nothing more)."""
    build: Callable  # (run_dir: Path, logdir: Path) -> Logger
    package: Optional[str] = None
    extra: Optional[str] = None


def run_label(run_dir: Path) -> str:
    """``<name>/<version>``: how a run is named in the trackers (the folder is the identity)."""
    return f"{run_dir.parent.name}/{run_dir.name}"


def wandb_id(run_dir: Path) -> str:
    """A W&B run id that is the same for every process and every ``--resume`` of this run folder."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def _wandb(run_dir: Path, logdir: Path):
    offline = "WANDB_MODE" not in os.environ  # the user's own setting wins; otherwise never upload by surprise
    return WandbLogger(save_dir=str(run_dir), name=run_label(run_dir), id=wandb_id(run_dir), resume="allow",
                       project=os.environ.get("WANDB_PROJECT", "deepplain"), offline=offline)


MLFLOW_STORE, MLFLOW_ARTIFACTS, RUN_DIR_TAG = "mlflow.db", "mlartifacts", "deepplain.run_dir"


def mlflow_store(logdir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment): ``$MLFLOW_TRACKING_URI`` or the logdir's SQLite."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    logdir = logdir.resolve()
    return f"sqlite:///{logdir / MLFLOW_STORE}", (logdir / MLFLOW_ARTIFACTS).as_uri()


@contextlib.contextmanager
def _store_lock(logdir: Path):
    """One process at a time creates the logdir's SQLite store (a sweep's parallel runs start together)."""
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / f"{MLFLOW_STORE}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _mlflow(run_dir: Path, logdir: Path):
    from mlflow import MlflowClient  # only when asked for: the core install does not have it

    uri, artifacts = mlflow_store(logdir)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "deepplain")
    with _store_lock(logdir) if artifacts else contextlib.nullcontext():
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            name, artifact_location=artifacts)
        earlier = client.search_runs([experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run_dir.resolve()}'", max_results=1)
    return MLFlowLogger(experiment_name=name, run_name=run_label(run_dir), tracking_uri=uri,
                        tags={RUN_DIR_TAG: str(run_dir.resolve())},
                        run_id=earlier[0].info.run_id if earlier else None)


def _csv(run_dir: Path, logdir: Path):
    return CSVLogger(save_dir=str(run_dir), name="", version="csv")


LOGGERS = {"wandb": LoggerRecord(_wandb, "wandb", "wandb"), "mlflow": LoggerRecord(_mlflow, "mlflow", "mlflow"),
           "csv": LoggerRecord(_csv)}
ALWAYS = "tensorboard"


def check_loggers(spec) -> list[str]:
    """The loggers ``--logger`` adds to TensorBoard (a comma list; ``tensorboard`` itself is allowed and changes nothing)."""
    valid = f"valid: a comma list of {', '.join(LOGGERS)} ({ALWAYS} is always written)"
    if spec is None:
        return []
    names = [s.strip() for s in str(spec).split(",")]
    if not str(spec).strip() or "" in names:
        raise ConfigError(f"--logger {spec!r} has an empty name; {valid}")
    unknown = [n for n in names if n not in LOGGERS and n != ALWAYS]
    if unknown:
        raise ConfigError(f"unknown logger {', '.join(unknown)}; {valid}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--logger names {', '.join(twice)} twice")
    return [n for n in names if n != ALWAYS]


def require_packages(spec) -> None:
    """Each logger's package imports (before anything trains): else one line naming the pip extra."""
    for name in check_loggers(spec):
        record = LOGGERS[name]
        if record.package is None:
            continue
        try:
            importlib.import_module(record.package)
        except ImportError:
            raise ConfigError(f"--logger {name} needs the {record.package} package: pip install "
                              f"\"deepplain[{record.extra}]\" (from a clone: pip install -e \".[{record.extra}]\")") \
                from None


@contextlib.contextmanager
def _starting(what: str):
    """A tracker that cannot start its run (a store it cannot open, a login it lacks) is one line, not a traceback."""
    try:
        yield
    except Exception as exc:
        raise ConfigError(f"{what} could not start its run: {one_line(exc)}") from None


def log_run_identity(trackers: list, params: dict) -> None:
    """The options that identify the run as W&B config and MLflow params, when it starts (their runs start here).
    MLflow's params cannot change: a continued run (--resume --epochs 300) logs only the params it has not, and
    each changed value as the tag ``resumed/<option>``."""
    for logger in trackers:
        with _starting(type(logger).__name__):
            _log_identity(logger, params)


def _log_identity(logger, params: dict) -> None:
    new = params
    if isinstance(logger, MLFlowLogger):
        logged = logger.experiment.get_run(logger.run_id).data.params
        for key, value in params.items():
            if key in logged and logged[key] != str(value):
                logger.experiment.set_tag(logger.run_id, f"resumed/{key}", str(value))
        new = {k: v for k, v in params.items() if k not in logged}
    logger.log_hyperparams(new)


def close_trackers(loggers: list) -> None:
    """End the trackers' runs when the training run ends (rank zero): a W&B run left open until interpreter exit
    stays "in use" for a W&B service shared with another process, and a --resume of it there fails."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            finish = getattr(logger.experiment, "finish", None)
            if callable(finish):
                finish()


def build_loggers(spec, run_dir: Path, logdir: Path) -> list:
    """TensorBoard (the first: its folder is the run folder), then each ``--logger``, in the order named."""
    tensorboard = TensorBoardLogger(save_dir=str(run_dir.parent.parent), name=run_dir.parent.name,
                                    version=run_dir.name, default_hp_metric=False)
    loggers = [tensorboard]
    for name in check_loggers(spec):
        with _starting(f"--logger {name}"):
            loggers.append(LOGGERS[name].build(run_dir, logdir))
    return loggers
