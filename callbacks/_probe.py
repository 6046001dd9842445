"""Capturing layer outputs with forward hooks that exist only while a sample is taken."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def batch_inputs(batch):
    """The model input of a batch: the tensor itself, the first item of a tuple/list, or ``x``/``input``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise TypeError("cannot find the input tensor in the batch; pass probe_batch= to the callback")


_RUNNING_PROBE = []  # the capture of the probe forward in progress, if any


class LayerCapture:
    """Attach forward hooks to ``layers`` on enter, remove them on exit.

    ``reduce(name, output)`` is called for each output inside the hook, so only small summaries
    outlive the forward pass. A module called twice in one forward (a shared ReLU) gets
    ``name#2``, ``name#3``, ... Results keep the order in which layers fired (the depth order).
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], reduce):
        self.layers, self.reduce = layers, reduce
        self.results: dict[str, object] = {}
        self._handles = []

    def _hook(self, name):
        def hook(module, inputs, output):
            # A probe forward run by one callback must not be seen by another callback's capture.
            if not isinstance(output, torch.Tensor) or (_RUNNING_PROBE and _RUNNING_PROBE[-1] is not self):
                return
            key, k = name, 1
            while key in self.results:
                k += 1
                key = f"{name}#{k}"
            self.results[key] = self.reduce(key, output.detach())
        return hook

    def __enter__(self):
        self.results = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Eval mode (no batch-norm statistic updates, no dropout) and no grad, restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


class ProbeBatch:
    """A fixed input batch kept for the whole run and saved in checkpoints.

    Taken from ``datamodule.probe_batch(size)`` when the datamodule has one, else from the first
    validation batch, else from the first training batch.
    """

    def __init__(self, size: int = 256, batch: torch.Tensor | None = None):
        self.size = size
        self.inputs = None if batch is None else batch_inputs(batch)[:size].detach().cpu()

    def ensure(self, trainer, fallback_batch=None) -> torch.Tensor | None:
        if self.inputs is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is not None and callable(getattr(dm, "probe_batch", None)):
                self.inputs = batch_inputs(dm.probe_batch(self.size))[: self.size].detach().cpu()
            elif fallback_batch is not None:
                self.inputs = batch_inputs(fallback_batch)[: self.size].detach().cpu()
        return self.inputs

    def run(self, trainer, pl_module, capture: LayerCapture) -> dict:
        x = self.inputs.to(pl_module.device)
        _RUNNING_PROBE.append(capture)
        try:
            with eval_mode(pl_module), trainer.precision_plugin.forward_context(), capture:
                pl_module(x)
        finally:
            _RUNNING_PROBE.pop()
        return capture.results

    def state_dict(self) -> dict:
        return {"inputs": self.inputs}

    def load_state_dict(self, state: dict) -> None:
        if state.get("inputs") is not None:
            self.inputs = state["inputs"]
