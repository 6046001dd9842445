"""LightningDataModules for the datasets deepplain's papers use, and ``get_datamodule(name)``.

Small datasets use the whole-tensor path (``TensorDataModule``): decoded once to uint8,
batched, augmented and normalised as tensors on the training device. After ``setup()`` every
datamodule exposes ``input_shape``, ``num_classes`` and ``split_sizes``.
"""
from dataclasses import dataclass, field
from typing import Optional

from deepplain.errors import ConfigError

from .base import TensorBatchLoader, TensorDataModule
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .coil20 import COIL20DataModule
from .fake import FakeDataModule
from .imagefolder import ImageFolderDataModule
from .mnist import FashionMNISTDataModule, MNISTDataModule
from .paths import candidate_roots
from .usps import USPSDataModule


@dataclass(frozen=True)
class DatasetRecord:
    """What the rest of deepplain knows of a dataset, besides its datamodule."""
    name: str
    datamodule: type
    arch: str = "mlp"                      # the default --arch, and so the recipe (``deepplain.presets.RECIPES``)
    image_size: Optional[int] = None       # images resized to this side by default; None: fixed size
    needs_data_dir: bool = False           # no default location: --data-dir is required
    reads_files: bool = True               # False: generated in memory, nothing to find
    checksums: bool = True                 # files checked against published checksums (--skip-checksums)
    held_out_validation: bool = True       # --val-split holds out part of the training split
    model_defaults: dict = field(default_factory=dict)  # (model, arch) -> options the images call for


DATASETS: dict[str, DatasetRecord] = {r.name: r for r in (
    DatasetRecord("mnist", MNISTDataModule),
    DatasetRecord("fashion-mnist", FashionMNISTDataModule),
    DatasetRecord("usps", USPSDataModule),
    DatasetRecord("coil20", COIL20DataModule, image_size=32),
    DatasetRecord("cifar10", CIFAR10DataModule, arch="conv"),
    DatasetRecord("cifar100", CIFAR100DataModule, arch="conv"),
    DatasetRecord("fake", FakeDataModule, reads_files=False),
    DatasetRecord("imagefolder", ImageFolderDataModule, arch="conv", image_size=224, needs_data_dir=True,
                  checksums=False, held_out_validation=False,
                  model_defaults={("dirac", "conv"): {"layout": "imagenet"}}),  # ImageNet-sized images
)}


def get_dataset(name: str) -> DatasetRecord:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def get_datamodule(name: str, **kwargs):
    """Instantiate the datamodule registered as ``name`` (see ``DATASETS``)."""
    return get_dataset(name).datamodule(**kwargs)


__all__ = ["get_datamodule", "get_dataset", "DatasetRecord", "DATASETS", "candidate_roots", "TensorDataModule",
           "TensorBatchLoader", "MNISTDataModule", "FashionMNISTDataModule", "USPSDataModule", "COIL20DataModule",
           "CIFAR10DataModule", "CIFAR100DataModule", "FakeDataModule", "ImageFolderDataModule"]
