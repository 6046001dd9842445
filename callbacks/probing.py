"""Finding layers and looking at their outputs: the public probing toolkit of ``deepplain.callbacks``.

Everything here works on any ``nn.Module`` (a LightningModule included) and knows nothing of
deepplain's own models:

* module selection: :func:`select_modules`, :func:`hidden_layers`, :func:`weight_layers`,
  :func:`gradient_layers`, :func:`classifier_name`, :func:`skip_gates` (the VAN gate protocol, by
  duck typing), :func:`check_selection` (one clear error at setup when nothing matches);
* :class:`LayerCapture`: forward hooks that exist only while a sample is taken; what it reads from
  each module's output is the table in ``deepplain.callbacks.layer_outputs``;
* :func:`eval_mode`, :func:`batch_inputs`, :func:`has_forward`; the probe batch itself lives in
  ``deepplain.callbacks.probe_batch``.

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

import lightning as L
import torch
from torch import nn

from .layer_outputs import RECURRENT_TYPES, WATCHED_TYPES, reader_for, units_on_dim1

WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Layers whose gradients GradientFlowMonitor reads: the weight layers, and recurrent and attention
# layers, whose weights are several parameters (weight_ih_l0, weight_hh_l0, ...; in_proj_weight).
GRADIENT_TYPES = WEIGHT_TYPES + RECURRENT_TYPES + (nn.MultiheadAttention, nn.Embedding)


def glob_list(name: str, patterns) -> Optional[list[str]]:
    """``include``/``exclude`` as a list of glob patterns (None stays None); a bare string is refused,
    since iterating it would make one pattern of each character (``"*"`` would match every layer)."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a list of glob patterns (e.g. ['model.features.*']), got {patterns!r}")
    return list(patterns) or None


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
    """Layers whose outputs are hidden representations: the modules of
    ``layer_outputs.WATCHED_TYPES`` (activations, recurrent layers and their cells, attention and
    transformer layers, and any type registered with ``watch=True``) when the model has any, else
    every Linear/Conv except the last Linear (the classifier)."""
    layers = select_modules(root, tuple(WATCHED_TYPES), include, exclude)
    if layers:
        return layers
    return weight_layers(root, include, exclude, skip_classifier=True)


def gradient_layers(root: nn.Module, include=None, exclude=None) -> list[tuple[str, nn.Module]]:
    """Layers whose weight gradients are read: Linear/Conv, recurrent, attention and embedding layers."""
    return select_modules(root, GRADIENT_TYPES, include, exclude)


def layer_gradient_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The gradients of a layer's own weights: ``weight`` where it has one, else every parameter of
    its own whose name has "weight" in it (an LSTM's ``weight_ih_l0``, ``weight_hh_l0``, ...)."""
    own = dict(module.named_parameters(recurse=False))
    names = ["weight"] if "weight" in own else [n for n in own if "weight" in n]
    grads = [own[n].grad for n in names if own[n].grad is not None]
    return [g.to_dense() if g.is_sparse else g for g in grads]  # nn.Embedding(sparse=True)


def check_selection(owner: str, root: nn.Module, layers: list, include, exclude, what: str) -> None:
    """One clear error at setup, naming what the model has, when a callback found nothing to watch."""
    if layers:
        return
    if include:
        candidates = [n for n, m in root.named_modules() if n and not list(m.children())]
        shown = ", ".join(candidates[:12]) + (f" and {len(candidates) - 12} more" if len(candidates) > 12 else "")
        raise ValueError(f"{owner}: include={include} (exclude={exclude}) matches no {what} in "
                         f"{type(root).__name__}; its layers are: {shown or 'none'}")
    raise ValueError(f"{owner} found no {what} in {type(root).__name__} (include={include}, exclude={exclude})")


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


class ProbeComplete(Exception):
    """Raised inside a probe forward once every layer its capture waits for has fired
    (``LayerCapture(stop_after=...)``): the rest of the forward is not needed. Caught by the probe."""


class LayerCapture:
    """Attach forward hooks to ``layers`` on enter, remove them on exit.

    ``reduce(name, output)`` is called for each output inside the hook, so only small summaries
    outlive the forward pass. ``output`` is the floating-point tensor the module's reader picks
    (``deepplain.callbacks.layer_outputs``: an LSTM's output sequence, MultiheadAttention's
    attention output), detached, as a view with its units on dimension 1; ``unit_dims`` (from
    ``layer_outputs.unit_dims(root)``) says where element-wise modules keep their units. A module
    called twice in one forward (a shared ReLU) gets ``name#2``, ``name#3``, ... Results keep the
    order in which layers fired (the depth order). A probe forward run by one capture (see
    ``deepplain.callbacks.probe_batch``) is invisible to the others.
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], reduce: Callable[[str, torch.Tensor], object],
                 unit_dims: Optional[dict] = None, stop_after: Optional[Iterable[str]] = None):
        self.layers, self.reduce = list(layers), reduce
        self.unit_dims = unit_dims
        self.stop_after = None if stop_after is None else set(stop_after)
        self._waiting: Optional[set] = None
        self.results: dict[str, object] = {}
        self._handles = []

    def _hook(self, name, module):
        reader = reader_for(module)
        unit_dim = self.unit_dims.get(module, reader.unit_dim) if self.unit_dims is not None else reader.unit_dim

        def hook(module, inputs, output):
            if _RUNNING_PROBE and _RUNNING_PROBE[-1] is not self:
                return
            tensor = reader.read(module, output)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
                return
            key, k = name, 1
            while key in self.results:
                k += 1
                key = f"{name}#{k}"
            self.results[key] = self.reduce(key, units_on_dim1(tensor.detach(), unit_dim))
            if self._waiting is not None and _RUNNING_PROBE and _RUNNING_PROBE[-1] is self:
                self._waiting.discard(name)
                if not self._waiting:  # a probe that needs no deeper layer stops here
                    raise ProbeComplete
        return hook

    def __enter__(self) -> "LayerCapture":
        self.results = {}
        self._waiting = None if self.stop_after is None else set(self.stop_after)
        self._handles = [m.register_forward_hook(self._hook(n, m)) for n, m in self.layers]
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
