"""Callbacks the CLI adds to every run: throughput bookkeeping and the interrupt checkpoint."""
from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch import Callback


class RunStats(Callback):
    """Wall-clock time and training samples per second (validation time excluded), with no
    host-device synchronisation: batch sizes are read from tensor shapes."""

    def __init__(self):
        self.samples = 0
        self.train_seconds = 0.0
        self.started = time.perf_counter()
        self._epoch_start = None
        self._val_seconds = 0.0
        self._val_start = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start, self._val_seconds = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.samples += int(inputs.shape[0]) * trainer.world_size

    def on_validation_start(self, trainer, pl_module):
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._val_start is not None:
            self._val_seconds += time.perf_counter() - self._val_start
            self._val_start = None

    def on_train_epoch_end(self, trainer, pl_module):
        if self._epoch_start is not None:
            self.train_seconds += time.perf_counter() - self._epoch_start - self._val_seconds
            self._epoch_start = None

    @property
    def samples_per_second(self) -> float | None:
        return self.samples / self.train_seconds if self.train_seconds > 0 else None

    @property
    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started


class InterruptCheckpoint(Callback):
    """On Ctrl-C, save ``checkpoints/interrupted.ckpt`` before Lightning shuts the run down."""

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.saved: Path | None = None

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            path = self.checkpoint_dir / "interrupted.ckpt"
            try:
                trainer.save_checkpoint(path)
                self.saved = path
            except Exception:  # the run is stopping anyway; the summary says no checkpoint was saved
                self.saved = None
