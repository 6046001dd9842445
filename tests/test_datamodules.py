"""Datamodules on the real shared datasets, a tiny CIFAR folder, and bad data."""
import gzip
import shutil

import numpy as np
import pytest
import torch
from deepplain.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    COIL20DataModule,
    FakeDataModule,
    MNISTDataModule,
    get_datamodule,
)
from deepplain.datamodules.augment import random_crop_flip
from deepplain.datamodules.splits import stratified_split

from deepplain.errors import ConfigError, DatasetError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # shared/datasets/README.md
USPS_TEST_COUNTS = [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]


def all_labels(dm, split):
    return dm._splits[split][1]


@pytest.mark.fast
@pytest.mark.parametrize("name,shape,train_total,test,mean", [
    ("mnist", (1, 28, 28), 60000, 10000, 0.1307), ("fashion-mnist", (1, 28, 28), 60000, 10000, 0.2860),
    ("usps", (1, 16, 16), 7291, 2007, None), ("coil20", (1, 32, 32), 1000, 440, None)])
def test_real_datasets_splits_shapes_and_ranges(name, shape, train_total, test, mean):
    dm = get_datamodule(name, batch_size=64, val_split=0.1, seed=0)
    dm.setup()
    assert dm.input_shape == shape
    assert dm.num_classes == (20 if name == "coil20" else 10)
    sizes = dm.split_sizes
    assert sizes["train"] + sizes["val"] == train_total and sizes["test"] == test
    assert abs(sizes["val"] - 0.1 * train_total) <= dm.num_classes  # rounding per class
    images = dm._splits["train"][0]
    assert images.dtype == torch.uint8 and images.shape[1:] == shape and int(images.max()) > 200
    if mean is not None:  # the README's mean pixel of the full training split
        full = torch.cat([dm._splits["train"][0], dm._splits["val"][0]]).float().mean() / 255
        assert float(full) == pytest.approx(mean, abs=5e-4)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, *shape) and x.dtype == torch.float32 and y.dtype == torch.long
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3  # per-dataset normalisation


@pytest.mark.fast
def test_mnist_class_counts_and_stratified_validation():
    dm = MNISTDataModule(val_split=0.1, seed=3)
    dm.setup()
    counts = torch.bincount(torch.cat([all_labels(dm, "train"), all_labels(dm, "val")]), minlength=10).tolist()
    assert counts == MNIST_TRAIN_COUNTS
    val_counts = torch.bincount(all_labels(dm, "val"), minlength=10)
    assert torch.equal(val_counts, torch.tensor([round(0.1 * c) for c in MNIST_TRAIN_COUNTS]))


@pytest.mark.fast
def test_usps_class_counts():
    dm = get_datamodule("usps", val_split=0.0)
    dm.setup()
    assert torch.bincount(all_labels(dm, "test"), minlength=10).tolist() == USPS_TEST_COUNTS


@pytest.mark.fast
def test_coil20_split_is_per_object_stratified_and_seeded(data_root):
    a, b, c = (COIL20DataModule(val_split=0.0, seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.bincount(all_labels(a, "train"), minlength=20).tolist() == [50] * 20
    assert torch.bincount(all_labels(a, "test"), minlength=20).tolist() == [22] * 20
    assert torch.equal(a._splits["train"][0], b._splits["train"][0])
    assert not torch.equal(a._splits["train"][0], c._splits["train"][0])
    big = COIL20DataModule(image_size=64, val_split=0.0)
    big.setup()
    assert big.input_shape == (1, 64, 64)


@pytest.mark.fast
def test_val_split_zero_validates_on_test_and_says_so(caplog):
    dm = get_datamodule("usps", val_split=0.0)
    with caplog.at_level("WARNING"):
        dm.setup()
        dm.probe_batch(8, split="train")
        assert "TEST set" not in caplog.text  # nothing has validated yet
        dm.val_dataloader()
        dm.val_dataloader()
    assert dm.validation_source == "test set" and caplog.text.count("TEST set") == 1  # said once, by the fit
    assert dm.split_sizes == {"train": 7291, "val": 2007, "test": 2007}


@pytest.mark.fast
def test_missing_data_folder_names_paths_and_files(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPPLAIN_DATA", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as info:
        MNISTDataModule().setup()
    message = str(info.value)
    assert "MNIST not found" in message and str(tmp_path / "empty") in message and "data" in message
    assert "MNIST/raw/train-images-idx3-ubyte.gz" in message and "--download" in message
    assert "\n" not in message


@pytest.mark.fast
def test_the_message_says_where_the_folders_searched_came_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEEPPLAIN_DATA", raising=False)
    with pytest.raises(DatasetError, match=r"searched data \(from ./data; \$DEEPPLAIN_DATA is not set\)"):
        MNISTDataModule().setup()
    monkeypatch.setenv("DEEPPLAIN_DATA", str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match=r"\(from \$DEEPPLAIN_DATA, then ./data\)"):
        MNISTDataModule().setup()


@pytest.mark.fast
def test_explicit_data_dir_is_the_only_folder_searched(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("DEEPPLAIN_DATA", str(data_root))  # holds a complete MNIST, which must not be used
    with pytest.raises(DatasetError, match=f"MNIST not found: searched {tmp_path / 'typo'} \\(from --data-dir\\)"):
        MNISTDataModule(data_dir=tmp_path / "typo").setup()


@pytest.mark.fast
@pytest.mark.parametrize("dataset,remove", [("mnist", "MNIST/raw/t10k-labels-idx1-ubyte.gz"),
                                            ("usps", "usps/usps.h5"), ("coil20", "coil20/coil-20-proc/obj7__31.png")])
def test_incomplete_data_folder_is_an_error_not_a_fallback(dataset, remove, tmp_path, monkeypatch, data_root):
    folder = remove.split("/")[0]
    shutil.copytree(data_root / folder, tmp_path / "data" / folder)
    (tmp_path / "data" / remove).unlink()
    monkeypatch.setenv("DEEPPLAIN_DATA", str(data_root))
    for kwargs in ({"data_dir": tmp_path / "data"}, {}):  # explicit folder, and as $DEEPPLAIN_DATA before ./data
        if not kwargs:  # ./data holds the complete dataset: finding the error proves there was no fallback
            monkeypatch.setenv("DEEPPLAIN_DATA", str(tmp_path / "data"))
            (tmp_path / "cwd").mkdir()
            (tmp_path / "cwd" / "data").symlink_to(data_root)
            monkeypatch.chdir(tmp_path / "cwd")
        with pytest.raises(DatasetError, match="is incomplete: .*" + remove.split("/")[-1].replace(".", "\\.")):
            get_datamodule(dataset, **kwargs).setup()


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.fast
def test_label_count_and_range_are_checked(tmp_path, data_root):
    root = tmp_path / "data" / "MNIST" / "raw"
    root.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (root / name).write_bytes(gzip.decompress((data_root / "MNIST/raw" / f"{name}.gz").read_bytes()))
    labels = np.frombuffer(gzip.decompress((data_root / "MNIST/raw/train-labels-idx1-ubyte.gz").read_bytes())[8:],
                           dtype=np.uint8)
    _write_idx(root / "train-labels-idx1-ubyte", labels[:59000])
    with pytest.raises(DatasetError, match="train split has 60000 images but 59000 labels"):
        MNISTDataModule(data_dir=tmp_path / "data").setup()
    bad = labels.copy()
    bad[123] = 200
    _write_idx(root / "train-labels-idx1-ubyte", bad)
    with pytest.raises(DatasetError, match="train labels range over 0..200, expected 0..9"):
        MNISTDataModule(data_dir=tmp_path / "data").setup()
    _write_idx(root / "train-labels-idx1-ubyte", labels)
    assert MNISTDataModule(data_dir=tmp_path / "data", val_split=0).setup() is None  # intact again


@pytest.mark.fast
def test_coil20_sha256sums_are_checked(tmp_path, data_root):
    shutil.copytree(data_root / "coil20", tmp_path / "coil20")
    png = tmp_path / "coil20" / "coil-20-proc" / "obj3__5.png"
    data = bytearray(png.read_bytes())
    data[-20] ^= 0xFF
    png.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="checksum mismatch for .*obj3__5.png"):
        COIL20DataModule(data_dir=tmp_path).setup()


@pytest.mark.fast
def test_validation_share_that_empties_a_class_is_refused():
    dm = FakeDataModule(input_shape=(1, 4, 4), num_classes=4, train_size=8, test_size=4, val_split=0.9)
    with pytest.raises(ConfigError, match="holds out every training sample of some class"):
        dm.setup()


@pytest.mark.fast
def test_download_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPPLAIN_DATA", str(tmp_path / "empty"))

    def offline(self, root):
        raise OSError("network is unreachable")
    monkeypatch.setattr(MNISTDataModule, "fetch", offline)
    failed = "MNIST: download into .* failed \\(OSError: network is unreachable\\)"
    with pytest.raises(DatasetError, match=failed) as err:
        MNISTDataModule(data_dir=tmp_path / "dl", download=True).setup()
    # --download was given: the hint is not to pass it again
    assert "pass --download" not in str(err.value) and "check the network connection" in str(err.value)


@pytest.fixture
def mnist_copy(tmp_path, data_root):
    root = tmp_path / "data"
    shutil.copytree(data_root / "MNIST", root / "MNIST")
    return root


@pytest.mark.fast
def test_truncated_gz_named_in_error(mnist_copy):
    path = mnist_copy / "MNIST/raw/t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DatasetError, match=f"checksum mismatch for {path}"):
        MNISTDataModule(data_dir=mnist_copy).setup()
    with pytest.raises(DatasetError, match=f"corrupt or truncated file {path}"):
        MNISTDataModule(data_dir=mnist_copy, verify_checksums=False).setup()


@pytest.mark.fast
def test_truncated_idx_payload_named_in_error(mnist_copy):
    path = mnist_copy / "MNIST/raw/t10k-labels-idx1-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.unlink()
    (mnist_copy / "MNIST/raw/t10k-labels-idx1-ubyte").write_bytes(data[:-10])  # uncompressed, 10 bytes short
    with pytest.raises(DatasetError, match="truncated file .*t10k-labels-idx1-ubyte: header says"):
        MNISTDataModule(data_dir=mnist_copy).setup()


@pytest.mark.fast
def test_tiny_cifar_folders_load(tiny_cifar):
    for cls, classes, n_train, n_test in [(CIFAR10DataModule, 10, 200, 40), (CIFAR100DataModule, 100, 200, 200)]:
        dm = cls(data_dir=tiny_cifar, val_split=0.0, batch_size=16, verify_checksums=False)
        dm.setup()
        assert dm.input_shape == (3, 32, 32) and dm.num_classes == classes
        assert dm.split_sizes["train"] == n_train and dm.split_sizes["test"] == n_test
        x, _ = next(iter(dm.train_dataloader()))
        assert x.shape == (16, 3, 32, 32)


@pytest.mark.fast
def test_cifar_checksums_and_corrupt_pickle(tiny_cifar):
    with pytest.raises(DatasetError, match="checksum mismatch for .*data_batch_1"):
        CIFAR10DataModule(data_dir=tiny_cifar).setup()
    bad = tiny_cifar / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DatasetError, match="corrupt or truncated file .*data_batch_3"):
        CIFAR10DataModule(data_dir=tiny_cifar, verify_checksums=False).setup()


@pytest.mark.fast
def test_cifar_training_batches_are_cropped_and_flipped(tiny_cifar):
    dm = CIFAR10DataModule(data_dir=tiny_cifar, val_split=0.0, batch_size=200, verify_checksums=False)
    dm.setup()
    train = next(iter(dm.train_dataloader()))[0]
    test = next(iter(dm.test_dataloader()))[0]
    raw = dm._splits["train"][0].float() / 255
    plain = (raw - dm.mean) / dm.std
    # shuffled and augmented: no training batch image equals its unaugmented version in place
    assert not torch.allclose(train, plain[: train.shape[0]])
    assert torch.allclose(test, (dm._splits["test"][0].float() / 255 - dm.mean) / dm.std, atol=1e-6)


@pytest.mark.fast
def test_random_crop_flip_matches_a_crop_of_the_padded_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 8, 8)
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        candidates = [padded[i, :, t:t + 8, left:left + 8] for t in range(5) for left in range(5)]
        plain = any(torch.equal(out[i], c) for c in candidates)
        flipped = any(torch.equal(out[i], c.flip(-1)) for c in candidates)
        assert plain or flipped
        flips += flipped and not plain
    assert 15 < flips < 49  # about half are flipped
    assert torch.equal(out, random_crop_flip(images, 2, torch.Generator().manual_seed(0)))
    del generator


@pytest.mark.fast
def test_loader_is_seeded_per_epoch_and_shards_for_ddp():
    dm = FakeDataModule(batch_size=50, val_split=0.0, train_size=200, test_size=20)
    dm.setup()
    loader = dm.train_dataloader()
    first = torch.cat([y for _, y in loader])
    again = torch.cat([y for _, y in loader])
    assert torch.equal(first, again)  # same epoch, same order
    order0 = loader._indices(0, 1, 0)
    order1 = loader._indices(0, 1, 1)
    assert not torch.equal(order0, order1)
    shards = [loader._indices(rank, 3, 0) for rank in range(3)]
    assert len({s.numel() for s in shards}) == 1
    assert set(torch.cat(shards).tolist()) == set(range(200))


@pytest.mark.fast
def test_stratified_split_counts():
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 60)
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert torch.bincount(labels[held]).tolist() == [6, 2, 12]
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(100))


@pytest.mark.fast
def test_fake_datamodule_shapes_and_seed():
    a = FakeDataModule(input_shape=(1, 12, 12), num_classes=4, train_size=100, test_size=10, seed=5)
    b = FakeDataModule(input_shape=(1, 12, 12), num_classes=4, train_size=100, test_size=10, seed=5)
    a.setup()
    b.setup()
    assert a.input_shape == (1, 12, 12) and a.num_classes == 4
    assert torch.equal(a._splits["train"][0], b._splits["train"][0])


@pytest.mark.fast
def test_bad_arguments_rejected():
    with pytest.raises(ConfigError, match="unknown dataset 'svhn'; valid datasets: mnist, fashion-mnist"):
        get_datamodule("svhn")
    with pytest.raises(ConfigError, match="val_split must be in \\[0, 0.9\\]"):
        get_datamodule("usps", val_split=1.5)
    with pytest.raises(ConfigError, match="batch size must be a positive integer"):
        get_datamodule("usps", batch_size=0)


@pytest.mark.fast
def test_probe_batch_is_fixed_and_normalised():
    dm = get_datamodule("usps")
    dm.setup()
    x1, y1 = dm.probe_batch(32)
    x2, _ = dm.probe_batch(32)
    assert x1.shape == (32, 1, 16, 16) and torch.equal(x1, x2) and y1.shape == (32,)
    assert np.isfinite(x1.numpy()).all()
