"""Figures of ``visualize_weight_hist``: one call's histograms, and their course over calls."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..analyses.weights import SATURATION
from ..summary import printable
from . import new_figure, spread

if TYPE_CHECKING:
    from ..analyses.weights import LayerHistograms, ParamHistogram

MAX_COLUMNS = 4
MAX_RIDGES = 40
RIDGE_BINS = 80
_FILL = "#4c72b0"
_SATURATED = "#c44e52"


def panel_layout(names: Sequence[str], max_columns: int = MAX_COLUMNS) -> tuple[list[tuple[int, int]], int, int]:
    """Grid cells for parameter panels, keeping the tensors of one submodule together.

    Parameters are grouped by their owner (``"0.conv1"`` for ``"0.conv1.weight"``); a
    group goes on the current row if it fits, else starts a new one. Of the column counts
    up to ``max_columns``, the one with the fewest rows plus half the empty cells wins.

    Returns:
        ``(cells, rows, columns)`` with ``cells[i] = (row, column)`` of ``names[i]``.
    """
    if not names:
        return [], 0, 1
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(name.rpartition(".")[0], []).append(index)

    def place(columns: int) -> tuple[list[tuple[int, int]], int]:
        cells: list[tuple[int, int]] = [(0, 0)] * len(names)
        row, column = 0, 0
        for group in groups.values():
            if column and column + len(group) > columns:
                row, column = row + 1, 0
            for index in group:
                if column == columns:
                    row, column = row + 1, 0
                cells[index] = (row, column)
                column += 1
        return cells, row + 1

    widest = min(max_columns, len(names))
    options = []
    for columns in range(1, widest + 1):
        cells, rows = place(columns)
        options.append((rows * columns - len(names), rows, columns, cells))
    _, rows, columns, cells = min(options, key=lambda o: o[1] + 0.5 * o[0])
    return cells, rows, columns


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3g}"


def _shape(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _draw_param(ax: Axes, p: ParamHistogram) -> None:
    counts = np.asarray(p.counts, dtype=float)
    edges = np.asarray(p.edges, dtype=float)
    ax.stairs(counts, edges, fill=True, color=_FILL, alpha=0.75, linewidth=0)
    ax.stairs(counts, edges, color=_FILL, linewidth=0.8)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(0, max(1.0, counts.max()) * 1.55)  # headroom for the statistics box
    if p.finite and p.abs_max > 0:
        threshold = SATURATION * p.abs_max
        for lo, hi in ((-p.abs_max, -threshold), (threshold, p.abs_max)):
            if hi >= edges[0] and lo <= edges[-1]:
                ax.axvspan(lo, hi, color=_SATURATED, alpha=0.25, linewidth=0)
    if edges[0] < 0 < edges[-1]:
        ax.axvline(0, color="0.35", linewidth=0.6)
    if math.isfinite(p.mean):
        ax.axvline(p.mean, color="k", linestyle="--", linewidth=0.8)
    lines = [
        f"μ {_fmt(p.mean)}  σ {_fmt(p.std)}",
        f"min {_fmt(p.min)}  max {_fmt(p.max)}",
        f"zeros {100 * p.zeros_fraction:.3g}%  "
        + ("constant" if p.finite and p.min == p.max else f"sat {100 * p.saturation_fraction:.3g}%"),
        f"n {p.numel:,}" + (f"  non-finite {p.nonfinite:,}" if p.nonfinite else ""),
    ]
    ax.text(
        0.98,
        0.97,
        "\n".join(lines),
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=7,
        family="monospace",
        color=_SATURATED if p.nonfinite else "0.1",
        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.8"},
    )
    ax.set_title(f"{printable(p.name)}  [{_shape(p.shape)}]", fontsize=8.5, loc="left")
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))


def weight_histogram_figure(layer: LayerHistograms) -> Figure:
    """One panel per parameter tensor of the layer: histogram and statistics.

    The dashed line is the mean, red bands are the saturation zones
    (``|w| >= 0.99 max|w|``).

    Args:
        layer: the call's histograms of one layer.

    Returns:
        The figure.
    """
    params = layer.params
    cells, rows, columns = panel_layout([p.name for p in params])
    figure = new_figure(3.5 * columns + 0.3, 2.5 * rows + 0.5)
    grid = figure.add_gridspec(rows, columns)
    for p, (row, column) in zip(params, cells, strict=True):
        ax = figure.add_subplot(grid[row, column])
        _draw_param(ax, p)
        if column == 0:
            ax.set_ylabel("count", fontsize=8)
    figure.suptitle(
        f"Weights of layer {layer.layer_id} {printable(layer.layer_name)} ({layer.layer_type}), call {layer.call}"
        f"  —  dashed: mean, red: |w| ≥ {SATURATION:g}·max|w|",
        fontsize=10,
    )
    return figure


def rebin(edges: np.ndarray, counts: np.ndarray, new_edges: np.ndarray) -> np.ndarray:
    """Counts of a histogram moved onto ``new_edges``, each bin's mass spread evenly over its width."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(counts, dtype=float))])
    return np.diff(np.interp(new_edges, np.asarray(edges, dtype=float), cumulative))


def weight_evolution_figure(history: Sequence[LayerHistograms]) -> Figure:
    """Ridge plot per parameter tensor: one histogram per call, earliest at the bottom.

    Each ridge is scaled to its own peak; colour runs from dark (first call) to yellow
    (latest). With more than ``MAX_RIDGES`` calls an even selection is drawn.

    Args:
        history: the layer's results, oldest first (the latest defines the panels).

    Returns:
        The figure.
    """
    latest = history[-1]
    names = [p.name for p in latest.params]
    shapes = {p.name: p.shape for p in latest.params}
    cells, rows, columns = panel_layout(names)
    chosen = [history[i] for i in spread(len(history), MAX_RIDGES)]
    cmap = colormaps["viridis"]
    figure = new_figure(3.6 * columns + 0.3, (2.2 + 0.12 * len(chosen)) * rows + 0.5)
    grid = figure.add_gridspec(rows, columns)
    for name, (row, column) in zip(names, cells, strict=True):
        ax = figure.add_subplot(grid[row, column])
        ridges = []
        for record in chosen:
            match = next((p for p in record.params if p.name == name and p.shape == shapes[name]), None)
            if match is not None:
                ridges.append((record.call, match))
        low = min(float(p.edges[0]) for _, p in ridges)
        high = max(float(p.edges[-1]) for _, p in ridges)
        grid_edges = np.linspace(low, high, RIDGE_BINS + 1)
        for level in range(len(ridges) - 1, -1, -1):  # top first, so lower ridges overlap it
            _, p = ridges[level]
            counts = rebin(p.edges, p.counts, grid_edges)
            height = counts / counts.max() * 1.6 if counts.max() > 0 else counts
            colour = cmap(level / max(1, len(ridges) - 1) * 0.9)
            ax.stairs(level + height, grid_edges, baseline=level, fill=True, color=colour, alpha=0.85, zorder=2 * level)
            ax.stairs(level + height, grid_edges, baseline=level, color="0.15", linewidth=0.5, zorder=2 * level + 1)
        ticks = spread(len(ridges), 8)
        ax.set_yticks(ticks, [f"call {ridges[i][0]}" for i in ticks], fontsize=7)
        ax.set_ylim(-0.2, len(ridges) + 1.0)
        ax.set_xlim(low, high)
        ax.tick_params(axis="x", labelsize=7)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
        ax.set_title(f"{printable(name)}  [{_shape(shapes[name])}]", fontsize=8.5, loc="left")
    figure.suptitle(
        f"Weight evolution of layer {latest.layer_id} {printable(latest.layer_name)} ({latest.layer_type}), "
        f"{len(history)} call(s)" + (f", {len(chosen)} drawn" if len(chosen) < len(history) else ""),
        fontsize=10,
    )
    return figure
