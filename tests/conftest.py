import os
import pickle
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from deepplain.datamodules.paths import resolve_data_env
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.foreign import loaders

REPO = Path(__file__).resolve().parents[1]
# CI and the README set DEEPPLAIN_DATA, relative to where pytest starts; a developer checkout finds the
# shared copies beside the repository. Like every deepplain entry point, the suite makes it absolute once,
# so that the processes tests start in other folders find the same data.
os.environ.setdefault("DEEPPLAIN_DATA", str(REPO.parent / "shared" / "datasets"))
resolve_data_env()
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture(autouse=True)
def own_working_folder(tmp_path_factory, monkeypatch):
    """Each test starts in a fresh folder of its own: a fit without a logger writes the diagnostics' files into
    the trainer's default_root_dir, the working folder, as Lightning writes its checkpoints there."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["DEEPPLAIN_DATA"])
    if not (root / "MNIST").is_dir():
        pytest.fail(f"DEEPPLAIN_DATA={root} does not hold the shared datasets")
    return root


def write_tiny_cifar(root: Path, kind: str = "cifar10", per_file: int = 40, seed: int = 0) -> Path:
    """A CIFAR-format folder (python pickles) small enough to write in a test."""
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        folder, names, key, classes = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + [
            "test_batch"], "labels", 10
    else:
        folder, names, key, classes = root / "cifar-100-python", ["train", "test"], "fine_labels", 100
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        n = per_file if kind == "cifar10" else per_file * 5
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 key: [int(i % classes) for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    return root


@pytest.fixture
def tiny_cifar(tmp_path) -> Path:
    root = tmp_path / "data"
    write_tiny_cifar(root, "cifar10")
    write_tiny_cifar(root, "cifar100")
    return root


@pytest.fixture
def runs(tmp_path) -> Path:
    return tmp_path / "runs"


# -- helpers the test files share (import them: from conftest import fit, read_events) -----------------
def fit(module, callbacks, tmp_path, kind="mlp", steps=6, precision="32-true", accumulate=1, logger=True, **kw):
    train, val = loaders(kind)
    log = TensorBoardLogger(str(tmp_path), name="tb") if logger else False
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks, logger=log,
                        precision=precision, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=1, val_check_interval=3,
                        accumulate_grad_batches=accumulate, log_every_n_steps=1, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val)
    return trainer


def read_events(path):
    path = next(path.glob("tb/version_*")) if (path / "tb").is_dir() else path
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc
