"""File readers that turn a truncated or corrupt file into one DatasetError naming the file."""
from __future__ import annotations

import bz2
import gzip
import hashlib
import math
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from deepplain.errors import DatasetError


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed if it ends in .gz or .bz2."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        if path.suffix == ".bz2":
            with bz2.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise DatasetError(f"corrupt or truncated file {path} ({exc}); delete it and download it again") from None


def check_md5(path: Path, expected: str | None) -> None:
    if not expected:
        return
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != expected:
        raise DatasetError(f"checksum mismatch for {path} (md5 {digest}, expected {expected}); "
                           "the file is corrupt or truncated: delete it and download it again")


def read_idx(path: Path, md5: str | None = None) -> torch.Tensor:
    """Decode an IDX file (MNIST's format) of unsigned bytes, checking its header against its size."""
    if path.suffix == ".gz":
        check_md5(path, md5)
    data = read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"corrupt file {path}: too short for an IDX header")
    zero, dtype, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype != 0x08 or ndim < 1:
        raise DatasetError(f"corrupt file {path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(data) != offset + math.prod(dims):
        raise DatasetError(f"truncated file {path}: header says {dims} ({offset + math.prod(dims)} bytes), "
                           f"found {len(data)} bytes; delete it and download it again")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).view(*dims)


def read_pickle(path: Path, md5: str | None = None) -> dict:
    check_md5(path, md5)
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except (EOFError, pickle.UnpicklingError, ValueError, OSError) as exc:
        raise DatasetError(f"corrupt or truncated file {path} ({type(exc).__name__}: {exc}); "
                           "delete it and download it again") from None


def read_libsvm_images(path: Path, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """USPS in LIBSVM format (torchvision's ``usps.bz2``): values in [-1, 1], labels 1..10."""
    text = read_bytes(path).decode("ascii", errors="replace").splitlines()
    images = np.zeros((len(text), side * side), dtype=np.float32)
    labels = np.zeros(len(text), dtype=np.int64)
    try:
        for row, line in enumerate(text):
            fields = line.split()
            labels[row] = int(float(fields[0])) - 1
            for item in fields[1:]:
                index, value = item.split(":")
                images[row, int(index) - 1] = float(value)
    except (ValueError, IndexError) as exc:
        raise DatasetError(f"corrupt file {path}: line {row + 1} is not LIBSVM 'label index:value' ({exc})") from None
    # torchvision's USPS conversion: [-1, 1] -> [0, 255], truncated to uint8.
    pixels = ((images + 1) / 2 * 255).astype(np.uint8).reshape(-1, 1, side, side)
    return torch.from_numpy(pixels), torch.from_numpy(labels)
