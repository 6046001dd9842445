"""LightningDataModules for the datasets deepplain's papers use, and ``get_datamodule(name)``.

Small datasets use the whole-tensor path (``TensorDataModule``): decoded once to uint8,
batched, augmented and normalised as tensors on the training device. After ``setup()`` every
datamodule exposes ``input_shape``, ``num_classes`` and ``split_sizes``.
"""
from deepplain.errors import ConfigError

from .base import TensorBatchLoader, TensorDataModule
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .coil20 import COIL20DataModule
from .fake import FakeDataModule
from .imagefolder import ImageFolderDataModule
from .mnist import FashionMNISTDataModule, MNISTDataModule
from .paths import candidate_roots
from .usps import USPSDataModule

DATAMODULES = {
    "mnist": MNISTDataModule,
    "fashion-mnist": FashionMNISTDataModule,
    "usps": USPSDataModule,
    "coil20": COIL20DataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "fake": FakeDataModule,
    "imagefolder": ImageFolderDataModule,
}
CONV_DATASETS = ("cifar10", "cifar100", "imagefolder")  # default --arch conv; the rest default to mlp


def get_datamodule(name: str, **kwargs):
    """Instantiate the datamodule registered as ``name`` (see ``DATAMODULES``)."""
    if name not in DATAMODULES:
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATAMODULES)}")
    return DATAMODULES[name](**kwargs)


__all__ = ["get_datamodule", "DATAMODULES", "CONV_DATASETS", "candidate_roots", "TensorDataModule",
           "TensorBatchLoader", "MNISTDataModule", "FashionMNISTDataModule", "USPSDataModule", "COIL20DataModule",
           "CIFAR10DataModule", "CIFAR100DataModule", "FakeDataModule", "ImageFolderDataModule"]
