"""Samples per second of the whole-tensor data path (uint8 tensor, batched crop + flip + normalise)
divided by a per-image torchvision DataLoader path (PIL image per sample, RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize), on the same images with the same augmentation.

    python benchmarks/data_path.py           # 50,000 CIFAR-shaped images (one CIFAR-10 epoch)
    python benchmarks/data_path.py --quick   # 10,000 images, under a minute

The per-image path is timed with 0 and with 2 worker processes; the ratio is against the faster.
Ends with ``data_path_speedup=<ratio>``.
"""
from __future__ import annotations

import argparse
import time

from _util import machine


def whole_tensor(dm) -> float:
    loader = dm.train_dataloader()
    start = time.perf_counter()
    n = sum(x.shape[0] for x, _ in loader)
    return n / (time.perf_counter() - start)


def per_image(dm, workers: int) -> float:
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    images, labels = dm._splits["train"]
    mean, std = dm.mean.flatten().tolist(), dm.std.flatten().tolist()

    class PILImages(Dataset):
        def __init__(self):
            self.array = images.permute(0, 2, 3, 1).numpy()
            self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                                 transforms.RandomHorizontalFlip(),
                                                 transforms.ToTensor(), transforms.Normalize(mean, std)])

        def __len__(self):
            return len(self.array)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.array[i])), int(labels[i])

    loader = DataLoader(PILImages(), batch_size=dm.batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    n = sum(x.shape[0] for x, _ in loader)
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from deepplain.datamodules import FakeDataModule
    n = 10_000 if args.quick else 50_000
    dm = FakeDataModule(input_shape=(3, 32, 32), num_classes=10, train_size=n, test_size=100, batch_size=128,
                        val_split=0.0, augment=True)
    dm.setup()
    print(f"machine: {machine()}")
    print(f"data: {n} CIFAR-shaped uint8 images, batch 128, random crop (pad 4) + horizontal flip + normalise")
    whole_tensor(dm)  # warm-up
    ours = whole_tensor(dm)
    print(f"  whole-tensor path: {ours:,.0f} samples/s")
    best = 0.0
    for workers in (0, 2):
        sps = per_image(dm, workers)
        best = max(best, sps)
        print(f"  per-image DataLoader, num_workers={workers}: {sps:,.0f} samples/s")
    print(f"data_path_speedup={ours / best:.2f}")


if __name__ == "__main__":
    main()
