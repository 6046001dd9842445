"""The probe batch: one fixed input batch per run, shared by the callbacks that probe, saved once.

A probe runs the model in eval mode on the same inputs at every sample, so that its statistics
change only because the network does. Rules, each for a reason:

* **One per run.** :meth:`ProbeBatch.shared` gives every callback of a trainer the same object; its
  size is the largest any of them asks for (ConditionNumberProbe asks for twice the widest layer's
  units, so that every representation can have full unit rank). Only its first member (in the
  trainer's callback order) writes it into checkpoints; the others write a marker.
* **Large enough by default.** Drawn from ``datamodule.probe_batch(n)`` when the datamodule has one
  (deepplain's do), else from a separate pass over a copy of the training DataLoader (as many
  batches as the size needs, in the main process), else from the training batch at hand.
* **Observe, never perturb.** That pass and every probe forward run under
  :func:`forked_random_state` (torch on every device, numpy, ``random`` and the loader's own
  generators are restored), in eval mode and without gradients, so batch-norm statistics, dropout
  masks, the data order and the gradients of the run are untouched; a model with uninitialised
  lazy layers is not probed until training's own forward has initialised them.
* **Measure what training computes.** Eval mode normalises with batch norm's running statistics;
  until those have seen a training batch (``num_batches_tracked == 0``: mean 0, variance 1) they
  describe a network training never computes. Such a layer normalises the probe with the probe's
  own batch statistics instead, without updating the running ones; ``used_batch_stats`` says
  whether the last probe did.
"""
from __future__ import annotations

import contextlib
import copy
import random
import weakref
from enum import Enum
from typing import Any, Callable, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils.data import DataLoader, IterableDataset

from .probing import _RUNNING_PROBE, LayerCapture, ProbeComplete, batch_inputs, eval_mode

ProbeFn = Callable[[nn.Module, Any], Any]  # (pl_module, inputs) -> output


class ProbeMode(str, Enum):
    """How a diagnostic runs the probe batch through the model in this fit (``SamplingCallback.setup_probe``)."""
    FORWARD = "forward"     # the LightningModule's forward()
    PROBE_FN = "probe_fn"   # the user's probe_fn(pl_module, inputs)
    TRAINING = "training"   # no forward(): layer outputs are captured during training steps instead

    __str__ = str.__str__
    __format__ = str.__format__


@contextlib.contextmanager
def forked_random_state(generators=()):
    """Restore on exit the global random states (torch on the CPU and every CUDA device, numpy,
    ``random``) and those of the given ``torch.Generator`` objects."""
    generators = [g for g in generators if isinstance(g, torch.Generator)]
    saved = [g.get_state() for g in generators]
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for g, state in zip(generators, saved):
            g.set_state(state)


def has_uninitialized(module: nn.Module) -> bool:
    """Whether ``module`` still has lazy parameters or buffers (``nn.LazyLinear`` before its first call)."""
    return any(is_lazy(t) for t in [*module.parameters(), *module.buffers()])


def _loader_generators(loader: DataLoader) -> list:
    found, objects = [], [loader, loader.sampler, loader.batch_sampler]
    objects += [getattr(loader.batch_sampler, "sampler", None), getattr(loader.sampler, "sampler", None)]
    for obj in objects:
        generator = getattr(obj, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def training_loader(trainer) -> Optional[DataLoader]:
    """The (first) map-style training DataLoader of the fit in progress, if any."""
    loaders = getattr(trainer, "train_dataloader", None)
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
            return loader
    return None


def gather_from_loader(loader: DataLoader, size: int) -> Optional[torch.Tensor]:
    """Up to ``size`` inputs from a separate pass over ``loader``: a copy that loads in this process
    and whose iterator is its own, under a forked random state, so training's order is untouched."""
    clone = copy.copy(loader)
    clone.num_workers, clone._iterator = 0, None
    parts, rows = [], 0
    with forked_random_state(_loader_generators(loader)):
        for batch in clone:
            x = batch_inputs(batch).detach().cpu()
            if parts and x.shape[1:] != parts[0].shape[1:]:
                break  # sequences padded per batch: keep the batches that stack
            parts.append(x[: size - rows])
            rows += parts[-1].shape[0]
            if rows >= size:
                break
    return torch.cat(parts) if parts else None


@contextlib.contextmanager
def untrained_norms_use_batch_stats(module: nn.Module):
    """Batch-norm layers whose running statistics have not seen data normalise with the batch's own
    statistics, without updating the running ones (their buffers are hidden for the duration: in
    eval mode a BatchNorm without running statistics uses the batch's). Yields the list of them."""
    hidden = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats \
                and m.running_mean is not None and m.num_batches_tracked is not None \
                and int(m.num_batches_tracked) == 0:
            hidden.append((m, m.running_mean, m.running_var))
    try:
        for m, _, _ in hidden:
            m.running_mean, m.running_var = None, None
        yield [m for m, _, _ in hidden]
    finally:
        for m, mean, var in hidden:
            m.running_mean, m.running_var = mean, var


class ProbeBatch:
    """A fixed input batch kept for the whole run and saved in checkpoints (see the module docstring).

    ``ProbeBatch(size, batch)`` holds the inputs of ``batch`` (a user's ``probe_batch=``);
    ``ProbeBatch.shared(trainer)`` is the run's shared one, drawn on first use."""

    _of_trainer: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, size: int = 256, batch=None):
        self.size = int(size)
        self.inputs: Optional[torch.Tensor] = None if batch is None else batch_inputs(batch)[: self.size].detach().cpu()
        self.source = "the probe_batch argument" if batch is not None else None
        self.used_batch_stats = False  # whether the last probe normalised with its own batch statistics
        self.members: list = []      # the callbacks sharing this probe, in the trainer's order
        self._requests: dict = {}    # member -> its size, or a function (trainer, pl_module, batch) -> size

    @classmethod
    def shared(cls, trainer) -> "ProbeBatch":
        probe = cls._of_trainer.get(trainer)
        if probe is None:
            probe = cls._of_trainer[trainer] = cls(0)
        return probe

    def join(self, trainer, member, size) -> None:
        """``member`` uses this probe and needs ``size`` samples (or a function that says how many)."""
        self._requests[member] = size
        if member not in self.members:
            self.members.append(member)
        order = {id(cb): i for i, cb in enumerate(getattr(trainer, "callbacks", []) or [])}
        self.members.sort(key=lambda cb: order.get(id(cb), len(order)))

    def leave(self, member) -> None:
        """``member`` no longer probes (its model cannot take the probe): the next member saves the inputs."""
        self._requests.pop(member, None)
        self.members = [cb for cb in self.members if cb is not member]

    def owns_state(self, member) -> bool:
        """Whether ``member`` writes the inputs into checkpoints: its own probe, or the first member."""
        return not self.members or self.members[0] is member

    def ensure(self, trainer, pl_module, batch=None) -> Optional[torch.Tensor]:
        """The inputs, drawn now if not yet (None while lazy layers are uninitialised or nothing is found)."""
        if self.inputs is not None or has_uninitialized(pl_module):
            return self.inputs
        size = max([self.size] + [want(trainer, pl_module, batch) if callable(want) else int(want)
                                  for want in self._requests.values()])
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and callable(getattr(dm, "probe_batch", None)):
            self.inputs, self.source = batch_inputs(dm.probe_batch(size))[:size].detach().cpu(), "the datamodule"
        elif (loader := training_loader(trainer)) is not None:
            self.inputs, self.source = gather_from_loader(loader, size), "a separate pass over the training data"
        if self.inputs is None and batch is not None:
            self.inputs, self.source = batch_inputs(batch)[:size].detach().cpu(), "the first training batch"
        if self.inputs is None:
            return None
        self.size = size
        route = {ProbeMode.PROBE_FN: "probe_fn(pl_module, inputs)"}
        users = ", ".join(f"{type(cb).__name__} through "
                          f"{route.get(getattr(cb, 'probe_mode', None), f'{type(pl_module).__name__}.forward()')}"
                          for cb in self.members) or "a diagnostic"
        rank_zero_info(f"deepplain: probe batch of {self.inputs.shape[0]} samples from {self.source}, "
                       f"used by {users}")
        return self.inputs

    def run(self, trainer, pl_module, capture: LayerCapture, probe_fn: Optional[ProbeFn] = None,
            rows: Optional[int] = None) -> dict:
        """Forward the inputs (the first ``rows`` of them, if given) through ``pl_module`` (or
        ``probe_fn(pl_module, inputs)``) under ``capture``: eval mode, no gradients, the run's precision, a
        forked random state, and torch's fused transformer fast path off (it would skip the attention
        modules' hooks)."""
        x = (self.inputs if rows is None else self.inputs[:rows]).to(pl_module.device)
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)
        if dtype is not None and x.is_floating_point() and dtype == torch.float64:
            x = x.to(dtype)  # a 64-bit run; autocast handles the mixed-precision ones
        fastpath = torch.backends.mha.get_fastpath_enabled()
        _RUNNING_PROBE.append(capture)
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            with forked_random_state(), eval_mode(pl_module), untrained_norms_use_batch_stats(pl_module) as used, \
                    trainer.precision_plugin.forward_context(), capture:
                self.used_batch_stats = bool(used)
                try:
                    probe_fn(pl_module, x) if probe_fn is not None else pl_module(x)
                except ProbeComplete:  # the capture has every layer it waits for (a rotating sample)
                    pass
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            _RUNNING_PROBE.pop()
        return capture.results

    def state_dict(self, member=None) -> dict:
        if member is not None and not self.owns_state(member):
            return {"shared": True}  # the first member saves the inputs; one copy per checkpoint
        return {"inputs": self.inputs}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict) and state.get("inputs") is not None:
            self.inputs = state["inputs"]
            self.size = int(self.inputs.shape[0])
