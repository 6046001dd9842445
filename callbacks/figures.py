"""Figures for the diagnostics, drawn with ``matplotlib.figure.Figure`` and the Agg canvas.

No pyplot and no global state: importing or drawing never changes the user's matplotlib
backend, and a figure is garbage once rendered to an RGB array.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from matplotlib import colormaps, font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from PIL import Image, ImageDraw, ImageFont

_PLAIN = FuncFormatter(lambda value, _: f"{value:g}")  # plain labels: log-axis mathtext costs ~40% of a figure


DPI = 100  # readable in a TensorBoard card at its default size


def new_figure(width: float = 7.0, height: float = 3.6, dpi: int = DPI) -> Figure:
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def to_image(figure: Figure) -> np.ndarray:
    """The rendered figure as an H x W x 3 uint8 array."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _plot_series(ax, series: dict, ylabel: str, log_y: bool, thresholds: Optional[dict]) -> None:
    for label, values in series.items():
        values = np.asarray(values, dtype=float)
        shown = np.where(np.isfinite(values), values, np.nan)
        if log_y:
            shown = np.where(shown > 0, shown, np.nan)
        sparse = np.isfinite(shown).sum() <= 40  # few points (or a rotating sample's): markers, not a line alone
        ax.plot(np.arange(1, len(values) + 1), shown, marker="o" if sparse else None, markersize=2.5,
                linewidth=1.0, label=label)
        inf_idx = np.nonzero(np.isinf(values))[0]
        if inf_idx.size:  # infinite values are drawn as red crosses on the top edge, not dropped
            top = np.nanmax(shown) if np.isfinite(shown).any() else 1.0
            ax.plot(inf_idx + 1, np.full(inf_idx.size, top), "x", color="red", label=f"{label}: inf")
    for name, value in (thresholds or {}).items():
        ax.axhline(value, linestyle="--", linewidth=0.8, color="gray")
        ax.annotate(name, (1, value), fontsize=7, color="gray")
    if log_y and np.isfinite(ax.dataLim.bounds).all():
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PLAIN)
        ax.yaxis.set_minor_locator(LogLocator(subs=[]))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("layer index", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(fontsize=7)


def depth_profiles(panels: list[tuple], title: str) -> Figure:
    """Depth profiles (value against layer index: the PlainNet paper's Fig. 2/4/5/A1) side by side in
    one figure, one line per series (the first, middle and last samples).

    ``panels``: ``(series, ylabel, log_y, thresholds)`` tuples; ``series`` maps a label to one value
    per layer. Infinite values are drawn as red crosses on the top edge rather than dropped; NaN is
    a gap.
    """
    width = 3.3 * len(panels) + 0.6
    fig = new_figure(width, 3.2)
    for index, (series, ylabel, log_y, thresholds) in enumerate(panels, start=1):
        _plot_series(fig.add_subplot(1, len(panels), index), series, ylabel, log_y, thresholds)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.45 / width * 1.5, right=1 - 0.1 / width, bottom=0.16, top=0.86,
                        wspace=0.32)  # fixed margins: tight_layout is slow
    return fig


def depth_time(data: np.ndarray, layers: list[str], steps: list[int], title: str, **options) -> np.ndarray:
    """A layers x samples image of one statistic, as an H x W x 3 uint8 array: depth down the rows
    (input at the top), sampled steps along the columns (the run's evolution), one cell per value.
    ``options``: those of :func:`heat_image`."""
    return heat_image(data, [str(i) for i in range(len(layers))], [str(step) for step in steps], title,
                      row_title="layer", column_title="training step (one column per sample)", **options)


def heat_image(data: np.ndarray, row_labels: list[str], column_labels: list[str], title: str,
               row_title: str = "", column_title: str = "", scale: str = "linear",
               vmin: Optional[float] = None, vmax: Optional[float] = None,
               thresholds: Optional[dict[str, float]] = None, cmap: str = "viridis",
               marked: Optional[list[bool]] = None, marker_label: str = "", colorbar_label: str = "",
               measured: Optional[np.ndarray] = None, inf_label: str = "inf",
               events: Optional[list[tuple[int, str]]] = None) -> np.ndarray:
    """A matrix as a labelled heat map with a colour bar, as an H x W x 3 uint8 array.

    ``scale``: "linear" or "log" (a statistic that spans decades). Values outside [vmin, vmax] take
    the colour map's ends; +inf is drawn black and a measured NaN magenta (both named in the
    legend, the black as ``inf_label``); a cell not measured at its sample (``measured`` False;
    default: every non-NaN cell) is drawn faded when it holds a value measured earlier (a layer a
    rotating sample skipped) and white when it holds none.
    ``thresholds`` (name -> value) are red lines on the colour bar; ``marked`` columns get an orange
    triangle above them (``marker_label`` says what it means); ``events`` ``[(column, label)]`` are dashed
    blue lines through their columns, named in the legend (the early verdict).

    Drawn with PIL rather than matplotlib (10 ms against 200 ms): these images are redrawn during
    the run, inside the diagnostics' time budget.
    """
    data = np.asarray(data, dtype=float).reshape(len(row_labels), len(column_labels))
    measured = ~np.isnan(data) if measured is None else np.asarray(measured, dtype=bool)
    colours = colormaps[cmap]
    lo, hi, unit = _colour_scale(data, scale, vmin, vmax)
    rgb, held = _cell_colours(data, measured, colours, unit)
    legend = _legend_entries(data, measured, held, inf_label, marked, marker_label, events)
    frame = _Frame.for_rows(data.shape[0])
    lines = _legend_lines(legend, frame.small, frame.width - 20)
    canvas = Image.new("RGB", (frame.width, frame.top + frame.plot_h + 52 + 24 * len(lines)), "white")
    if data.size:
        canvas.paste(Image.fromarray(rgb).resize((frame.plot_w, frame.plot_h), Image.NEAREST), (frame.left, frame.top))
    draw = ImageDraw.Draw(canvas)
    _draw_axes(draw, frame, title, row_labels, column_labels, row_title, column_title)
    _draw_marks(draw, frame, len(column_labels), marked, events)
    _draw_colour_bar(canvas, draw, frame, colours, lo, hi, unit, scale, colorbar_label, thresholds)
    _draw_legend(draw, frame, lines, frame.top + frame.plot_h + 60)
    return np.asarray(canvas)


def _colour_scale(data: np.ndarray, scale: str, vmin: Optional[float], vmax: Optional[float]):
    """``(lo, hi, unit)``: the colour scale's ends and the map of a value onto [0, 1] (linear or log10)."""
    finite = data[np.isfinite(data)]
    if scale == "log":
        positive = finite[finite > 0]
        lo = vmin if vmin is not None else (float(positive.min()) if positive.size else 1e-3)
        hi = vmax if vmax is not None else (float(positive.max()) if positive.size else 1.0)
        hi = max(hi, lo * 10)

        def unit(v):
            with np.errstate(divide="ignore", invalid="ignore"):
                return (np.log10(np.where(v > 0, v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        return lo, hi, unit
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    hi = hi if hi > lo else lo + 1.0

    def unit(v):
        return (v - lo) / (hi - lo)
    return lo, hi, unit


def _cell_colours(data: np.ndarray, measured: np.ndarray, colours, unit) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's colour (+inf black, a measured NaN magenta, a held value faded, nothing white), and which
    cells hold a value measured at an earlier sample."""
    rgb = (colours(np.clip(np.nan_to_num(unit(data), nan=0.0), 0, 1))[..., :3] * 255).astype(np.uint8)
    held = ~measured & np.isfinite(data)
    rgb[held] = (0.35 * rgb[held] + 0.65 * 255).astype(np.uint8)
    rgb[~measured & ~held] = 255
    rgb[np.isnan(data) & measured] = (230, 0, 230)
    rgb[np.isposinf(data)] = 0
    return rgb, held


def _legend_entries(data, measured, held, inf_label: str, marked, marker_label: str, events) -> list:
    """``(colour, label)`` of what the image shows: only the kinds of cell and mark it has."""
    legend = [((0, 0, 0), inf_label)] if np.isposinf(data).any() else []
    legend += [((230, 0, 230), "NaN")] if (np.isnan(data) & measured).any() else []
    legend += [((255, 127, 14), marker_label)] if marked and any(marked) and marker_label else []
    legend += [((31, 119, 180), label) for _, label in events or []]
    legend += [((205, 205, 205), "held: measured earlier")] if held.any() else []
    legend += [((255, 255, 255), "not measured")] if (~measured & ~held).any() else []
    return legend


@dataclass(frozen=True)
class _Frame:
    """Where the plot sits on the canvas. Sized for a TensorBoard card (its image is about 330 px wide): 490 px
    with 16-17 px type stays legible there."""
    plot_h: int
    plot_w: int = 280
    left: int = 58
    top: int = 56
    right: int = 152

    @classmethod
    def for_rows(cls, rows: int) -> "_Frame":
        return cls(plot_h=int(min(420, max(150, rows * max(3, min(12, 360 // max(1, rows)))))))

    @property
    def width(self) -> int:
        return self.left + self.plot_w + self.right

    @property
    def small(self):
        return _font(16)

    @property
    def normal(self):
        return _font(17)


def _draw_axes(draw, frame: _Frame, title: str, row_labels, column_labels, row_title: str, column_title: str):
    """The plot's frame, title, tick labels (rows by index: layer 0 is the one nearest the input) and axis titles."""
    left, top, plot_w, plot_h, small = frame.left, frame.top, frame.plot_w, frame.plot_h, frame.small
    rows, cols = len(row_labels), len(column_labels)
    draw.rectangle((left - 1, top - 1, left + plot_w, top + plot_h), outline="black")
    draw.text((frame.width // 2, 6), title, fill="black", font=frame.normal, anchor="mt")
    for r in _tick_positions(rows, 8):
        y = top + (r + 0.5) * plot_h / rows
        draw.line((left - 4, y, left - 1, y), fill="black")
        draw.text((left - 6, y), row_labels[r], fill="black", font=small, anchor="rm")
    for c in _tick_positions(cols, 5):
        x = left + (c + 0.5) * plot_w / cols
        draw.line((x, top + plot_h, x, top + plot_h + 4), fill="black")
        draw.text((x, top + plot_h + 6), column_labels[c], fill="black", font=small, anchor="mt")
    draw.text((left + plot_w // 2, top + plot_h + 26), column_title, fill="black", font=small, anchor="mt")
    draw.text((6, top - 8), row_title, fill="black", font=small, anchor="ls")


def _draw_marks(draw, frame: _Frame, cols: int, marked, events) -> None:
    """An orange triangle above each marked column; a dashed blue line through each event's column."""
    left, top, plot_w, plot_h = frame.left, frame.top, frame.plot_w, frame.plot_h
    for c, flag in enumerate(marked or []):
        if flag:
            x = left + (c + 0.5) * plot_w / cols
            draw.polygon([(x - 5, top - 12), (x + 5, top - 12), (x, top - 3)], fill=(255, 127, 14))
    for c, _ in events or []:
        x = int(left + (c + 0.5) * plot_w / max(cols, 1))
        for y in range(top - 14, top + plot_h + 4, 8):
            draw.line((x, y, x, min(y + 4, top + plot_h + 4)), fill=(31, 119, 180), width=3)


def _draw_colour_bar(canvas, draw, frame: _Frame, colours, lo: float, hi: float, unit, scale: str, label: str,
                     thresholds: Optional[dict[str, float]]) -> None:
    """The colour bar right of the plot, with its ticks, its label and the thresholds as red lines."""
    top, plot_h, small = frame.top, frame.plot_h, frame.small
    bar_x, bar_w = frame.left + frame.plot_w + 12, 14
    ramp = colours(np.linspace(1, 0, plot_h))[:, :3]
    canvas.paste(Image.fromarray((np.repeat(ramp[:, None, :], bar_w, axis=1) * 255).astype(np.uint8)),
                 (bar_x, top))
    draw.rectangle((bar_x - 1, top - 1, bar_x + bar_w, top + plot_h), outline="black")
    draw.text((bar_x, top - 6), label, fill="black", font=small, anchor="ls")
    for value in _bar_ticks(lo, hi, scale):
        y = top + (1 - float(unit(np.array(value)))) * (plot_h - 1)
        draw.line((bar_x + bar_w, y, bar_x + bar_w + 3, y), fill="black")
        draw.text((bar_x + bar_w + 5, y), f"{value:g}", fill="black", font=small, anchor="lm")
    for name, value in (thresholds or {}).items():
        if lo <= value <= hi:
            y = top + (1 - float(unit(np.array(value)))) * (plot_h - 1)
            draw.line((bar_x - 4, y, bar_x + bar_w + 4, y), fill=(220, 0, 0), width=3)
            draw.text((bar_x + bar_w + 58, y), name, fill=(220, 0, 0), font=small, anchor="lm")


def _draw_legend(draw, frame: _Frame, lines: list, y: int) -> None:
    """The legend's lines of ``(colour, label)`` swatches, from height ``y`` down."""
    for line in lines:
        x = 10
        for colour, label in line:
            draw.rectangle((x, y - 6, x + 12, y + 6), fill=colour, outline="black")
            draw.text((x + 17, y), label, fill="black", font=frame.small, anchor="lm")
            x += 32 + int(draw.textlength(label, font=frame.small))
        y += 24


def _legend_lines(entries: list, font, width: int) -> list[list]:
    """The legend's entries wrapped into lines no wider than ``width`` pixels."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line, used = [], [], 0
    for colour, label in entries:
        size = 32 + int(measure.textlength(label, font=font))
        if line and used + size > width:
            lines.append(line)
            line, used = [], 0
        line.append((colour, label))
        used += size
    return lines + ([line] if line else [])


@functools.lru_cache(maxsize=None)
def _font(size: int):
    """DejaVu Sans, which matplotlib ships: the same type as the other figures, on every platform."""
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _tick_positions(count: int, most: int) -> list[int]:
    if count <= 0:
        return []
    shown = min(count, most)
    return sorted({round(i * (count - 1) / max(1, shown - 1)) for i in range(shown)})


def _bar_ticks(lo: float, hi: float, scale: str) -> list[float]:
    if scale == "log":
        decades = list(range(math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9) + 1))
        step = max(1, math.ceil(len(decades) / 8))
        return [10.0 ** d for d in decades[::step]]
    return [float(v) for v in MaxNLocator(5).tick_values(lo, hi) if lo - 1e-12 <= v <= hi + 1e-12]


def unit_heatmap(matrix: np.ndarray, title: str, max_side: int = 256) -> np.ndarray:
    """Units' responses over the probe batch (samples x units), the PlainNet paper's Fig. 6-8, as an
    H x W x 3 uint8 array: units down the rows, probe rows along the columns.

    At most ``max_side`` evenly spaced samples and units are shown: the image has no more pixels."""
    matrix = np.asarray(matrix, dtype=float)
    rows = np.linspace(0, matrix.shape[0] - 1, min(max_side, matrix.shape[0])).round().astype(int)
    cols = np.linspace(0, matrix.shape[1] - 1, min(max_side, matrix.shape[1])).round().astype(int)
    shown = matrix[np.ix_(rows, cols)].T
    return heat_image(shown, [str(c) for c in cols], [str(r) for r in rows], title, row_title="unit",
                      column_title="probe row (sample, position or token)", colorbar_label="response")
