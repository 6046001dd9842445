"""From the explicit values of the command line to a checked plan: the configuration, its
datamodule (not yet read) and the strategy Lightning will use.

Everything that can be wrong with the input is found here, before anything is read or written;
``deepplain.training`` then carries the plan out.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

from . import preflight
from .checkpoints import check_checkpoint, completed_epochs
from .config import merge
from .datamodules import DatasetRecord, get_dataset
from .errors import ConfigError
from .loggers import require_packages
from .resume import load_resume_config, requeued_job_checkpoint
from .rundir import CONFIG_FILE
from .schema import DATAMODULE, RunConfig, options_for

# Lightning's short spellings of --precision
PRECISION_ALIASES = {"16": "16-mixed", "32": "32-true", "64": "64-true", "bf16": "bf16-mixed"}


@dataclass
class Plan:
    config: RunConfig
    dataset: DatasetRecord
    datamodule: Any
    strategy_class: str = ""  # the class name of the strategy Lightning picks ("DDPStrategy", ...)


def resolve_config(explicit: dict) -> RunConfig:
    """The checked configuration: merged from the explicit values, or a saved run's for ``--resume``
    (also when a requeued SLURM job finds its own folder)."""
    if explicit.get("resume"):
        return load_resume_config(explicit)
    config = merge(explicit)
    resumable = requeued_job_checkpoint(config)
    if resumable is not None:  # a requeued SLURM job continues in its own folder
        return load_resume_config({**explicit, "resume": str(resumable)})
    return config


def make_datamodule(config: RunConfig, data_dir: Optional[str] = None):
    """The run's datamodule with the options its dataset takes (``data_dir`` overrides the config's)."""
    dataset = get_dataset(config.dataset)
    kwargs = options_for(config, DATAMODULE)
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    if not dataset.checksums:
        del kwargs["verify_checksums"]
    if not dataset.held_out_validation:
        del kwargs["val_split"]
    if dataset.image_size is None or kwargs["image_size"] is None:
        del kwargs["image_size"]
    return dataset.datamodule(**kwargs)


def make_plan(explicit: dict) -> Plan:
    """Resolve, check against the machine and the data, and describe the run; nothing is read or written."""
    config = resolve_config(explicit)
    if config.resume:
        done = completed_epochs(check_checkpoint(config.resume))
        if done >= config.epochs:
            raise ConfigError(f"the run in {config.run_dir} already finished {done} epoch(s); pass --epochs N with "
                              f"N > {done} to train longer")
    precision, strategy_class, processes = preflight.check_trainer_flags(config)
    requested = str(config.precision)
    if precision != PRECISION_ALIASES.get(requested, requested):
        print(f"note: --precision {requested} runs as {precision} here (recorded in {CONFIG_FILE})", file=sys.stderr)
    config = config.replace(precision=precision)
    dataset = get_dataset(config.dataset)
    datamodule = make_datamodule(config)
    info = datamodule.info()
    preflight.check_model_memory(config, info, processes)  # depth, width, options; memory
    preflight.check_batch_limits(config, info, getattr(datamodule, "eval_batch_size", None))
    if config.resume:
        preflight.check_logdir(config.run_dir, None)
    else:
        preflight.check_logdir(config.logdir, config.name)
    if dataset.reads_files:
        datamodule.find_root()  # the files are there (nothing is read yet)
    require_packages(config.logger)
    return Plan(config, dataset, datamodule, strategy_class)


