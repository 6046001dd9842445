"""USPS handwritten digits: 7,291 training and 2,007 test images of 16x16, 10 classes.

Read from torchvision's layout (``usps/usps.bz2`` and ``usps/usps.t.bz2``, LIBSVM format) when
both splits are there, otherwise from the HDF5 copy ``usps/usps.h5`` (groups ``train``/``test``
with ``data`` in [0, 1] and ``target``). The two sources scale intensities differently, so both
splits always come from the same one.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision.datasets as tvd

from deepplain.errors import DatasetError

from .base import DatasetInfo, TensorDataModule
from .readers import check_md5, read_libsvm_images

_LIBSVM = {"train": "usps/usps.bz2", "test": "usps/usps.t.bz2"}
_H5 = "usps/usps.h5"


class USPSDataModule(TensorDataModule):
    name = "USPS"
    folder = "usps"
    files = [[_H5, "usps/usps.bz2 + usps/usps.t.bz2"]]
    how_to_get = "pass --download (torchvision fetches usps.bz2 and usps.t.bz2) or provide usps/usps.h5"

    def info(self) -> DatasetInfo:
        return DatasetInfo((1, 16, 16), 10, 7291, 2007)

    def missing(self, root: Path) -> list[str]:
        if (root / _H5).is_file() or all((root / rel).is_file() for rel in _LIBSVM.values()):
            return []
        return [_H5 + " (or usps/usps.bz2 and usps/usps.t.bz2)"]

    def decode(self, root: Path) -> dict:
        if all((root / rel).is_file() for rel in _LIBSVM.values()):
            out = {}
            for split, rel in _LIBSVM.items():
                if self.verify_checksums:
                    check_md5(root / rel, tvd.USPS.split_list[split][2])
                out[split] = read_libsvm_images(root / rel)
            return out
        return read_usps_h5(root / _H5)

    def fetch(self, root: Path) -> None:
        (root / "usps").mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            tvd.USPS(str(root / "usps"), train=train, download=True)


def read_usps_h5(path: Path) -> dict:
    out = {}
    try:
        with h5py.File(path, "r") as fh:
            for split in ("train", "test"):
                data = np.asarray(fh[split]["data"], dtype=np.float32)
                target = np.asarray(fh[split]["target"], dtype=np.int64)
                if data.ndim != 2 or data.shape[1] != 256 or len(target) != len(data):
                    raise DatasetError(f"corrupt file {path}: {split}/data has shape {data.shape}, "
                                       f"expected N x 256 with N labels")
                pixels = np.clip(np.rint(data * 255), 0, 255).astype(np.uint8).reshape(-1, 1, 16, 16)
                out[split] = (torch.from_numpy(pixels), torch.from_numpy(target))
    except DatasetError:
        raise
    except (OSError, KeyError) as exc:
        raise DatasetError(f"corrupt or truncated file {path} ({type(exc).__name__}: {exc}); "
                           "expected HDF5 groups train/ and test/ with data and target") from None
    return out
