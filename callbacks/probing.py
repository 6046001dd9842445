"""Finding layers and looking at their outputs: the public probing toolkit of ``deepplain.callbacks``.

Everything here works on any ``nn.Module`` (a LightningModule included) and knows nothing of
deepplain's own models:

* module selection: :func:`select_modules`, :func:`hidden_layers`, :func:`weight_layers`,
  :func:`classifier_name`, :func:`skip_gates` (the VAN gate protocol, by duck typing);
* :class:`LayerCapture`: forward hooks that exist only while a sample is taken;
* :func:`eval_mode`, :func:`batch_inputs` and :class:`ProbeBatch`, a fixed input batch kept
  for a whole run and saved in checkpoints.

Example::

    import torch
    from torch import nn
    from deepplain.callbacks.probing import LayerCapture, eval_mode, hidden_layers

    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with eval_mode(net), LayerCapture(hidden_layers(net), lambda name, out: out.abs().mean()) as capture:
        net(torch.randn(4, 8))
    assert list(capture.results) == ["1", "3"]
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                    nn.Softplus, nn.Mish, nn.ReLU6, nn.Hardtanh, nn.CELU, nn.RReLU)
WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_modules(root: nn.Module, types, include: Optional[Iterable[str]] = None,
                   exclude: Optional[Iterable[str]] = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule of one of ``types`` whose name matches an ``include``
    glob (all when None) and no ``exclude`` glob, in registration order."""
    include = list(include) if include else None
    exclude = list(exclude or [])
    out = []
    for name, module in root.named_modules():
        if not name or not isinstance(module, types):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        out.append((name, module))
    return out


def hidden_layers(root: nn.Module, include=None, exclude=None) -> list[tuple[str, nn.Module]]:
    """Layers whose outputs are hidden representations: activation modules when the model has
    any, else every Linear/Conv except the last Linear (the classifier)."""
    layers = select_modules(root, ACTIVATION_TYPES, include, exclude)
    if layers:
        return layers
    return weight_layers(root, include, exclude, skip_classifier=True)


def weight_layers(root: nn.Module, include=None, exclude=None, skip_classifier: bool = False):
    """Every Linear/Conv layer (optionally without the classifier), in registration order."""
    layers = select_modules(root, WEIGHT_TYPES, include, exclude)
    if skip_classifier:
        head = classifier_name(root)
        layers = [(n, m) for n, m in layers if n != head]
    return layers


def classifier_name(root: nn.Module) -> Optional[str]:
    """The name of the last Linear layer registered in the model: by convention its classifier."""
    names = [name for name, m in root.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer applies: ``module.effective_weight()`` for reparameterised layers
    (DiracNet's Dirac layers), else ``module.weight``."""
    effective = getattr(module, "effective_weight", None)
    return effective() if callable(effective) else module.weight


def skip_gates(root: nn.Module, include=None, exclude=None) -> list[tuple[str, nn.Module]]:
    """Every VAN skip gate: a module with a parameter ``alpha`` and a tensor attribute (buffer)
    ``lagrange_lambda`` of the same shape. This is the whole protocol; no base class is needed."""
    gates = []
    for name, module in root.named_modules():
        alpha, lam = getattr(module, "alpha", None), getattr(module, "lagrange_lambda", None)
        if isinstance(alpha, nn.Parameter) and isinstance(lam, torch.Tensor) and lam.shape == alpha.shape:
            if include and not _matches(name, include):
                continue
            if exclude and _matches(name, exclude):
                continue
            gates.append((name, module))
    return gates


def has_forward(module: nn.Module) -> bool:
    """Whether ``module(x)`` runs: a LightningModule need not define ``forward``."""
    import lightning as L
    return type(module).forward is not L.LightningModule.forward and type(module).forward is not nn.Module.forward


def batch_inputs(batch) -> torch.Tensor:
    """The model input of a batch: the tensor itself, the first item of a tuple/list, or ``x``/``input``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise TypeError("cannot find the input tensor in the batch (a tensor, a tuple whose first item is one, or a "
                    "dict with key x/input/inputs/image/images); pass probe_batch= to the callback")


_RUNNING_PROBE: list = []  # the capture of the probe forward in progress, if any


class LayerCapture:
    """Attach forward hooks to ``layers`` on enter, remove them on exit.

    ``reduce(name, output)`` is called for each output inside the hook, so only small summaries
    outlive the forward pass. A module called twice in one forward (a shared ReLU) gets
    ``name#2``, ``name#3``, ... Results keep the order in which layers fired (the depth order).
    A probe forward run by one capture (see :class:`ProbeBatch`) is invisible to the others.
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], reduce: Callable[[str, torch.Tensor], object]):
        self.layers, self.reduce = list(layers), reduce
        self.results: dict[str, object] = {}
        self._handles = []

    def _hook(self, name):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or (_RUNNING_PROBE and _RUNNING_PROBE[-1] is not self):
                return
            key, k = name, 1
            while key in self.results:
                k += 1
                key = f"{name}#{k}"
            self.results[key] = self.reduce(key, output.detach())
        return hook

    def __enter__(self) -> "LayerCapture":
        self.results = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers]
        return self

    def __exit__(self, *exc) -> bool:
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

    Taken from ``datamodule.probe_batch(size)`` when the trainer's datamodule has one, else from
    the first training batch the callback sees (``fallback_batch``).
    """

    def __init__(self, size: int = 256, batch=None):
        self.size = int(size)
        self.inputs: Optional[torch.Tensor] = None if batch is None else batch_inputs(batch)[: self.size].detach().cpu()

    def ensure(self, trainer, fallback_batch=None) -> Optional[torch.Tensor]:
        if self.inputs is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is not None and callable(getattr(dm, "probe_batch", None)):
                self.inputs = batch_inputs(dm.probe_batch(self.size))[: self.size].detach().cpu()
            elif fallback_batch is not None:
                self.inputs = batch_inputs(fallback_batch)[: self.size].detach().cpu()
        return self.inputs

    def run(self, trainer, pl_module, capture: LayerCapture) -> dict:
        """Forward the probe batch through ``pl_module`` in eval mode under ``capture``."""
        x = self.inputs.to(pl_module.device)
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)
        if dtype is not None and x.is_floating_point() and dtype == torch.float64:
            x = x.to(dtype)  # a 64-bit run; autocast handles the mixed-precision ones
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
