"""Publishing one sample of per-layer statistics: the tidy table, the depth x time record and its
images, a few summary scalars, the ``overview/`` scalars and, when asked, one scalar per layer.

Used by every diagnostic that measures something per layer (the sampling diagnostics,
``AlphaScheduler``, ``MaxNormConstraint``), so they all read the same way in TensorBoard:

* ``<prefix>/depth_time/<stat>``: an image, layers down, sampled steps across (the sources other
  than the callback's main one insert their name: ``saturation/probe/depth_time/max_abs``);
* ``<prefix>/depth_{min,median,max}/<stat>``: the statistic's quantiles over depth, one scalar each;
* ``<prefix>/<stat>/<layer>`` for every layer only with ``per_layer_scalars=True`` (a 100-layer
  network writes thousands of tags: off by default; every value is in the table and the images);
* ``diagnostics.csv`` in the run folder: ``step, callback, statistic, layer, value``.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import figures
from .outputs import add_image, log_scalars, png_bytes, run_folder, upload_run_files
from .records import DepthTimeRecord, DiagnosticsTable

QUANTILES = {"min": min, "median": statistics.median, "max": max}


@dataclass(frozen=True)
class DepthTimeSpec:
    """How one statistic's depth x time image is drawn."""
    title: str
    scale: str = "linear"                 # "log" for a statistic that spans decades
    vmin: Optional[float] = None
    vmax: Optional[float] = None
    thresholds: dict = field(default_factory=dict)
    cmap: str = "viridis"
    label: str = ""
    inf_label: str = "inf"
    sources: tuple = ()                   # the sources drawn (empty: every source the callback has)


class Publisher:
    """One callback's way out for per-layer statistics (see the module docstring).

    ``depth_time``: the statistics drawn as images (name -> :class:`DepthTimeSpec`); ``summaries``:
    statistic -> the depth quantiles logged as scalars; ``main_source``: the source whose tags carry
    no source name.
    """

    def __init__(self, prefix: str, depth_time: dict[str, DepthTimeSpec], summaries: dict[str, tuple],
                 main_source: str = "train", per_layer_scalars: bool = False,
                 stems: Optional[dict[str, str]] = None, table_only: tuple = ()):
        self.prefix, self.specs, self.summaries = prefix, depth_time, summaries
        self.stems, self.table_only = dict(stems or {}), tuple(table_only)
        self.main_source, self.per_layer_scalars = main_source, bool(per_layer_scalars)
        self.records: dict[str, DepthTimeRecord] = {}
        self.marker_label: dict[str, str] = {}
        self.events: dict[int, str] = {}  # step -> label: a line at that step on every image (the early verdict)
        self.draw_seconds: list[float] = []
        self._drawn_at: dict[str, tuple] = {}
        self.images: dict[str, object] = {}  # tag -> the latest rendered image (for overview.png)

    def base(self, source: str) -> str:
        """The tag stem of a source: ``saturation/probe/`` or, for the main source, ``saturation/``."""
        return f"{self.prefix}/" if source == self.main_source else f"{self.prefix}/{source}/"

    def per_layer_base(self, source: str) -> str:
        """The stem of per-layer tags and table statistics (``stems``, kept as each callback always
        wrote them; default :meth:`base`)."""
        return self.stems.get(source, self.base(source))

    def publish(self, trainer, step: int, source: str, stats: dict[str, dict[str, float]], note: str = "",
                extra_scalars: Optional[dict] = None, record: Optional[dict] = None) -> None:
        """One sample: ``stats`` is layer -> statistic -> value (what was measured: the table);
        ``record``, if given, what the depth x time images show at this step (every layer's latest
        value when a sample covers a subset); ``note`` marks the column and adds a table row (e.g. the
        probe used batch statistics); ``extra_scalars`` (overview and the like) are logged with it.
        The statistics in ``table_only`` get no scalars (raw condition numbers: inf is dropped by
        TensorBoard; their log10 is logged)."""
        if trainer.global_rank != 0 or not stats:
            return
        by_stat = _by_stat(stats)
        stem = self.per_layer_base(source)
        table = DiagnosticsTable.shared(trainer)
        if table is not None:
            for stat, values in by_stat.items():
                table.write(step, self.prefix, stem[len(self.prefix) + 1:] + stat, values)
            if note:
                table.write(step, self.prefix, stem[len(self.prefix) + 1:] + note, {"": 1.0})
        shown = by_stat if record is None else _by_stat(record)
        history = self.records.setdefault(source, DepthTimeRecord())
        for stat, spec in self.specs.items():
            if stat in shown and (not spec.sources or source in spec.sources):
                history.add(stat, step, shown[stat], note, None if record is None else set(by_stat.get(stat, ())))
        scalars = dict(extra_scalars or {})
        base = self.base(source)
        for stat, quantiles in self.summaries.items():
            finite = [v for v in by_stat.get(stat, {}).values() if math.isfinite(v)]
            if finite:
                scalars.update({f"{base}depth_{q}/{stat}": QUANTILES[q](finite) for q in quantiles})
        if self.per_layer_scalars:
            scalars.update({f"{stem}{stat}/{layer}": v for stat, values in by_stat.items()
                            if stat not in self.table_only for layer, v in values.items() if math.isfinite(v)})
        log_scalars(trainer, scalars, step)

    def image_tag(self, source: str, stat: str) -> str:
        return f"{self.base(source)}depth_time/{stat}"

    def draw(self, trainer, step: int) -> None:
        """Draw (or redraw, grown) every depth x time image that has new columns since it was last drawn."""
        if trainer.global_rank != 0:
            return
        start = time.perf_counter()
        for source, record in self.records.items():
            for stat, spec in self.specs.items():
                layers, steps, data, measured, notes = record.matrix(stat)
                if not steps or self._drawn_at.get(f"{source}/{stat}") == (len(steps), len(self.events)):
                    continue
                self._drawn_at[f"{source}/{stat}"] = (len(steps), len(self.events))
                marked = [bool(n) for n in notes]
                events = [(min(range(len(steps)), key=lambda i: abs(steps[i] - at)), label)
                          for at, label in self.events.items() if steps[0] <= at <= steps[-1]]
                where = "" if source == self.main_source else f" ({source})"
                image = figures.depth_time(data, layers, steps, f"{spec.title}{where}", scale=spec.scale,
                                           vmin=spec.vmin, vmax=spec.vmax, thresholds=spec.thresholds, cmap=spec.cmap,
                                           marked=marked, marker_label=self.marker_label.get(source, ""),
                                           colorbar_label=spec.label, measured=measured, inf_label=spec.inf_label,
                                           events=events)
                self.images[self.image_tag(source, stat)] = image
                add_image(trainer, self.image_tag(source, stat), image, step)
        self.draw_seconds.append(time.perf_counter() - start)

    def columns(self) -> int:
        return max((len(r) for r in self.records.values()), default=0)

    def layout(self) -> dict:
        """Custom Scalars charts: the depth quantiles of each summarised statistic (and the per-layer
        lines when they are logged)."""
        charts = {}
        for stat in self.summaries:
            charts[f"{stat} over depth"] = f"{self.prefix}/([a-z]+/)?depth_[a-z]+/{stat}$"
            if self.per_layer_scalars:
                charts[f"{stat} per layer"] = f"{self.prefix}/([a-z]+/)?{stat}/.*"
        return charts


def _by_stat(stats: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """layer -> statistic -> value, turned into statistic -> layer -> value."""
    out: dict[str, dict[str, float]] = {}
    for layer, row in stats.items():
        for stat, value in row.items():
            out.setdefault(stat, {})[layer] = float(value)
    return out


OVERVIEW = "overview.png"


def publishing_callbacks(trainer) -> list:
    """The trainer's callbacks that publish per-layer statistics (each has a :class:`Publisher`), in order."""
    return [cb for cb in trainer.callbacks if isinstance(getattr(cb, "publisher", None), Publisher)]


def finish_run_files(trainer, caller) -> Optional[Path]:
    """At the end of training, however it ended: ``overview.png`` in the run folder, then the run's files
    uploaded to the trackers that keep files (``outputs.upload_run_files``). Done by the last callback with a
    publisher (after the others drew theirs); returns overview.png's path, if one was written."""
    owners = publishing_callbacks(trainer)
    if trainer.global_rank != 0 or not owners or owners[-1] is not caller:
        return None
    path = write_overview(trainer, owners)
    upload_run_files(trainer, (DiagnosticsTable.FILENAME, OVERVIEW))
    return path


def write_overview(trainer, owners: list) -> Optional[Path]:
    """``overview.png`` in the run folder: the key depth x time images of every callback in ``owners`` (those
    its ``overview_images`` names), in the callbacks' order, two per row, for reading a run without TensorBoard."""
    folder = run_folder(trainer)
    if folder is None:
        return None
    tags = [(cb.publisher, cb.publisher.image_tag(source, stat)) for cb in owners
            for source, stats in getattr(cb, "overview_images", {}).items() for stat in stats]
    chosen = [publisher.images[tag] for publisher, tag in tags if tag in publisher.images]
    if not chosen:
        return None
    height, width = max(i.shape[0] for i in chosen), max(i.shape[1] for i in chosen)
    tiles = [np.pad(i, ((0, height - i.shape[0]), (0, width - i.shape[1]), (0, 0)), constant_values=255)
             for i in chosen]
    if len(tiles) % 2:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.concatenate([np.concatenate(tiles[i:i + 2], axis=1) for i in range(0, len(tiles), 2)], axis=0)
    path = folder / OVERVIEW
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(grid))
    return path
