"""Figures for the diagnostics, drawn with ``matplotlib.figure.Figure`` and the Agg canvas.

No pyplot and no global state: importing or drawing never changes the user's matplotlib
backend, and a figure is garbage once rendered to an RGB array.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

_PLAIN = FuncFormatter(lambda value, _: f"{value:g}")  # plain labels: log-axis mathtext costs ~40% of a figure


def new_figure(width: float = 7.0, height: float = 3.6, dpi: int = 72) -> Figure:
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
        ax.plot(np.arange(1, len(values) + 1), shown, marker="o" if len(values) <= 40 else None, markersize=2.5,
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


def depth_profile(series: dict[str, list[float]], title: str, ylabel: str = "", log_y: bool = False,
                  thresholds: Optional[dict[str, float]] = None) -> Figure:
    """Value against layer index, one line per series (the PlainNet paper's Fig. 2/4/5/A1).

    Infinite values are drawn as red crosses on the top edge rather than dropped; NaN is a gap.
    """
    return depth_profiles([(series, ylabel, log_y, thresholds)], title)


def depth_profiles(panels: list[tuple], title: str) -> Figure:
    """Several depth profiles side by side in one figure (cheaper to render than one figure each).

    ``panels``: ``(series, ylabel, log_y, thresholds)`` tuples, as :func:`depth_profile` takes.
    """
    fig = new_figure(4.2 * len(panels) + 1.0, 3.4)
    for index, (series, ylabel, log_y, thresholds) in enumerate(panels, start=1):
        _plot_series(fig.add_subplot(1, len(panels), index), series, ylabel, log_y, thresholds)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.88, wspace=0.3)  # fixed: tight_layout is slow
    return fig


def unit_heatmap(matrix: np.ndarray, title: str, max_side: int = 256) -> Figure:
    """Units' responses over the probe batch (samples x units), the PlainNet paper's Fig. 6-8.

    At most ``max_side`` evenly spaced samples and units are shown: the image has no more pixels."""
    matrix = np.asarray(matrix)
    rows = np.linspace(0, matrix.shape[0] - 1, min(max_side, matrix.shape[0])).round().astype(int)
    cols = np.linspace(0, matrix.shape[1] - 1, min(max_side, matrix.shape[1])).round().astype(int)
    matrix = matrix[np.ix_(rows, cols)]
    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    image = ax.imshow(np.asarray(matrix, dtype=float).T, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("probe row (sample, position or token)")
    ax.set_ylabel("unit")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)
    return fig
