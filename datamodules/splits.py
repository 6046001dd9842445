"""Seeded, stratified index splits."""
from __future__ import annotations

from enum import Enum

import torch

MAX_VAL_SPLIT = 0.9  # the largest share of a training split that may be held out for validation


class ValidationSource(str, Enum):
    """Where a datamodule's validation batches come from (``datamodule.validation_source``)."""
    HELD_OUT = "train split (held out)"
    TEST = "test set"
    VAL_FOLDER = "val/ folder"

    __str__ = str.__str__
    __format__ = str.__format__


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, held_out) with ``round(fraction * n_c)`` of each class held out."""
    generator = torch.Generator().manual_seed(int(seed))
    kept, held = [], []
    for cls in torch.unique(labels, sorted=True):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        k = int(round(fraction * idx.numel()))
        held.append(idx[:k])
        kept.append(idx[k:])
    return torch.sort(torch.cat(kept)).values, torch.sort(torch.cat(held)).values
