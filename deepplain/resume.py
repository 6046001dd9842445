"""Continuing a run that stopped, in one place: ``--resume`` (the saved configuration, with the flags
that may change), a requeued SLURM job (its own folder), a sweep's interrupted run (the newest sound
``last.ckpt`` of its run root), and the lock that keeps two processes from continuing one folder.

The checkpoint file itself is checked by ``deepplain.checkpoints.check_checkpoint``; the folders'
layout is ``deepplain.rundir``'s.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from .checkpoints import check_checkpoint, completed_epochs
from .config import check
from .errors import ConfigError
from .inputs import FolderLock
from .rundir import (CHECKPOINT_FOLDER, LAST_CHECKPOINT, LAST_IN_RUN, SUMMARY_FILE, RunFolder, launcher_rank,
                     newest_in, slurm_job_folder)
from .schema import CHANGEABLE_ON_RESUME, DEFAULTS, RunConfig, flag, from_dict
from .status import RESUMABLE


# -- train.py --resume, and a requeued SLURM job --------------------------------------------------------
def load_resume_config(explicit: dict) -> RunConfig:
    """For ``--resume``: the run's saved configuration, with the explicit flags that may change."""
    ckpt = Path(explicit["resume"])
    if ckpt.is_dir():
        inside = next((c for c in (RunFolder(ckpt).last_checkpoint, ckpt / LAST_CHECKPOINT) if c.is_file()), None)
        raise ConfigError(f"--resume takes a checkpoint file; {ckpt} is a folder"
                          + (f": pass {inside}" if inside else f" with no {LAST_IN_RUN} in it"))
    if not ckpt.is_file():
        raise ConfigError(f"--resume checkpoint {ckpt} does not exist")
    run = RunFolder.of_checkpoint(ckpt)
    saved = run.config
    if not saved.is_file():  # checked first: a file outside any run is no run's checkpoint, whatever its name
        raise ConfigError(f"--resume: {ckpt} is not in a deepplain run folder ({saved} not found); pass a run's "
                          f"{LAST_IN_RUN}")
    if ckpt.name != LAST_CHECKPOINT and not (ckpt.name.startswith("hpc_ckpt_") and ckpt.suffix == ".ckpt"):
        # Resuming continues the run in its folder; from another state it would overwrite the newer last.ckpt.
        raise ConfigError(f"--resume continues a run in place from the file named {LAST_CHECKPOINT} in its "
                          f"{CHECKPOINT_FOLDER} folder; {ckpt.name} is another file (a best-* checkpoint or a copy): "
                          f"pass the run's {LAST_IN_RUN}, or load this one with <Module>.load_from_checkpoint to "
                          "use it elsewhere")
    try:
        config = json.loads(saved.read_text())
        if not isinstance(config, dict) or "model" not in config or "dataset" not in config:
            raise ValueError("not a deepplain run configuration")
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--resume: {saved} is unreadable or malformed ({str(exc).splitlines()[0]}); "
                          "the run folder cannot be resumed") from None
    fixed = sorted(k for k in explicit if k not in CHANGEABLE_ON_RESUME and explicit[k] != config.get(k))
    if fixed:
        raise ConfigError(f"--resume continues the saved run; these flags cannot change: "
                          f"{', '.join(flag(k) for k in fixed)}")
    merged = {**DEFAULTS, **config, **explicit, "run_dir": str(run.path)}
    check(merged, {})
    return from_dict(merged)


def requeued_job_checkpoint(config: RunConfig) -> Optional[Path]:
    """Inside a SLURM batch job whose folder already holds a run: its newest checkpoint."""
    job = slurm_job_folder()
    if job is None:
        return None
    run = RunFolder(Path(config.logdir) / config.default_name / job)
    candidates = [p for p in run.checkpoints.glob("*.ckpt") if p.name == LAST_CHECKPOINT] + list(
        run.path.glob("hpc_ckpt_*.ckpt"))
    if not run.config.is_file() or not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def resume_lock(config: RunConfig):
    """One process at a time continues a run folder: two resumes of one last.ckpt would train twice into it.
    Held by the launching process only (DDP ranks share the folder by design)."""
    if not config.resume or launcher_rank() != 0 or os.environ.get("LOCAL_RANK", "0") != "0":
        return contextlib.nullcontext()
    return FolderLock(config.run_dir, "--resume: the run folder")


# -- a sweep's run root (one version folder per attempt) -------------------------------------------------
def latest_summary(run_root: Path) -> dict | None:
    summary = newest_in(run_root, SUMMARY_FILE)
    if summary is None:
        return None
    try:
        return json.loads(summary.read_text())
    except json.JSONDecodeError:
        return None


def newest_last_checkpoint(run_root: Path) -> Path | None:
    """The ``last.ckpt`` written most recently under ``run_root`` (one per version folder), if any."""
    return newest_in(run_root, LAST_IN_RUN)


def stopped_from_outside(run_root: Path, summary: dict | None) -> bool:
    """The run's last attempt was stopped before it ended: interrupted or preempted (its summary says so),
    or killed before it could write a summary (SIGKILL, the OOM killer, a reboot): its newest ``last.ckpt``
    lies in a version folder without ``summary.json``."""
    if summary and summary.get("status") in RESUMABLE:
        return True
    newest_checkpoint = newest_last_checkpoint(run_root)
    return newest_checkpoint is not None and not RunFolder.of_checkpoint(newest_checkpoint).summary.exists()


def resumable_checkpoint(root: Path, epochs: int) -> Path | None:
    """The newest ``last.ckpt`` of an interrupted run, if it is sound and has epochs left to train."""
    newest = newest_last_checkpoint(root)
    if newest is None:
        return None
    try:
        if completed_epochs(check_checkpoint(newest)) >= epochs:
            return None
    except ConfigError:  # damaged: train again from the start
        return None
    return newest


def saved_epochs(run_root: Path) -> int | None:
    """The epochs the newest ``last.ckpt`` under ``run_root`` holds (None: none, or unreadable); its
    tensors are mapped, not read."""
    newest = newest_last_checkpoint(run_root)
    if newest is None:
        return None
    try:
        return completed_epochs(torch.load(newest, map_location="cpu", weights_only=False, mmap=True))
    except Exception:  # half-written by a kill, or damaged: nothing to report from it
        return None
