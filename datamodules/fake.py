"""Seeded synthetic images for smoke tests and throughput benchmarks: no files needed.

Each class has a random template; an image is its class template blended with noise, so a
network can learn the task (smoke tests can check that the loss falls).
"""
from __future__ import annotations

from pathlib import Path

import torch

from deepplain.errors import ConfigError

from .base import CropFlipMixin, DatasetInfo, TensorDataModule


class FakeDataModule(CropFlipMixin, TensorDataModule):
    name = "fake"

    def __init__(self, *args, input_shape=(3, 32, 32), num_classes: int = 10, train_size: int = 2000,
                 test_size: int = 500, augment: bool = False, **kwargs):
        super().__init__(*args, augment=augment, **kwargs)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ConfigError(f"fake input_shape must be C x H x W with positive sizes, got {input_shape}")
        if num_classes < 2 or train_size < num_classes or test_size < 1:
            raise ConfigError(f"fake data needs num_classes >= 2 and train_size >= num_classes, got {num_classes}, "
                              f"{train_size}")
        self.fake_shape, self.fake_classes = tuple(int(s) for s in input_shape), int(num_classes)
        self.train_size, self.test_size = int(train_size), int(test_size)

    def info(self) -> DatasetInfo:
        return DatasetInfo(self.fake_shape, self.fake_classes, self.train_size, self.test_size)

    def find_root(self) -> Path:
        return Path(".")

    def decode(self, root: Path) -> dict:
        generator = torch.Generator().manual_seed(self.seed)
        templates = torch.rand((self.fake_classes,) + self.fake_shape, generator=generator)

        def make(n):
            labels = torch.arange(n) % self.fake_classes
            labels = labels[torch.randperm(n, generator=generator)]
            noise = torch.rand((n,) + self.fake_shape, generator=generator)
            images = (0.6 * templates[labels] + 0.4 * noise) * 255
            return images.round().to(torch.uint8), labels

        return {"train": make(self.train_size), "test": make(self.test_size)}
