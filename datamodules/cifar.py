"""CIFAR-10 and CIFAR-100 from torchvision's python-pickle layout (50,000 / 10,000 32x32 RGB).

Training augmentation: random crop with 4-pixel zero padding and horizontal flip, on device.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision.datasets as tvd

from deepplain.errors import DatasetError

from .base import CropFlipMixin, DatasetInfo, TensorDataModule
from .readers import read_pickle


class _CifarDataModule(CropFlipMixin, TensorDataModule):
    folder = ""
    train_files: list[str] = []
    test_files: list[str] = []
    label_key = "labels"
    torchvision_class = ""
    num_classes_total = 10

    def info(self) -> DatasetInfo:
        return DatasetInfo((3, 32, 32), self.num_classes_total, 50000, 10000)

    @property
    def files(self):
        return [[f"{self.folder}/{name}"] for name in self.train_files + self.test_files]

    def _read(self, root: Path, names: list[str], md5: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name in names:
            path = root / self.folder / name
            entry = read_pickle(path, md5.get(name) if self.verify_checksums else None)
            if not isinstance(entry, dict) or "data" not in entry or self.label_key not in entry:
                raise DatasetError(f"corrupt file {path}: expected a pickled dict with 'data' and '{self.label_key}'")
            data = torch.as_tensor(entry["data"], dtype=torch.uint8)
            target = torch.as_tensor(entry[self.label_key], dtype=torch.long)
            if data.dim() != 2 or data.shape[1] != 3072 or data.shape[0] != target.numel():
                raise DatasetError(f"corrupt file {path}: data has shape {tuple(data.shape)} for {target.numel()} "
                                   "labels, expected N x 3072")
            images.append(data.view(-1, 3, 32, 32))
            labels.append(target)
        return torch.cat(images), torch.cat(labels)

    def decode(self, root: Path) -> dict:
        cls = getattr(tvd, self.torchvision_class)
        md5 = dict(cls.train_list + cls.test_list)
        return {"train": self._read(root, self.train_files, md5), "test": self._read(root, self.test_files, md5)}

    def fetch(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        getattr(tvd, self.torchvision_class)(str(root), train=True, download=True)


class CIFAR10DataModule(_CifarDataModule):
    name = "CIFAR-10"
    folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    torchvision_class = "CIFAR10"
    how_to_get = "pass --download (torchvision) or extract cifar-10-python.tar.gz into the data folder"


class CIFAR100DataModule(_CifarDataModule):
    name = "CIFAR-100"
    folder = "cifar-100-python"
    train_files = ["train"]
    test_files = ["test"]
    label_key = "fine_labels"
    torchvision_class = "CIFAR100"
    num_classes_total = 100
    how_to_get = "pass --download (torchvision) or extract cifar-100-python.tar.gz into the data folder"
