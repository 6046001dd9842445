"""Optimizers and learning-rate schedules for the classifier module."""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("multistep", "cosine", "none")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and filters only.

    Every 1-D parameter is exempt: biases, norm scales and shifts, PReLU slopes, and the methods'
    own scales (VAN ``alpha``, Dirac ``a`` and ``b``), which the papers leave unregularised.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float, nesterov: bool,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    groups = parameter_groups(model, weight_decay)
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ConfigError("nesterov needs a positive momentum")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    return torch.optim.Adam(groups, lr=lr)


def resolve_milestones(milestones, epochs: int) -> list[int]:
    """Milestones below 1 are fractions of ``epochs``; the rest are epoch numbers."""
    out = []
    for m in milestones:
        m = float(m)
        if m <= 0:
            raise ConfigError(f"milestones must be positive (fractions < 1 or epochs), got {m:g}")
        out.append(max(1, int(round(m * epochs))) if m < 1 else int(m))
    return sorted(set(out))


def lr_factor(name: str, epoch: int, epochs: int, milestones, gamma: float) -> float:
    """The learning rate of ``epoch`` as a multiple of the initial one, in closed form."""
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(1, epochs)))
    if name == "multistep":
        return gamma ** sum(epoch >= m for m in resolve_milestones(milestones, epochs))
    return 1.0


def make_scheduler(optimizer, name: str, epochs, milestones, gamma: float):
    """A per-epoch schedule, or None for ``"none"``.

    ``epochs`` is a number or a callable returning the run's current number of epochs: the rate is
    recomputed from it at every epoch, so a run resumed with a different ``--epochs`` follows the
    schedule of its new length (a cosine never rises again, fractional milestones move).
    """
    if name not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    if name == "none":
        return None
    total = epochs if callable(epochs) else (lambda: epochs)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(name, epoch, max(1, int(total())), milestones, gamma))
