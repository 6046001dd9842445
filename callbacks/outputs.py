"""Where the diagnostics' output goes, decided here once for every logger (the callbacks never
ask which loggers a trainer has):

* **scalars** go to every logger (``log_metrics``);
* **images** are written as ``figures/<tag>.png`` into the run folder (the latest of each tag) and
  go to each logger through its own image call: TensorBoard (an image summary), Weights & Biases
  (``log_image``: media with a step slider), MLflow (``log_image`` with key and step), Comet
  (``log_image``). A ``CSVLogger``, or a logger not listed, has the PNG files;
* **the run's files** (``diagnostics.csv``, ``overview.png``, ``figures/``) are in the run folder
  (:func:`run_folder`), said once at setup, and when training ends they are uploaded to the
  trackers that keep files: the W&B run's files and the MLflow run's artifacts, under ``deepplain/``.

A logger whose call fails (a tracking server gone) is named in one warning and then skipped for
images and files: a diagnostic never stops the fit it watches.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
from lightning.pytorch.loggers import CometLogger, MLFlowLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from PIL import Image

from . import tensorboard
from .messages import warn

FIGURES = "figures"          # the run folder's subfolder of PNG figures
UPLOAD_FOLDER = "deepplain"  # where the run's files go in a tracker's run (W&B files, MLflow artifacts)


# -- the run folder -----------------------------------------------------------------------------------
def run_folder(trainer) -> Optional[Path]:
    """The folder of this run's files, by Lightning's own rule for the first logger's checkpoints (less the
    ``checkpoints/``): ``<save_dir or the trainer's default_root_dir>/<name>/<version>``, which is the
    ``log_dir`` of a TensorBoard or CSV logger and one folder per run for W&B and MLflow (which have no
    ``log_dir``); without a logger, ``trainer.default_root_dir``. None off rank zero."""
    if getattr(trainer, "global_rank", 0) != 0:
        return None
    loggers = list(getattr(trainer, "loggers", None) or [])
    default_root = getattr(trainer, "default_root_dir", None) or os.getcwd()
    if not loggers:
        return Path(default_root)
    first = loggers[0]
    version = first.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(first.save_dir or default_root) / str(first.name) / version


_announced: "weakref.WeakSet" = weakref.WeakSet()


def announce(trainer) -> None:
    """Say once per trainer where the run's files go (rank zero)."""
    if trainer.global_rank != 0 or trainer in _announced:
        return
    _announced.add(trainer)
    folder = run_folder(trainer)
    uploads = [d.place for d in DESTINATIONS for logger in trainer.loggers if d.takes(logger) and d.place]
    also = f"; uploaded at the end to {' and '.join(uploads)}" if uploads else ""
    rank_zero_info(f"deepplain: diagnostics.csv, overview.png and figures/ are written to {folder}{also}")


# -- images and files, logger by logger ---------------------------------------------------------------
class Destination:
    """One kind of logger: how an image reaches it and how the run's files are uploaded to it."""
    name = ""
    place = ""  # where uploaded files are found, for the setup message ("" when nothing is uploaded)

    def takes(self, logger) -> bool:
        raise NotImplementedError

    def image(self, logger, tag: str, image: np.ndarray, png: bytes, step: int) -> None:
        pass

    def upload(self, logger, folder: Path, files: list[Path]) -> None:
        pass


class TensorBoardImages(Destination):
    name = "TensorBoard"

    def takes(self, logger) -> bool:
        return tensorboard.writer_of(logger) is not None

    def image(self, logger, tag, image, png, step):
        tensorboard.write_image(tensorboard.writer_of(logger), tag, image, png, step)


class WandbRun(Destination):
    name, place = "Weights & Biases", "the W&B run's files"

    def takes(self, logger) -> bool:
        return isinstance(logger, WandbLogger)

    def image(self, logger, tag, image, png, step):
        logger.log_image(key=tag, images=[image], step=step)

    def upload(self, logger, folder, files):
        run = logger.experiment
        for path in files:  # copies in the W&B run's own folder: they sync with it (a symlink would not survive)
            copy = Path(run.dir) / UPLOAD_FOLDER / path.relative_to(folder)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
            run.save(str(copy), base_path=run.dir, policy="now")


class MlflowRun(Destination):
    name, place = "MLflow", f"the MLflow run's artifacts ({UPLOAD_FOLDER}/)"

    def takes(self, logger) -> bool:
        return isinstance(logger, MLFlowLogger)

    def image(self, logger, tag, image, png, step):
        logger.experiment.log_image(logger.run_id, image, key=mlflow_key(tag), step=int(step))

    def upload(self, logger, folder, files):
        for path in files:
            where = Path(UPLOAD_FOLDER) / path.relative_to(folder).parent
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=where.as_posix())


class CometExperiment(Destination):
    name, place = "Comet", "the Comet experiment's assets"

    def takes(self, logger) -> bool:
        return isinstance(logger, CometLogger)

    def image(self, logger, tag, image, png, step):
        logger.experiment.log_image(image, name=tag, step=int(step))

    def upload(self, logger, folder, files):
        for path in files:
            logger.experiment.log_asset(str(path), file_name=f"{UPLOAD_FOLDER}/{path.relative_to(folder).as_posix()}")


DESTINATIONS = (TensorBoardImages(), WandbRun(), MlflowRun(), CometExperiment())


def mlflow_key(tag: str) -> str:
    """A tag as MLflow accepts it (alphanumerics, ``_ - . /`` and spaces): ``saturation#2/...`` -> ``saturation-2/...``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "-", tag)


_failed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # logger -> what failed (said once)


def _send(destination: Destination, logger, what: str, call) -> None:
    """One call to one logger; a logger that fails is named once and skipped from then on."""
    if logger in _failed:
        return
    try:
        call()
    except Exception as exc:
        _failed[logger] = what
        text = " ".join(str(exc).split())[:200]
        warn(f"deepplain: the {destination.name} logger could not take {what} ({type(exc).__name__}: {text}); "
             "from now on the run's images and files are only in the run folder")


# -- what the callbacks call --------------------------------------------------------------------------
@rank_zero_only
def log_scalars(trainer, metrics: dict, step: int | None = None) -> None:
    """``metrics`` (name -> number) to every logger of the trainer, at ``step`` (default: the global step)."""
    step = trainer.global_step if step is None else step
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG with fast compression (4x faster than the writer's default for these plots)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def add_image(trainer, tag: str, image: np.ndarray, step: int) -> None:
    """An H x W x 3 uint8 image (see ``figures.to_image``): ``figures/<tag>.png`` in the run folder, and to
    every logger that takes images (rank zero only)."""
    if trainer.global_rank != 0:
        return
    encoded = png_bytes(image)
    folder = run_folder(trainer)
    if folder is not None:
        path = folder / FIGURES / f"{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded)
    for logger in trainer.loggers:
        for destination in DESTINATIONS:
            if destination.takes(logger):
                _send(destination, logger, "images",
                      lambda: destination.image(logger, tag, image, encoded, step))  # noqa: B023 (called at once)


def upload_run_files(trainer, names: tuple) -> list[Path]:
    """Hand the run folder's files (``names`` there and every figure) to every tracker that keeps files
    (rank zero); returns the files."""
    folder = run_folder(trainer)
    if trainer.global_rank != 0 or folder is None or not folder.is_dir():
        return []
    files = [folder / name for name in names if (folder / name).is_file()] + sorted((folder / FIGURES).rglob("*.png"))
    for logger in trainer.loggers:
        for destination in DESTINATIONS:
            if destination.takes(logger) and files:
                _send(destination, logger, "the run's files", lambda: destination.upload(logger, folder, files))  # noqa: B023
    return files
