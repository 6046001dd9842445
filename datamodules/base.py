"""The whole-tensor data path shared by every in-memory dataset.

A dataset is decoded once into a uint8 tensor (N x C x H x W) and labels. Batches are cut from
it by index, converted, augmented and normalised as whole tensors -- on the GPU when training
runs there, where the uint8 data is copied once -- instead of one PIL image at a time.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from deepplain.errors import ConfigError, DatasetError

from .augment import random_crop_flip
from .paths import candidate_roots, describe_roots
from .splits import MAX_VAL_SPLIT, ValidationSource, stratified_split

log = logging.getLogger("deepplain.data")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, known before any file is read: used to check flags, estimate memory
    and check the decoded files (counts, label range)."""

    input_shape: tuple
    num_classes: int
    train_size: Optional[int] = None  # the whole training split, before a validation share is held out
    test_size: Optional[int] = None


def _check_args(batch_size, val_split, seed):
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if not (0.0 <= float(val_split) <= MAX_VAL_SPLIT):
        raise ConfigError(f"val_split must be in [0, {MAX_VAL_SPLIT:g}] (0 validates on the test set), "
                          f"got {val_split!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")


def note_single_sample_batch(name: str, samples: int, batch_size: int) -> bool:
    """Say once that the training split leaves a last batch of one sample, which is left out of each epoch."""
    if samples > 1 and samples % batch_size == 1:
        log.warning("%s: %d training samples at batch size %d leave a last batch of 1 sample, which batch norm cannot "
                    "normalise; it is left out of each epoch", name, samples, batch_size)
        return True
    return False


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
        self._resume: Optional[tuple[int, int]] = None  # (epoch, batches already trained) from a checkpoint

    # Lightning saves and restores these with every checkpoint (the loader is "stateful"), so a run
    # stopped in the middle of an epoch continues with the very next batch. The position is the
    # trainer's count of processed batches, not the batches this loader handed out: Lightning
    # fetches one batch ahead.
    def state_dict(self) -> dict:
        trainer = self.dm.trainer
        if trainer is None or not self.train:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": int(trainer.current_epoch), "batches_done": int(progress.processed)}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("epoch") is not None:
            self._resume = (int(state_dict["epoch"]), int(state_dict.get("batches_done", 0)))

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
        return len(self._starts(-(-self.num_samples // world)))

    def _starts(self, count: int) -> range:
        """Where each batch of ``count`` samples starts. In training a last batch of one sample is left
        out: batch norm cannot normalise it (and it would carry a whole step's weight)."""
        starts = range(0, count, self.batch_size)
        return starts[:-1] if self.train and count > 1 and count % self.batch_size == 1 else starts

    def __iter__(self):
        rank, world, epoch, device = self._trainer_state()
        images, labels = self.dm.tensors_on(self.split, device)
        augment = self.dm.augment_fn if self.train else None
        mean, std = self.dm.mean.to(images.device), self.dm.std.to(images.device)
        order = self._indices(rank, world, epoch).to(images.device)
        first = 0
        if self._resume is not None:
            resume_epoch, done = self._resume
            self._resume = None
            first = done if resume_epoch == epoch else 0
        starts = self._starts(order.numel())
        for batch_index in range(first, len(starts)):
            start = starts[batch_index]
            idx = order[start: start + self.batch_size]
            x = images[idx].float().div_(255)
            if augment is not None:
                seed = ((self.dm.seed * 1_000_003 + epoch) * 1_000_003 + batch_index) * 1_009 + rank
                generator = torch.Generator(device=x.device).manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
                x = augment(x, generator)
            yield (x - mean) / std, labels[idx]


class TensorDataModule(L.LightningDataModule):
    """Base class: subclasses say which files they need, what the dataset is and how to decode it."""

    name = "dataset"
    folder = ""  # the dataset's folder under the data root: present but incomplete is an error
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
        self.verify_checksums = verify_checksums  # published checksums, where the dataset has them
        self.input_shape = self.num_classes = self.split_sizes = None
        self.validation_source = None
        self._said_validation_source = False
        self.root: Optional[Path] = None
        self._splits = None
        self._device_cache = {}

    # -- what subclasses provide ------------------------------------------------------------
    def info(self) -> DatasetInfo:
        """Input shape, classes and split sizes, known without reading the files."""
        raise NotImplementedError

    def decode(self, root: Path) -> dict:
        """Return ``{"train": (uint8 NCHW, int64 labels), "test": (...)}`` read from ``root``."""
        raise NotImplementedError

    def fetch(self, root: Path) -> None:
        """Download the dataset into ``root`` (torchvision's download where it has one)."""
        raise DatasetError(f"{self.name} cannot be downloaded automatically; {self.how_to_get}")

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training augmentation of a float batch in [0, 1]; none unless a subclass overrides it."""
        return x

    def missing(self, root: Path) -> list[str]:
        """The required files not present under ``root`` (each named by its first alternative)."""
        return [alternatives[0] for alternatives in self.files
                if not any((root / rel).is_file() for rel in alternatives)]

    # -- finding the data ---------------------------------------------------------------------
    def find_root(self) -> Path:
        """The data folder holding the whole dataset. A folder with only part of it is an error,
        never a reason to look elsewhere; an explicit ``data_dir`` is the only folder searched."""
        if self.root is not None:
            return self.root
        roots = candidate_roots(self.data_dir)
        for root in roots:
            missing = self.missing(root)
            if not missing:
                self.root = root
                return root
            if self.folder and (root / self.folder).exists() and not self.download:
                shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                raise DatasetError(f"{self.name} in {root} is incomplete: {shown} missing; "
                                   f"{self.how_to_get or 'pass --download to fetch it'}")
        if self.download:
            target = roots[0]
            try:
                self.fetch(target)
            except DatasetError:
                raise
            except Exception as exc:  # network errors come in many types; report them in one line
                raise DatasetError(f"{self.name}: download into {target} failed ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                                   f"{self._not_found_hint(roots, downloaded=True)}") from None
            if not self.missing(target):
                self.root = target
                return target
        raise DatasetError(f"{self.name} not found: {self._not_found_hint(roots)}")

    def _not_found_hint(self, roots, downloaded: bool = False) -> str:
        expected = ", ".join(" or ".join(alts) for alts in self.files)
        searched = ", ".join(str(r) for r in roots)
        source = describe_roots(self.data_dir)
        how = ("check the network connection, or put the files there yourself" if downloaded  # --download was given
               else self.how_to_get or "pass --download to fetch it")
        return f"searched {searched} (from {source}); expected {expected}; {how}"

    # -- Lightning hooks ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download:
            self.find_root()  # downloads once, on the main process of each node

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        root = self.find_root()
        data = self.decode(root)
        self._check_decoded(data, root)
        train_x, train_y = data["train"]
        test_x, test_y = data["test"]
        self.mean, self.std = channel_stats(train_x)
        if self.val_split > 0:
            keep, held = stratified_split(train_y, self.val_split, self.seed)
            if torch.unique(train_y[keep]).numel() < torch.unique(train_y).numel():
                raise ConfigError(f"--val-split {self.val_split:g} holds out every training sample of some class of "
                                  f"{self.name}; use a smaller share")
            val = (train_x[held], train_y[held])
            train = (train_x[keep], train_y[keep])
            self.validation_source = ValidationSource.HELD_OUT
        else:
            train, val = (train_x, train_y), (test_x, test_y)
            self.validation_source = ValidationSource.TEST
        self._splits = {"train": train, "val": val, "test": (test_x, test_y)}
        self.input_shape = tuple(train_x.shape[1:])
        self.num_classes = self.info().num_classes
        self.split_sizes = {k: int(v[1].numel()) for k, v in self._splits.items()}
        note_single_sample_batch(self.name, self.split_sizes["train"], self.batch_size)

    def _check_decoded(self, data: dict, root: Path) -> None:
        """Counts and label ranges against what the dataset is (``info()``): a file with a wrong
        number of labels or an impossible label is an error, not a smaller or larger model. The
        published split sizes are checked with the checksums (``verify_checksums``)."""
        info = self.info()
        for split, expected in (("train", info.train_size), ("test", info.test_size)):
            images, labels = data[split]
            if images.shape[0] != labels.numel():
                raise DatasetError(f"{self.name} in {root}: the {split} split has {images.shape[0]} images but "
                                   f"{labels.numel()} labels; a file is corrupt or from another dataset")
            if expected is not None and self.verify_checksums and labels.numel() != expected:
                raise DatasetError(f"{self.name} in {root}: the {split} split has {labels.numel()} samples, expected "
                                   f"{expected}; a file is truncated or from another dataset")
            if tuple(images.shape[1:]) != tuple(info.input_shape):
                raise DatasetError(f"{self.name} in {root}: {split} images have shape {tuple(images.shape[1:])}, "
                                   f"expected {tuple(info.input_shape)}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
                raise DatasetError(f"{self.name} in {root}: {split} labels range over {int(labels.min())}.."
                                   f"{int(labels.max())}, expected 0..{info.num_classes - 1}; a label file is corrupt")

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
        loader = self._loader("val", False)
        # Said when a fit asks for validation batches, once, not in setup(): reading the data again for a
        # table or a probe validates nothing, and would repeat a note that was the run's.
        if self.validation_source == ValidationSource.TEST and not self._said_validation_source:
            log.warning("%s: val_split=0, so validation metrics are measured on the TEST set", self.name)
            self._said_validation_source = True
        return loader

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
