"""Writing to the trainer's loggers: scalars to every logger, images and layouts to TensorBoard.

Images go to every TensorBoard logger; a logger without images (a ``CSVLogger``) gets them as PNG
files in its folder, ``<log_dir>/figures/<tag>.png`` (the latest of each tag). Nothing is stored on
the trainer: the custom-scalars layout is rebuilt from the callbacks the trainer holds, so any
number of deepplain callbacks share one layout.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

# Custom Scalars opens on these, before the diagnostics' own sections: how the network is doing,
# then what the run optimises. Regexes over the tags deepplain's modules and Lightning write.
TRAINING_CHARTS = {"loss": r"(train|val|test)/loss.*", "accuracy": r"(train|val|test)/acc.*",
                   "learning rate": r"lr-.*"}


@rank_zero_only
def log_scalars(trainer, metrics: dict, step: int | None = None) -> None:
    """``metrics`` (name -> number) to every logger of the trainer, at ``step`` (default: the global step)."""
    step = trainer.global_step if step is None else step
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)


def tensorboard_writers(trainer) -> list:
    """The SummaryWriter of each TensorBoard logger (rank zero only; empty elsewhere)."""
    if trainer.global_rank != 0:
        return []
    writers = []
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        kind = type(experiment)  # class attributes: Lightning's DummyExperiment answers any attribute on instances
        if callable(getattr(kind, "add_image", None)) and callable(getattr(kind, "add_custom_scalars", None)):
            writers.append(experiment)
    return writers


def png_folders(trainer) -> list[Path]:
    """The log folders of the loggers that cannot take images (rank zero only)."""
    if trainer.global_rank != 0:
        return []
    folders = []
    for logger in trainer.loggers:
        kind = type(getattr(logger, "experiment", None))
        if not callable(getattr(kind, "add_image", None)) and getattr(logger, "log_dir", None):
            folders.append(Path(logger.log_dir) / "figures")
    return folders


def png_bytes(image: np.ndarray) -> bytes:
    """PNG with fast compression (4x faster than the writer's default for these plots)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def add_image(trainer, tag: str, image: np.ndarray, step: int) -> None:
    """An H x W x 3 uint8 image (see ``figures.to_image``) to every TensorBoard logger, and as
    ``figures/<tag>.png`` into the folder of every logger that takes no images."""
    writers, folders = tensorboard_writers(trainer), png_folders(trainer)
    if not writers and not folders:
        return
    encoded = png_bytes(image)
    for folder in folders:
        path = folder / f"{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded)
    if not writers:
        return
    # Only here: the callbacks also log to loggers without TensorBoard (CSVLogger), where it need not be installed.
    from tensorboard.compat.proto.summary_pb2 import Summary
    value = Summary.Value(tag=tag, image=Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3,
                                                       encoded_image_string=encoded))
    for writer in writers:
        file_writer = getattr(writer, "_get_file_writer", None)
        if callable(file_writer):
            file_writer().add_summary(Summary(value=[value]), step)
        else:
            writer.add_image(tag, image, global_step=step, dataformats="HWC")


def add_histogram(trainer, tag: str, values, step: int) -> None:
    """The finite values' histogram (TensorBoard refuses NaN and inf, and an empty histogram stops the fit it
    is written in); nothing when no value is finite: the table and the images show those."""
    values = torch.as_tensor(values).detach().flatten()
    values = values[torch.isfinite(values)]
    if not values.numel():
        return
    for writer in tensorboard_writers(trainer):
        writer.add_histogram(tag, values, global_step=step)


def write_layout(trainer, caller) -> None:
    """Write one custom-scalars layout with the charts of every callback that has a
    ``tensorboard_layout()`` method; only the first such callback writes it, so it is written once.

    Order: ``overview`` (each callback's ``overview_charts()``), ``training`` (loss, accuracy,
    learning rate), then each callback's own section."""
    providers = [cb for cb in trainer.callbacks if callable(getattr(cb, "tensorboard_layout", None))]
    if not providers or providers[0] is not caller:
        return
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    layout: dict = {"overview": {}, "training": {}}
    for cb in providers:
        charts = cb.overview_charts() if callable(getattr(cb, "overview_charts", None)) else {}
        layout["overview"].update(charts)
    layout["training"].update(TRAINING_CHARTS)
    for cb in providers:
        for category, charts in cb.tensorboard_layout().items():
            layout.setdefault(category, {}).update(charts)
    layout = {category: {title: ["Multiline", [regex]] for title, regex in charts.items()}
              for category, charts in layout.items() if charts}
    for writer in writers:
        writer.add_custom_scalars(layout)
