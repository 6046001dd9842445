"""COIL-20 (processed): 1,440 grayscale images, 20 objects x 72 poses 5 degrees apart.

There is no standard split: each object's 72 poses are split 70% / 30% (50 / 22) with a seeded
permutation, so every object is in both splits. Images are resized from 128x128 to
``image_size`` (32 by default: the PlainNet paper's MLPs take 1,024 inputs).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.utils import download_and_extract_archive

from deepplain.errors import ConfigError, DatasetError

from .base import DatasetInfo, TensorDataModule

OBJECTS, POSES = 20, 72
FOLDER = "coil20/coil-20-proc"
SUMS = "coil20/SHA256SUMS"  # optional: "<sha256>  objK__N.png" per line, checked when present
URL = "http://www.cs.columbia.edu/CAVE/databases/SLAM_coil-20_coil-100/coil-20/coil-20-proc.zip"


class COIL20DataModule(TensorDataModule):
    name = "COIL-20"
    folder = FOLDER
    files = [[f"{FOLDER}/objK__N.png (K = 1..20, N = 0..71)"]]
    how_to_get = f"pass --download or unzip coil-20-proc.zip ({URL}) into <data>/coil20/"

    def __init__(self, *args, image_size: int = 32, train_fraction: float = 0.7, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(image_size, int) or image_size < 4:
            raise ConfigError(f"COIL-20 image_size must be an integer >= 4, got {image_size!r}")
        self.image_size, self.train_fraction = image_size, train_fraction

    def info(self) -> DatasetInfo:
        n_train = int(round(self.train_fraction * POSES))
        return DatasetInfo((1, self.image_size, self.image_size), OBJECTS, OBJECTS * n_train,
                           OBJECTS * (POSES - n_train))

    def missing(self, root: Path) -> list[str]:
        return [f"{FOLDER}/obj{obj + 1}__{pose}.png" for obj in range(OBJECTS) for pose in range(POSES)
                if not (root / FOLDER / f"obj{obj + 1}__{pose}.png").is_file()]

    def _check_sums(self, root: Path) -> None:
        sums = root / SUMS
        if not self.verify_checksums or not sums.is_file():
            return
        for line in sums.read_text().splitlines():
            if not line.strip():
                continue
            expected, name = line.split(maxsplit=1)
            path = root / FOLDER / name.strip().lstrip("*")
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
            if digest != expected:
                raise DatasetError(f"checksum mismatch for {path} (sha256 {digest}, {SUMS} says {expected}); "
                                   "the file is corrupt: unzip the archive again")

    def decode(self, root: Path) -> dict:
        self._check_sums(root)
        folder = root / FOLDER
        images = np.zeros((OBJECTS, POSES, self.image_size, self.image_size), dtype=np.uint8)
        for obj in range(OBJECTS):
            for pose in range(POSES):
                path = folder / f"obj{obj + 1}__{pose}.png"
                if not path.is_file():
                    raise DatasetError(f"COIL-20 is incomplete: {path} is missing (expected {OBJECTS * POSES} files "
                                       f"obj1__0.png .. obj20__71.png)")
                try:
                    with Image.open(path) as img:
                        img = img.convert("L")
                        if img.size != (self.image_size, self.image_size):
                            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
                        images[obj, pose] = np.asarray(img)
                except (UnidentifiedImageError, OSError) as exc:
                    raise DatasetError(f"corrupt image {path} ({exc}); delete it and unzip the archive again") from None
        generator = torch.Generator().manual_seed(self.seed)
        n_train = int(round(self.train_fraction * POSES))
        train_idx, test_idx = [], []
        for obj in range(OBJECTS):
            poses = torch.randperm(POSES, generator=generator) + obj * POSES
            train_idx.append(poses[:n_train])
            test_idx.append(poses[n_train:])
        flat = torch.from_numpy(images.reshape(OBJECTS * POSES, 1, self.image_size, self.image_size))
        labels = torch.arange(OBJECTS).repeat_interleave(POSES)
        train, test = torch.sort(torch.cat(train_idx)).values, torch.sort(torch.cat(test_idx)).values
        return {"train": (flat[train], labels[train]), "test": (flat[test], labels[test])}

    def fetch(self, root: Path) -> None:
        download_and_extract_archive(URL, download_root=str(root / "coil20"))
