"""TensorBoard's own parts: image summaries, histograms and the Custom Scalars layout.

How an image or a scalar reaches each logger (TensorBoard among them) is decided in
``deepplain.callbacks.outputs``. Nothing is stored on the trainer: the custom-scalars layout is
rebuilt from the callbacks the trainer holds, so any number of deepplain callbacks share one layout.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .tags import overview_charts

# Custom Scalars opens on these, before the diagnostics' own sections: how the network is doing,
# then what the run optimises. Regexes over the tags deepplain's modules and Lightning write.
TRAINING_CHARTS = {"loss": r"(train|val|test)/loss.*", "accuracy": r"(train|val|test)/acc.*",
                   "learning rate": r"lr-.*"}


def writer_of(logger) -> Optional[object]:
    """The logger's SummaryWriter when it is a TensorBoard logger (one that takes images and layouts), else None."""
    experiment = getattr(logger, "experiment", None)
    kind = type(experiment)  # class attributes: Lightning's DummyExperiment answers any attribute on instances
    if callable(getattr(kind, "add_image", None)) and callable(getattr(kind, "add_custom_scalars", None)):
        return experiment
    return None


def tensorboard_writers(trainer) -> list:
    """The SummaryWriter of each TensorBoard logger (rank zero only; empty elsewhere)."""
    if trainer.global_rank != 0:
        return []
    return [w for w in map(writer_of, trainer.loggers) if w is not None]


def write_image(writer, tag: str, image: np.ndarray, png: bytes, step: int) -> None:
    """An image summary of the already encoded ``png`` (encoding once for every destination)."""
    # Only here: the callbacks also log to loggers without TensorBoard (CSVLogger), where it need not be installed.
    from tensorboard.compat.proto.summary_pb2 import Summary
    file_writer = getattr(writer, "_get_file_writer", None)
    if not callable(file_writer):
        writer.add_image(tag, image, global_step=step, dataformats="HWC")
        return
    value = Summary.Value(tag=tag, image=Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3,
                                                       encoded_image_string=png))
    file_writer().add_summary(Summary(value=[value]), step)


HISTOGRAM_LIMIT = 1e20  # the outermost edge of TensorBoard's histogram buckets: values beyond fall in none


def add_histogram(trainer, tag: str, values, step: int) -> None:
    """The histogram of the values TensorBoard's buckets hold: finite and within +-1e20 (it refuses NaN and
    inf, and a histogram whose values all lie beyond its buckets is "empty" and stops the fit it is written in:
    seen on exploded 50-layer nets); nothing when none is left: the table and the images show those."""
    values = torch.as_tensor(values).detach().flatten().double()
    values = values[torch.isfinite(values) & (values.abs() <= HISTOGRAM_LIMIT)]
    if not values.numel():
        return
    for writer in tensorboard_writers(trainer):
        writer.add_histogram(tag, values, global_step=step)


def write_layout(trainer, caller) -> None:
    """Write one custom-scalars layout with the charts of every callback that has a
    ``tensorboard_layout()`` method; only the first such callback writes it, so it is written once.

    Order: ``overview`` (each callback's ``overview_scalars``, ``tags.overview_charts``), ``training`` (loss, accuracy,
    learning rate), then each callback's own section."""
    providers = [cb for cb in trainer.callbacks if callable(getattr(cb, "tensorboard_layout", None))]
    if not providers or providers[0] is not caller:
        return
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    layout: dict = {"overview": {}, "training": {}}
    for cb in providers:
        layout["overview"].update(overview_charts(getattr(cb, "overview_scalars", ())))
    layout["training"].update(TRAINING_CHARTS)
    for cb in providers:
        for category, charts in cb.tensorboard_layout().items():
            layout.setdefault(category, {}).update(charts)
    layout = {category: {title: ["Multiline", [regex]] for title, regex in charts.items()}
              for category, charts in layout.items() if charts}
    for writer in writers:
        writer.add_custom_scalars(layout)
