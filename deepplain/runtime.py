"""Callbacks the CLI adds to every run: bookkeeping, exact resume, the divergence guard and stop signals."""
from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar

from .callbacks.probing import LayerCapture, batch_inputs
from .checkpoints import first_non_finite
from .errors import DivergenceError
from .status import RunStatus


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


class RNGState(Callback):
    """Saves and restores the torch, numpy and Python random generators with each checkpoint."""

    def state_dict(self):
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # plain lists and tensors only, so that checkpoints load with torch.load(weights_only=True)
        return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                           cached], "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_state_dict(self, state_dict):
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
        if state_dict.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


# -- divergence ----------------------------------------------------------------------------------------
class DivergenceGuard(Callback):
    """Stops a run whose loss becomes non-finite, naming the step and the first layer whose output
    went non-finite on that step, before that step's update is applied.

    The loss is read in ``on_before_backward``: at every step when training runs on the CPU (the
    value is already on the host), every ``check_every_n_steps`` steps on an accelerator (a read
    stalls the device; a flag kept on the device still gives the exact first bad step, but the
    culprit is then searched with the weights of the step that noticed it). The weights are checked
    before every validation and at every epoch end, which is before ModelCheckpoint saves, so a
    checkpoint of diverged weights is never written.
    """

    def __init__(self, check_every_n_steps: Optional[int] = None):
        self.check_every_n_steps = check_every_n_steps
        self.every = check_every_n_steps or 1
        self._first_bad_step: Optional[torch.Tensor] = None
        self._batch = None

    def on_train_start(self, trainer, pl_module):
        on_cpu = trainer.strategy.root_device.type == "cpu"
        self.every = self.check_every_n_steps or (1 if on_cpu else 50)
        self._first_bad_step = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        step = trainer.global_step
        bad = ~torch.isfinite(loss.detach())
        if self.every == 1:
            diverged = bool(bad)
            if trainer.world_size > 1:
                diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
            if diverged:
                raise self._error(pl_module, step, self._batch, same_step=True)
            return
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=bad.device)
        first = self._first_bad_step
        self._first_bad_step = torch.where(bad & (first < 0), torch.full_like(first, step), first)
        if step % self.every == 0:
            self._check_flag(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._check_flag(trainer, pl_module)
            self.check_weights(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._check_flag(trainer, pl_module)
        self.check_weights(trainer, pl_module)

    def _check_flag(self, trainer, pl_module):
        if self._first_bad_step is None:
            return
        diverged = bool(self._first_bad_step >= 0)
        if trainer.world_size > 1:
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            step = int(self._first_bad_step) if int(self._first_bad_step) >= 0 else trainer.global_step
            raise self._error(pl_module, step, self._batch, same_step=False)

    def check_weights(self, trainer, pl_module):
        bad = first_non_finite(dict(pl_module.named_parameters()))
        diverged = bad is not None
        if trainer.world_size > 1:
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            raise DivergenceError(f"training diverged: the weights became non-finite by step {trainer.global_step} "
                                  f"(first: {bad or 'on another rank'}) although the loss was finite")

    def _error(self, pl_module, step: int, batch, same_step: bool) -> DivergenceError:
        layer = first_non_finite_layer(pl_module, batch) if batch is not None else None
        param = first_non_finite(dict(pl_module.named_parameters()))
        where = f"first non-finite layer output: {layer}" if layer else "no layer output is non-finite now"
        if param:
            where += f"; first non-finite parameter: {param}"
        if not same_step:
            where += " (searched at a later step)"
        return DivergenceError(f"training diverged: non-finite loss at step {step}; {where}")


def first_non_finite_layer(pl_module, batch) -> str | None:
    """The first leaf module, in forward order, whose output on ``batch`` has a NaN or inf.

    The forward runs as in training (batch norm on batch statistics), without gradients, and the
    batch-norm running statistics are restored afterwards."""
    leaves = [(n, m) for n, m in pl_module.named_modules() if n and not list(m.children())]
    buffers = {k: v.clone() for k, v in pl_module.state_dict().items() if "running_" in k or "num_batches" in k}
    try:
        with torch.no_grad(), LayerCapture(leaves, lambda name, out: bool(torch.isfinite(out).all())) as capture:
            pl_module(batch_inputs(batch))
    finally:
        pl_module.load_state_dict(buffers, strict=False)
    return next((name for name, finite in capture.results.items() if not finite), None)


# -- stop signals ------------------------------------------------------------------------------------
class RunStopped(BaseException):
    """Raised at a step boundary after Ctrl-C (``reason="interrupted"``) or SIGTERM (``"preempted"``).

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` in user code cannot swallow it.
    """

    def __init__(self, reason: RunStatus):
        super().__init__(reason)
        self.reason = RunStatus(reason)


class StopSignals(Callback):
    """Ctrl-C and SIGTERM (what SLURM and other schedulers send before killing a job) stop training
    at the next step boundary, on every rank at the same step, after saving a resumable checkpoint
    of that step. A second Ctrl-C stops at once, without a checkpoint.

    Lightning's own SIGTERM handler is replaced while training runs: it enters a collective from
    inside the signal handler, which can deadlock a DDP run.
    """

    def __init__(self, checkpoint_path: Path):
        self.checkpoint_path = Path(checkpoint_path)
        self.requested: Optional[RunStatus] = None
        self.saved: Optional[Path] = None
        self._previous = {}

    def on_train_start(self, trainer, pl_module):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested is RunStatus.INTERRUPTED:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = RunStatus.PREEMPTED if signum == signal.SIGTERM else RunStatus.INTERRUPTED

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stop = self.requested is not None
        if trainer.world_size > 1:  # every rank stops at the same step, or a collective would hang
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise RunStopped(self.requested or RunStatus.PREEMPTED)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, RunStopped) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # said, so Lightning need not
            self.saved = self.checkpoint_path

    def teardown(self, trainer, pl_module, stage):
        for signum, handler in self._previous.items():
            if threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler)
        self._previous = {}


class RunFolderSync(Callback):
    """Under torchrun or SLURM every rank starts on its own and only global rank zero creates the run
    folder; the others learn its path here, before anything is saved."""

    def __init__(self, run_dir: Path, paths_to_update: list):
        self.run_dir = Path(run_dir)
        self._targets = paths_to_update  # objects with a checkpoint_path attribute under run_dir

    def setup(self, trainer, pl_module, stage):
        if trainer.world_size <= 1:
            return
        shared = Path(trainer.strategy.broadcast(str(self.run_dir), src=0))
        if shared != self.run_dir:
            for target in self._targets:
                target.checkpoint_path = shared / target.checkpoint_path.relative_to(self.run_dir)
            self.run_dir = shared


class RunProgressBar(RichProgressBar):
    """Rich's progress bar with the run's version number as ``v_num`` (Lightning shows the last four
    characters of a string version: ``on_0`` for ``version_0``)."""

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        version = getattr(trainer.logger, "version", None)
        if isinstance(version, str):
            items["v_num"] = version.removeprefix("version_")
        return items
