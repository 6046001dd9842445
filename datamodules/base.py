"""The whole-tensor data path shared by every in-memory dataset.

A dataset is decoded once into a uint8 tensor (N x C x H x W) and labels. Batches are cut from
it by index, converted, augmented and normalised as whole tensors -- on the GPU when training
runs there, where the uint8 data is copied once -- instead of one PIL image at a time.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch

from deepplain.errors import ConfigError, DatasetError

from .augment import random_crop_flip
from .paths import candidate_roots
from .splits import stratified_split

log = logging.getLogger("deepplain.data")


def _check_args(batch_size, val_split, seed):
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if not (0.0 <= float(val_split) < 1.0):
        raise ConfigError(f"val_split must be in [0, 1) (0 validates on the test set), got {val_split!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")


class TensorBatchLoader:
    """An iterable of ``(images, labels)`` batches cut from in-memory tensors.

    Shuffling and augmentation are seeded by ``(seed, epoch, batch index, rank)``, so a resumed
    run sees the same batches as an uninterrupted one. Under DDP every rank takes its own shard
    of one shared permutation (padded like ``DistributedSampler``).
    """

    def __init__(self, datamodule: "TensorDataModule", split: str, batch_size: int, train: bool):
        self.dm, self.split = datamodule, split
        self.batch_size, self.train = batch_size, train
        self.num_samples = int(datamodule._splits[split][1].numel())

    def _trainer_state(self):
        trainer = self.dm.trainer
        if trainer is None:  # iterated outside a Trainer
            return 0, 1, 0, torch.device("cpu")
        return trainer.global_rank, trainer.world_size, trainer.current_epoch, trainer.strategy.root_device

    def _indices(self, rank: int, world: int, epoch: int) -> torch.Tensor:
        n = self.num_samples
        if self.train:
            generator = torch.Generator().manual_seed(self.dm.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if world > 1:
            total = -(-n // world) * world
            order = torch.cat([order, order[: total - n]])[rank::world]
        return order

    def __len__(self) -> int:
        _, world, _, _ = self._trainer_state()
        per_rank = -(-self.num_samples // world)
        return -(-per_rank // self.batch_size)

    def __iter__(self):
        rank, world, epoch, device = self._trainer_state()
        images, labels = self.dm.tensors_on(self.split, device)
        augment = self.dm.augment_fn if self.train else None
        mean, std = self.dm.mean.to(images.device), self.dm.std.to(images.device)
        order = self._indices(rank, world, epoch).to(images.device)
        for batch_index, start in enumerate(range(0, order.numel(), self.batch_size)):
            idx = order[start: start + self.batch_size]
            x = images[idx].float().div_(255)
            if augment is not None:
                seed = ((self.dm.seed * 1_000_003 + epoch) * 1_000_003 + batch_index) * 1_009 + rank
                generator = torch.Generator(device=x.device).manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
                x = augment(x, generator)
            yield (x - mean) / std, labels[idx]


class TensorDataModule(L.LightningDataModule):
    """Base class: subclasses say which files they need and how to decode them."""

    name = "dataset"
    files: list[list[str]] = []  # per required file: alternative paths relative to the data root
    how_to_get = ""

    def __init__(self, data_dir: str | os.PathLike | None = None, batch_size: int = 128, val_split: float = 0.1,
                 seed: int = 0, download: bool = False, num_workers: int = 0, eval_batch_size: int | None = None,
                 augment: bool = True, verify_checksums: bool = True):
        super().__init__()
        _check_args(batch_size, val_split, seed)
        self.data_dir, self.batch_size, self.val_split = data_dir, batch_size, float(val_split)
        self.seed, self.download, self.num_workers = seed, download, num_workers  # workers unused: no per-image work
        self.eval_batch_size = eval_batch_size or max(batch_size, 256)
        self.use_augmentation = augment
        self.verify_checksums = verify_checksums  # md5 against torchvision's published values, where it has them
        self.input_shape = self.num_classes = self.split_sizes = None
        self.validation_source = None
        self._splits = None
        self._device_cache = {}

    # -- what subclasses provide ------------------------------------------------------------
    def decode(self, root: Path) -> dict:
        """Return ``{"train": (uint8 NCHW, int64 labels), "test": (...)}`` read from ``root``."""
        raise NotImplementedError

    def fetch(self, root: Path) -> None:
        """Download the dataset into ``root`` (torchvision's download where it has one)."""
        raise DatasetError(f"{self.name} cannot be downloaded automatically; {self.how_to_get}")

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training augmentation of a float batch in [0, 1]; none unless a subclass overrides it."""
        return x

    def has_files(self, root: Path) -> bool:
        return all(any((root / rel).is_file() for rel in alternatives) for alternatives in self.files)

    # -- finding the data ---------------------------------------------------------------------
    def find_root(self) -> Path:
        roots = candidate_roots(self.data_dir)
        for root in roots:
            if self.has_files(root):
                return root
        if self.download:
            target = roots[0]
            try:
                self.fetch(target)
            except DatasetError:
                raise
            except Exception as exc:  # network errors come in many types; report them in one line
                raise DatasetError(f"{self.name}: download into {target} failed ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                                   f"{self._not_found_hint(roots)}") from None
            if self.has_files(target):
                return target
        raise DatasetError(f"{self.name} not found: {self._not_found_hint(roots)}")

    def _not_found_hint(self, roots) -> str:
        expected = ", ".join(" or ".join(alts) for alts in self.files)
        searched = ", ".join(str(r) for r in roots)
        return (f"searched {searched} (from --data-dir, then $DEEPPLAIN_DATA, then ./data); expected {expected}; "
                f"{self.how_to_get or 'pass --download to fetch it'}")

    # -- Lightning hooks ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download:
            self.find_root()  # downloads once, on the main process of each node

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        data = self.decode(self.find_root())
        train_x, train_y = data["train"]
        test_x, test_y = data["test"]
        self.mean, self.std = channel_stats(train_x)
        if self.val_split > 0:
            keep, held = stratified_split(train_y, self.val_split, self.seed)
            val = (train_x[held], train_y[held])
            train = (train_x[keep], train_y[keep])
            self.validation_source = "train split (held out)"
        else:
            train, val = (train_x, train_y), (test_x, test_y)
            self.validation_source = "test set"
            log.warning("%s: val_split=0, so validation metrics are measured on the TEST set", self.name)
        self._splits = {"train": train, "val": val, "test": (test_x, test_y)}
        self.input_shape = tuple(train_x.shape[1:])
        self.num_classes = int(max(int(train_y.max()), int(test_y.max())) + 1)
        self.split_sizes = {k: int(v[1].numel()) for k, v in self._splits.items()}

    @property
    def augment_fn(self):
        """The training augmentation, or None when the dataset has none or it is switched off."""
        if not self.use_augmentation or type(self).augment is TensorDataModule.augment:
            return None
        return self.augment

    def _loader(self, split: str, train: bool) -> TensorBatchLoader:
        if self._splits is None:
            self.setup()
        return TensorBatchLoader(self, split, self.batch_size if train else self.eval_batch_size, train)

    def tensors_on(self, split: str, device: torch.device):
        if device.type == "cpu":
            return self._splits[split]
        key = (split, str(device))
        if key not in self._device_cache:
            x, y = self._splits[split]
            self._device_cache[key] = (x.to(device), y.to(device))
        return self._device_cache[key]

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def predict_dataloader(self):
        return self._loader("test", False)

    def probe_batch(self, size: int = 256, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed, normalised batch (the first ``size`` samples of ``split``), for diagnostics."""
        if self._splits is None:
            self.setup()
        x, y = self._splits[split]
        x = x[:size].float().div(255)
        return (x - self.mean.cpu()) / self.std.cpu(), y[:size]


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], shaped (1, C, 1, 1)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.float().view(1, c, 1, 1), std.float().view(1, c, 1, 1)


class CropFlipMixin:
    """CIFAR-style training augmentation: random crop with 4-pixel padding and horizontal flip."""

    crop_padding = 4

    def augment(self, x, generator):
        return random_crop_flip(x, self.crop_padding, generator)
