"""Matplotlib figures for the diagnostics (rendered only at sampling steps)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def depth_profile(series: dict[str, list[float]], title: str, ylabel: str = "", log_y: bool = False,
                  thresholds: dict[str, float] | None = None, layer_names: list[str] | None = None):
    """Value against layer index, one line per series (the PlainNet paper's Fig. 2/4/5/A1)."""
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=72)
    for label, values in series.items():
        values = np.asarray(values, dtype=float)
        shown = np.where(np.isfinite(values), values, np.nan)
        ax.plot(np.arange(1, len(values) + 1), shown, marker="o", markersize=2.5, label=label)
        inf_idx = np.nonzero(np.isinf(values))[0]
        if inf_idx.size:  # infinite values are drawn as markers on the top edge, not dropped
            top = np.nanmax(shown) if np.isfinite(np.nanmax(shown)) else 1.0
            ax.plot(inf_idx + 1, np.full(inf_idx.size, top), "x", color="red", label=f"{label}: inf")
    for name, value in (thresholds or {}).items():
        ax.axhline(value, linestyle="--", linewidth=0.8, color="gray")
        ax.annotate(name, (1, value), fontsize=7, color="gray")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("layer index")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1 or any(np.isinf(np.asarray(v, dtype=float)).any() for v in series.values()):
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.9)  # fixed margins: tight_layout is slow
    return fig


def unit_heatmap(matrix: np.ndarray, title: str):
    """Units' responses over the probe batch (samples x units), the PlainNet paper's Fig. 6-8."""
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=72)
    image = ax.imshow(matrix.T, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("probe sample")
    ax.set_ylabel("unit")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)
    return fig
