"""Batched, on-device augmentation: one kernel per batch instead of one PIL call per image."""
from __future__ import annotations

import torch


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by ``padding``, and random horizontal flip, per image.

    Same distribution as torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()``
    (zero padding is applied to pixel values in [0, 1], before normalisation).
    """
    n, c, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    rows = top[:, None] + torch.arange(h, device=device)[None, :]                      # n x h
    cols = left[:, None] + torch.arange(w, device=device)[None, :]                     # n x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]        # n x h x w x c
    return out.permute(0, 3, 1, 2).contiguous()
