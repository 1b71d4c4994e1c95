"""Figures that overlay several runs: one small panel per layer, one line per run.

Each function takes plain arrays and returns a ``matplotlib.figure.Figure``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from . import new_figure

PANELS_PER_FIGURE = 24
_MAX_POINTS = 1500


def run_colors(count: int) -> list[str]:
    """A distinct colour per run (tab10), as hex strings."""
    palette = colormaps["tab10"]
    return [colors.to_hex(palette(i % 10)) for i in range(count)]


@dataclass
class Series:
    """One run's curve in a panel (``x`` and ``y`` of equal length; NaN: a gap)."""

    x: np.ndarray
    y: np.ndarray
    style: str = "-"


@dataclass
class OverlayPanel:
    """One layer: a list of curves per run (empty: the run has no data for it)."""

    label: str
    series: list[list[Series]] = field(default_factory=list)
    note: str = ""


def overlay_figure(
    panels: Sequence[OverlayPanel],
    run_names: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log: bool = True,
    ylim: tuple[float, float] | None = None,
    guide: float | None = None,
    styles: Sequence[tuple[str, str]] = (),
) -> Figure:
    """Small multiples, one per layer, each overlaying the runs in their colours.

    Args:
        panels: one per layer (at most :data:`PANELS_PER_FIGURE` are drawn).
        run_names: the runs, in the order of each panel's ``series``.
        title: figure title.
        xlabel: x-axis label (shared).
        ylabel: y-axis label (shared).
        log: log y axis (non-positive values are not drawn).
        ylim: fixed y limits (e.g. ``(0, 1)`` for fractions).
        guide: a horizontal dashed guide line (e.g. 1e-3 for update ratios).
        styles: ``(line style, meaning)`` pairs for the legend (e.g. ``("--", "saturated")``).

    Returns:
        The figure.
    """
    panels = list(panels)[:PANELS_PER_FIGURE]
    count = max(len(panels), 1)
    cols = min(4, count)
    rows = math.ceil(count / cols)
    height = 2.3 * rows + 1.1
    width = 2.6 * cols + 0.6  # at most 11 inches: shown near full size in a page column
    figure = new_figure(width, height)
    # a fixed layout: constrained layout would cost more than drawing the curves (many small panels)
    figure.set_layout_engine("none")
    grid = figure.add_gridspec(
        rows, cols, left=0.75 / width, right=0.98, bottom=0.65 / height, top=1 - 0.75 / height, hspace=0.5, wspace=0.25
    )
    palette = run_colors(len(run_names))
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(grid[index // cols, index % cols])
        drawn = False
        for run, curves in enumerate(panel.series):
            for curve in curves:
                x, y = _thin(np.asarray(curve.x, dtype=np.float64), np.asarray(curve.y, dtype=np.float64))
                if log:
                    y = np.where(np.isfinite(y) & (y > 0), y, np.nan)
                if not np.isfinite(y).any():
                    continue
                few = len(x) <= 30
                axes.plot(
                    x, y, curve.style, color=palette[run], linewidth=1.1, marker="." if few else None, ms=3, alpha=0.9
                )
                drawn = True
        if log and drawn:
            axes.set_yscale("log")
        if ylim is not None:
            axes.set_ylim(*ylim)
        if guide is not None and drawn:
            axes.axhline(guide, color="black", linestyle="--", linewidth=0.8)
        if not drawn:
            axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center", color="#7f7f7f")
            axes.set_yticks([])
        if panel.note:
            axes.text(
                0.02, 0.96, panel.note, transform=axes.transAxes, ha="left", va="top", fontsize=7, color="#c0392b"
            )
        axes.set_title(panel.label, fontsize=9, loc="left", y=1.0)
        axes.tick_params(which="both", labelsize=7)
        axes.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        axes.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=color, linewidth=2, label=name) for color, name in zip(palette, run_names, strict=True)
    ]
    handles += [Line2D([], [], color="black", linestyle=style, label=meaning) for style, meaning in styles]
    figure.legend(
        handles=handles,
        loc="upper right",
        bbox_to_anchor=(0.99, 1 - 0.05 / height),
        ncol=min(len(handles), 6),
        fontsize=8,
    )
    figure.suptitle(title, x=0.01, y=1 - 0.08 / height, ha="left", va="top")
    figure.supxlabel(xlabel, fontsize=9, y=0.08 / height, va="bottom")
    figure.supylabel(ylabel, fontsize=9, x=0.05 / width, ha="left")
    return figure


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most 1500 points: every n-th one (keeps the curves' look, cheap to draw)."""
    if len(x) <= _MAX_POINTS:
        return x, y
    step = math.ceil(len(x) / _MAX_POINTS)
    return x[::step], y[::step]
