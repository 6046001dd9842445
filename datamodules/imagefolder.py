"""Folder datasets (``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg``), e.g. ImageNet.

Images are decoded per sample with PIL, so this path keeps torchvision's ``DataLoader`` and
transforms (ImageNet-style: random-resized crop + flip for training, resize + centre crop for
evaluation). ``val/`` serves as both validation and test set.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from deepplain.errors import ConfigError, DatasetError, one_line

from .base import DatasetInfo, note_single_sample_batch
from .paths import candidate_roots
from .splits import ValidationSource

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def load_image(path: str):
    """An RGB image; a file PIL cannot read is a data fault (DatasetError, exit 2) naming the file, not an OSError
    that would read as a machine fault."""
    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"imagefolder: {path} is not a readable image ({one_line(exc, 120)})") \
            from None
    except OSError as exc:
        if exc.errno is not None:  # the disk or the file system: a machine fault
            raise
        raise DatasetError(f"imagefolder: {path} is a damaged image ({one_line(exc, 120)})") from None


class ImageFolderDataModule(L.LightningDataModule):
    name = "imagefolder"

    def __init__(self, data_dir=None, batch_size: int = 256, val_split: float = 0.0, seed: int = 0,
                 download: bool = False, num_workers: int = 4, image_size: int = 224, eval_batch_size=None):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        if val_split:
            raise ConfigError(f"imagefolder validates on its val/ folder; val_split does not apply, got {val_split!r}")
        self.data_dir, self.batch_size, self.seed = data_dir, batch_size, seed
        self.num_workers, self.image_size = num_workers, image_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.input_shape = (3, image_size, image_size)
        self.num_classes = self.split_sizes = None
        self.validation_source = ValidationSource.VAL_FOLDER
        self.root = None  # the data folder, once found
        self._train = self._val = None

    def info(self) -> DatasetInfo:
        """The class count is the number of class folders under train/ (listed, not read)."""
        root = self.find_root()
        classes = [p for p in (root / "train").iterdir() if p.is_dir()]
        if len(classes) < 2:
            raise DatasetError(f"imagefolder: {root / 'train'} needs at least two class folders, "
                               f"found {len(classes)}")
        for split in ("train", "val"):  # a class without images: said here, before anything is written
            for folder in sorted(p for p in (root / split).iterdir() if p.is_dir()):
                if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in folder.rglob("*") if f.is_file()):
                    raise DatasetError(f"imagefolder: class folder {folder} has no images "
                                       f"({', '.join(IMAGE_EXTENSIONS)})")
        return DatasetInfo((3, self.image_size, self.image_size), len(classes))

    def find_root(self) -> Path:
        roots = candidate_roots(self.data_dir)
        for root in roots:
            if (root / "train").is_dir() and (root / "val").is_dir():
                self.root = root
                return root
        raise DatasetError(f"imagefolder not found: searched {', '.join(map(str, roots))}; expected train/<class>/ and "
                           "val/<class>/ image folders under --data-dir")

    def setup(self, stage=None):
        if self._train is not None:
            return
        root = self.find_root()
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = transforms.Compose([transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), normalize])
        eval_tf = transforms.Compose([transforms.Resize(int(self.image_size * 256 / 224)),
                                      transforms.CenterCrop(self.image_size), transforms.ToTensor(), normalize])
        try:
            self._train = datasets.ImageFolder(str(root / "train"), train_tf, loader=load_image)
            self._val = datasets.ImageFolder(str(root / "val"), eval_tf, loader=load_image)
        except FileNotFoundError as exc:  # torchvision's word for a class folder without images
            raise DatasetError(f"imagefolder in {root}: {exc}") from None
        if self._train.classes != self._val.classes:
            raise DatasetError(f"imagefolder: train/ and val/ under {root} have different class folders")
        self.num_classes = len(self._train.classes)
        self.split_sizes = {"train": len(self._train), "val": len(self._val), "test": len(self._val)}

    def _loader(self, dataset, shuffle, batch_size, drop_last=False):
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
                          generator=generator, drop_last=drop_last)

    def train_dataloader(self):
        # a last batch of one sample is left out: batch norm cannot normalise it
        return self._loader(self._train, True, self.batch_size,
                            drop_last=note_single_sample_batch("imagefolder", len(self._train), self.batch_size))

    def val_dataloader(self):
        return self._loader(self._val, False, self.eval_batch_size)

    def test_dataloader(self):
        return self._loader(self._val, False, self.eval_batch_size)

    def probe_batch(self, size: int = 256, split: str = "val"):
        xs, ys = zip(*(self._val[i] for i in range(min(size, len(self._val)))))
        return torch.stack(xs), torch.tensor(ys)
