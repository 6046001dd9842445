"""Run folders: what one holds (:class:`RunFolder`, the one description of its layout, and a sweep's
:class:`SweepFolder`), and who creates it, so that it is never overwritten.

Who creates the folder:

* a plain run, or rank zero of a DDP run that Lightning launches: the first free
  ``<logdir>/<name>/version_N`` (an atomic ``mkdir``, so concurrent runs never share one); the
  processes Lightning starts for the other ranks inherit it through ``$DEEPPLAIN_RUN_DIR``;
* under torchrun, every rank starts on its own: global rank zero creates ``version_N`` and the
  others receive its path once the process group is up (``runtime.RunFolderSync``);
* a SLURM batch job uses ``job_<SLURM_JOB_ID>`` (``job_<array id>_<task id>`` for arrays), the same
  on every rank and again after a requeue, so a requeued job continues in its own folder.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RUN_DIR_ENV = "DEEPPLAIN_RUN_DIR"  # set by rank zero so DDP worker processes log into the same run

# -- what a run folder holds ---------------------------------------------------------------------------
CONFIG_FILE = "config.json"          # the checked configuration, written before training
SUMMARY_FILE = "summary.json"        # how the run ended, written at its end
CHECKPOINT_FOLDER = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"        # the newest state; --resume continues from it
LAST_IN_RUN = f"{CHECKPOINT_FOLDER}/{LAST_CHECKPOINT}"  # its path inside the run folder, for messages
LOCK_FILE = ".lock"                  # held by the process that trains into the folder (inputs.FolderLock)
RESULTS_FILE = "results.csv"         # a sweep's table
SWEEP_RUNS = "runs"                  # a sweep's run roots: runs/<run id>/<version>/
RUN_RECORD = "run.json"              # in a run root: the train.py flags the sweep runs it with
TRAIN_LOG = "train.log"              # in a run root: what its trainings printed


def _inside(*parts: str) -> property:
    """A path inside the folder, as a read-only attribute."""
    return property(lambda self: self.path.joinpath(*parts))


@dataclass(frozen=True)
class _Folder:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))


class RunFolder(_Folder):
    """The paths of one run folder (``<logdir>/<name>/version_N`` or ``job_<id>``)."""
    config = _inside(CONFIG_FILE)
    summary = _inside(SUMMARY_FILE)
    checkpoints = _inside(CHECKPOINT_FOLDER)
    last_checkpoint = _inside(CHECKPOINT_FOLDER, LAST_CHECKPOINT)

    @classmethod
    def of_checkpoint(cls, checkpoint) -> "RunFolder":
        """The run folder of a checkpoint (``<run>/checkpoints/x.ckpt``, or a SLURM ``<run>/hpc_ckpt_N.ckpt``)."""
        parent = Path(checkpoint).parent
        return cls(parent.parent if parent.name == CHECKPOINT_FOLDER else parent)


class SweepFolder(_Folder):
    """The paths of a sweep's ``--out`` folder: its table and one run root per run id (each run root
    holds the run's version folders, one per attempt)."""
    results = _inside(RESULTS_FILE)
    runs = _inside(SWEEP_RUNS)

    def run_root(self, run_id: str) -> Path:
        return self.runs / run_id


def newest_in(run_root: Path, name: str) -> Optional[Path]:
    """The newest ``<version>/<name>`` under a run root (``name``: ``SUMMARY_FILE``, ``LAST_IN_RUN``)."""
    return max(Path(run_root).glob(f"*/{name}"), key=lambda p: p.stat().st_mtime, default=None)


def launcher_rank() -> int:
    """This process's global rank as its launcher set it (0 when started alone)."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value is not None and value.isdigit():
            if key == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1") or 1) <= 1:
                continue
            return int(value)
    return 0


def slurm_job_folder() -> Optional[str]:
    """``job_<id>`` inside a SLURM batch job (not in an interactive allocation), else None."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_JOB_NAME", "") in ("bash", "interactive", "sh", "zsh"):
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    name = f"job_{array_job}_{array_task}" if array_job and array_task else f"job_{job}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def run_dir_for(logdir, name: str) -> tuple[Path, bool]:
    """``(run folder, created here)`` for this process; see the module docstring for who creates it."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(inherited), False
    base = Path(logdir) / name
    job = slurm_job_folder()
    if launcher_rank() != 0:
        return base / (job or "rank-zero-folder"), False  # the real path arrives by broadcast
    if job:
        base.mkdir(parents=True, exist_ok=True)
        run = base / job
        run.mkdir(exist_ok=True)
        os.environ[RUN_DIR_ENV] = str(run)
        return run, True
    return reserve_run_dir(logdir, name), True


def reserve_run_dir(logdir, name: str) -> Path:
    """Create and return ``<logdir>/<name>/version_N`` for the first N not taken (atomic mkdir)."""
    base = Path(logdir) / name
    base.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(m.group(1)) for p in base.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
        run = base / f"version_{max(taken, default=-1) + 1}"
        try:
            run.mkdir()
        except FileExistsError:  # another process took it first
            continue
        os.environ[RUN_DIR_ENV] = str(run)
        return run
