"""How a module's output is read: which tensor is watched, and where its units are.

The diagnostics see every layer's output as a tensor with its **units on dimension 1**: a Linear
output ``(batch, units)`` as it is, a conv output ``(batch, channels, ...)`` as it is, and a
sequence output ``(batch, time, channels)`` or ``(time, batch, channels)`` as a view with the
channels moved to dimension 1, so that it has C units and one row per token whatever the
batch/time order. What that needs per module type is one entry of :data:`OUTPUT_READERS`:

* ``read(module, output)`` picks the tensor to watch from what ``forward`` returned (the first item
  of an LSTM's ``(output, (h, c))``, the ``data`` of a ``PackedSequence``, the attention output of
  ``MultiheadAttention``'s ``(output, weights)``), or returns None to skip that call;
* ``unit_dim`` says where that tensor keeps its units (-1 for Linear, recurrent, attention,
  embeddings, LayerNorm; 1 for conv and batch norm), or None for element-wise modules
  (activations, dropout): they keep the layout of the layer before them, in registration order,
  so a GELU in a transformer's MLP has its units last and a ReLU after a Conv1d has them first.

Types are matched along the class hierarchy, so a subclass of ``nn.Linear`` is read as a Linear.
Add your own type with :func:`register_output_reader`::

    from torch import nn
    from deepplain.callbacks.layer_outputs import register_output_reader

    class MyMixer(nn.Module):           # returns {"tokens": (B, T, C), "aux": ...}
        def forward(self, x):
            return {"tokens": x, "aux": None}

    register_output_reader(MyMixer, read=lambda module, out: out["tokens"], unit_dim=-1, watch=True)

``watch=True`` also makes the type one the diagnostics watch by default (see
``deepplain.callbacks.probing.hidden_layers``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                    nn.Softplus, nn.Mish, nn.ReLU6, nn.Hardtanh, nn.CELU, nn.RReLU, nn.Hardswish, nn.Hardsigmoid,
                    nn.GLU, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
RECURRENT_TYPES = (nn.RNNBase, nn.RNNCellBase)  # RNN, LSTM, GRU and their cells
ATTENTION_TYPES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def first_tensor(module: nn.Module, output: Any) -> Optional[torch.Tensor]:
    """The output itself, a PackedSequence's data, or the first item of a tuple or list (recursively):
    an RNN's ``(output, h_n)``, an LSTM's ``(output, (h_n, c_n))``, an LSTMCell's ``(h, c)``,
    MultiheadAttention's ``(output, weights)``. None for anything else (a dict: register a reader)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, PackedSequence):
        return output.data  # (tokens, channels): one row per token of every sequence
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(module, output[0])
    return None


@dataclass(frozen=True)
class OutputReader:
    """What to watch in a module type's output (``read``) and where its units are (``unit_dim``;
    None: where the layer before it has them)."""
    read: Callable[[nn.Module, Any], Optional[torch.Tensor]] = first_tensor
    unit_dim: Optional[int] = None


OUTPUT_READERS: dict[type, OutputReader] = {
    nn.Module: OutputReader(),  # any other module: element-wise, like an activation
    nn.Linear: OutputReader(unit_dim=-1),
    nn.Bilinear: OutputReader(unit_dim=-1),
    nn.LayerNorm: OutputReader(unit_dim=-1),
    nn.GroupNorm: OutputReader(unit_dim=1),
    nn.modules.batchnorm._NormBase: OutputReader(unit_dim=1),  # BatchNorm*d, InstanceNorm*d, SyncBatchNorm
    nn.modules.conv._ConvNd: OutputReader(unit_dim=1),
    nn.Embedding: OutputReader(unit_dim=-1),
    nn.EmbeddingBag: OutputReader(unit_dim=-1),
    nn.RNNBase: OutputReader(unit_dim=-1),
    nn.RNNCellBase: OutputReader(unit_dim=-1),
    nn.MultiheadAttention: OutputReader(unit_dim=-1),
    nn.TransformerEncoderLayer: OutputReader(unit_dim=-1),
    nn.TransformerDecoderLayer: OutputReader(unit_dim=-1),
}
if hasattr(nn, "RMSNorm"):
    OUTPUT_READERS[nn.RMSNorm] = OutputReader(unit_dim=-1)

#: The module types the diagnostics watch by default: their outputs are the hidden representations.
#: Recurrent and attention layers are here because their activations are functional (no module to hook).
WATCHED_TYPES: list[type] = [*ACTIVATION_TYPES, *RECURRENT_TYPES, *ATTENTION_TYPES]


def register_output_reader(module_type: type, read: Callable[[nn.Module, Any], Optional[torch.Tensor]] = first_tensor,
                           unit_dim: Optional[int] = None, watch: bool = False) -> None:
    """Tell the diagnostics how to read ``module_type``'s output (see the module docstring);
    ``watch=True`` adds the type to those watched by default."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(read):
        raise TypeError(f"read must be callable as read(module, output), got {read!r}")
    if unit_dim is not None and (isinstance(unit_dim, bool) or not isinstance(unit_dim, int)):
        raise TypeError(f"unit_dim must be an integer or None, got {unit_dim!r}")
    OUTPUT_READERS[module_type] = OutputReader(read, unit_dim)
    if watch and module_type not in WATCHED_TYPES:
        WATCHED_TYPES.append(module_type)


def reader_for(module: nn.Module) -> OutputReader:
    """The entry of the most specific registered class of ``module``."""
    for cls in type(module).__mro__:
        if cls in OUTPUT_READERS:
            return OUTPUT_READERS[cls]
    return OUTPUT_READERS[nn.Module]


def unit_dims(root: nn.Module) -> dict[nn.Module, Optional[int]]:
    """Where each module's output keeps its units: its reader's ``unit_dim``, or for element-wise
    modules that of the last module before it (registration order) that has one; None when no
    module before it has one."""
    layout: dict[nn.Module, Optional[int]] = {}
    current: Optional[int] = None
    for _, module in root.named_modules():
        own = reader_for(module).unit_dim
        if own is not None:
            current = own
        layout[module] = current
    return layout


def units_on_dim1(tensor: torch.Tensor, unit_dim: Optional[int]) -> torch.Tensor:
    """``tensor`` as a view with its units on dimension 1 (see the module docstring).

    ``unit_dim`` None (layout unknown): images and volumes (4-D and up) keep channels on dim 1 and
    sequences (3-D) have them last, the conventions of torch's conv and Linear layers."""
    if tensor.dim() <= 2:
        return tensor  # (batch, units), or a 1-D vector of units
    if unit_dim is None:
        unit_dim = 1 if tensor.dim() >= 4 else -1
    return tensor.movedim(unit_dim, 1) if unit_dim % tensor.dim() != 1 else tensor
