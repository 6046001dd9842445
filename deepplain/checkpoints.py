"""Checkpoints that are never half-written, never hold diverged weights, and are checked before a resume.

* :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin) writes each checkpoint to a
  temporary file in the checkpoint's own folder, flushes it to disk, then renames it over the old
  one. A kill or a full disk in the middle of a save leaves the previous checkpoint intact; the
  rename never crosses filesystems (Lightning's default writes through the system temp folder).
* It refuses to write a checkpoint whose weights hold NaN or inf: a diverged run never replaces
  its last good checkpoint.
* :class:`RunCheckpoint` keeps the best score and the top-k record when a run folder was moved.
* :func:`check_checkpoint` tells whether a file is a complete, readable training checkpoint
  (zip CRCs, torch.load, required keys, finite weights) before ``--resume`` touches anything.
"""
from __future__ import annotations

import errno
import os
import warnings
import zipfile
from contextlib import suppress
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import ConfigError, DivergenceError
from .files import atomic_file
from .rundir import LAST_IN_RUN

TEMP_SUFFIX = ".tmp"
REQUIRED_KEYS = ("state_dict", "epoch", "global_step", "loops", "optimizer_states")


def first_non_finite(tensors: dict) -> Optional[str]:
    """The name of the first floating-point tensor with a NaN or inf, or None (one host sync)."""
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not items:
        return None
    finite = torch.stack([v.detach().isfinite().all().to("cpu", non_blocking=True) for _, v in items])
    if bool(finite.all()):
        return None
    return items[int((~finite).nonzero()[0])][0]


def fsync_dir(folder: Path) -> None:
    with suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes atomically in place and refuses non-finite weights."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        bad = first_non_finite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise DivergenceError(f"refusing to save {path.name}: {bad} holds non-finite values (the weights "
                                  "diverged); the previous checkpoint is kept")
        try:
            with atomic_file(path, "wb", suffix=TEMP_SUFFIX) as fh:
                torch.save(checkpoint, fh)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(exc.errno, f"no space left to save {path.name} ({exc.strerror}); the previous "
                                         "checkpoint is kept") from None
            raise
        fsync_dir(path.parent)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed save left in ``folder``; returns them."""
    removed = []
    if folder.is_dir():
        for path in folder.glob(f".*{TEMP_SUFFIX}"):
            with suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def completed_epochs(checkpoint: dict) -> int:
    """How many epochs the checkpointed run had trained through. A checkpoint written at an epoch's
    end (its last batch done) counts that epoch; Lightning marks it completed only after the save."""
    try:
        loop = checkpoint["loops"]["fit_loop"]
        progress = loop["epoch_progress"]["current"]
        at_epoch_end = bool(loop["epoch_loop.batch_progress"]["is_last_batch"])
        return int(progress["started"] if at_epoch_end else progress["completed"])
    except (KeyError, TypeError, ValueError):
        return int(checkpoint.get("epoch", 0))


def check_checkpoint(path) -> dict:
    """Load ``path`` if it is a complete, finite Lightning training checkpoint; else a one-line
    :class:`ConfigError` naming the file and what is wrong with it."""
    path = Path(path)
    where = f"--resume checkpoint {path}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        size = path.stat().st_size
        if size == 0:
            raise ConfigError(f"{where} is empty (a save was interrupted?); resume from another checkpoint")
        if not zipfile.is_zipfile(path):
            raise ConfigError(f"{where} is not a checkpoint (not a torch.save archive) or is truncated")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC-32
        if bad is not None:
            raise ConfigError(f"{where} is corrupt (record {bad} fails its CRC check)")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except ConfigError:
        raise
    except Exception as exc:  # zipfile, pickle and torch raise many types for damaged files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where} is unreadable ({type(exc).__name__}: {detail[:160]})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ConfigError(f"{where} is not a training checkpoint (no {', '.join(missing)}); pass a run's "
                          f"{LAST_IN_RUN}")
    bad = first_non_finite(checkpoint["state_dict"])
    if bad is not None:
        raise ConfigError(f"{where} holds non-finite weights ({bad}); resume from an earlier checkpoint")
    return checkpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for a run folder that may have moved since it was saved.

    Lightning drops the best score and the top-k record when a checkpoint's ``dirpath`` differs from
    the current one, so after ``mv runs/a runs/b`` a resumed run would take any worse epoch as its
    best. The run's checkpoints are in the same folder relative to the run, so the saved paths are
    moved with it and everything is restored."""

    def setup(self, trainer, pl_module, stage) -> None:
        # A run folder's checkpoints/ holds files only when the run is resumed into it (a new run gets a
        # new version_N), so Lightning's "exists and is not empty" warning would only ever say that.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    @property
    def state_key(self) -> str:  # the key Lightning's own class writes, so earlier checkpoints still restore
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:
            def moved(path):
                return str(Path(self.dirpath) / Path(path).name) if path and Path(path).parent == Path(old) else path
            state_dict = {**state_dict, "dirpath": self.dirpath,
                          "best_model_path": moved(state_dict.get("best_model_path")),
                          "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                          "last_model_path": moved(state_dict.get("last_model_path")),
                          "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}}
        super().load_state_dict(state_dict)
