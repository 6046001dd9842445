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


class RNGState(Callback):
    """Saves and restores the torch, numpy and Python random generators with each checkpoint."""

    def state_dict(self):
        import random

        import numpy as np
        import torch
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # plain lists and tensors only, so that checkpoints load with torch.load(weights_only=True)
        return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                           cached], "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_state_dict(self, state_dict):
        import random

        import numpy as np
        import torch
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
        if state_dict.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class DivergenceGuard(Callback):
    """Stops a run whose loss becomes non-finite, naming the step and the first layer whose output
    is non-finite, before a checkpoint of the diverged weights can be written.

    The loss is checked on the device every step (no synchronisation); the host reads the flag
    every ``check_every_n_steps`` steps and always before validation and at epoch end, which is
    before ModelCheckpoint (always last) saves.
    """

    def __init__(self, check_every_n_steps: int = 50):
        self.check_every = max(1, int(check_every_n_steps))
        self._first_bad_step = None
        self._last_batch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import torch
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        bad = ~torch.isfinite(loss.detach())
        step = torch.tensor(trainer.global_step - 1, device=bad.device)
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=bad.device)
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), step, self._first_bad_step)
        self._last_batch = batch
        if trainer.global_step % self.check_every == 0:
            self.check(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.check(trainer, pl_module)

    def check(self, trainer, pl_module):
        if self._first_bad_step is None:
            return
        diverged = trainer.strategy.reduce_boolean_decision(bool(self._first_bad_step >= 0), all=False)
        if not diverged:
            return
        from .errors import DivergenceError
        step = int(self._first_bad_step)
        layer = first_non_finite_layer(pl_module, self._last_batch)
        where = f"first non-finite layer output: {layer}" if layer else "no layer output is non-finite now"
        raise DivergenceError(f"training diverged: non-finite loss at step {max(step, 0)}; {where}")


def first_non_finite_layer(pl_module, batch) -> str | None:
    """The first leaf module, in forward order, whose output on ``batch`` has a NaN or inf."""
    import torch

    from callbacks._probe import LayerCapture, batch_inputs, eval_mode
    if batch is None:
        return None
    leaves = [(n, m) for n, m in pl_module.named_modules() if n and not list(m.children())]
    with eval_mode(pl_module), LayerCapture(leaves, lambda name, out: bool(torch.isfinite(out).all())) as capture:
        pl_module(batch_inputs(batch))
    return next((name for name, finite in capture.results.items() if not finite), None)
