"""MNIST and Fashion-MNIST: 60,000 training and 10,000 test images of 28x28, 10 classes."""
from __future__ import annotations

from pathlib import Path

import torchvision.datasets as tvd

from .base import DatasetInfo, TensorDataModule
from .paths import first_existing
from .readers import read_idx

_SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class _IdxDataModule(TensorDataModule):
    folder = ""
    torchvision_class = ""

    def info(self) -> DatasetInfo:
        return DatasetInfo((1, 28, 28), 10, 60000, 10000)

    @classmethod
    def _alternatives(cls, stem: str) -> list[str]:
        # The .gz originals are decoded directly, so a read-only data folder is fine.
        return [f"{cls.folder}/{stem}.gz", f"{cls.folder}/{stem}"]

    @property
    def files(self):
        return [self._alternatives(stem) for pair in _SPLIT_FILES.values() for stem in pair]

    def _md5(self) -> dict:
        """torchvision's published md5 per original .gz file name."""
        resources = getattr(tvd, self.torchvision_class).resources
        return {name.rsplit("/", 1)[-1]: md5 for name, md5 in resources}

    def decode(self, root: Path) -> dict:
        md5 = self._md5() if self.verify_checksums else {}
        out = {}
        for split, (images_stem, labels_stem) in _SPLIT_FILES.items():
            images_path = first_existing(root, self._alternatives(images_stem))
            labels_path = first_existing(root, self._alternatives(labels_stem))
            images = read_idx(images_path, md5.get(images_path.name))
            labels = read_idx(labels_path, md5.get(labels_path.name)).long()
            out[split] = (images.unsqueeze(1), labels)
        return out

    def fetch(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            getattr(tvd, self.torchvision_class)(str(root), train=train, download=True)


class MNISTDataModule(_IdxDataModule):
    name = "MNIST"
    how_to_get = "pass --download (torchvision) or copy MNIST/raw/*.gz into the data folder"
    folder = "MNIST/raw"
    torchvision_class = "MNIST"


class FashionMNISTDataModule(_IdxDataModule):
    name = "Fashion-MNIST"
    how_to_get = "pass --download (torchvision) or copy FashionMNIST/raw/*.gz into the data folder"
    folder = "FashionMNIST/raw"
    torchvision_class = "FashionMNIST"
