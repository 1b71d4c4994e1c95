"""Figures of activation health: the per-layer summary of an epoch and the dead/saturated heatmap.

Each function takes plain arrays and returns a ``matplotlib.figure.Figure``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from . import MAX_LONG_SIDE_IN, iteration_ticks, new_figure

STD_COLOR = "#1f5fa8"
MAX_COLOR = "#f2a541"
ZERO_COLOR = "#9e9e9e"
DEAD_COLOR = "#c0392b"
SATURATED_COLOR = "#8e44ad"
PROBLEM_COLOR = "#c0392b"
NOT_RUN_COLOR = "#7f7f7f"
_MAX_COLUMNS = 1500
LABEL_PT = 9.0  # vertical room one 8-pt row label needs


def activation_health_figure(
    labels: Sequence[str],
    stats: Mapping[str, np.ndarray],
    status: Sequence[str],
    *,
    title: str = "Activation health",
    dead_threshold: float | None = None,
    saturated_threshold: float | None = None,
) -> Figure:
    """Per layer (top to bottom): std and max |a| on a log axis; zero, dead and saturated fractions.

    Args:
        labels: ``"ID name"`` per layer.
        stats: epoch values per layer: ``std``, ``max_abs``, ``zero_frac``, ``dead_frac``,
            ``saturated_frac`` (NaN: unknown, or unbounded for ``saturated_frac``).
        status: ``"ok"``, ``"dead"``, ``"saturated"`` or ``"not run"`` per layer; alerted
            layers get a red label.
        title: figure title.
        dead_threshold: drawn as a dashed line on the fractions' axis.
        saturated_threshold: likewise, dotted.

    Returns:
        The figure.
    """
    n = len(labels)
    rows = np.arange(n)
    figure = new_figure(11.0, max(3.0, 0.32 * n + 1.8))
    scale, fractions = figure.subplots(1, 2, sharey=True, width_ratios=[1, 1.2])
    std = np.asarray(stats["std"], dtype=np.float64)
    top = np.asarray(stats["max_abs"], dtype=np.float64)
    positive = np.concatenate([std, top])
    positive = positive[np.isfinite(positive) & (positive > 0)]
    low = float(positive.min()) / 3 if positive.size else 1e-3
    high = float(positive.max()) * 3 if positive.size else 1.0
    drawable = np.where(np.isfinite(std) & (std > 0), std, np.nan)
    scale.barh(rows, drawable - low, left=low, height=0.6, color=STD_COLOR, label="std (epoch average)")
    shown_top = np.where(np.isfinite(top) & (top > 0), top, np.nan)
    scale.plot(shown_top, rows, "D", color=MAX_COLOR, ms=5, label="max |a| (epoch max)", linestyle="")
    scale.set_xscale("log")
    scale.set_xlim(low, high)
    scale.set_xlabel("activation scale (log)")
    scale.set_yticks(rows, labels, fontsize=8)
    scale.set_ylim(n - 0.5, -0.5)
    for tick, state in zip(scale.get_yticklabels(), status, strict=True):
        tick.set_color(
            PROBLEM_COLOR if state in ("dead", "saturated") else NOT_RUN_COLOR if state == "not run" else "black"
        )
    scale.grid(axis="x", alpha=0.3)
    scale.legend(loc="lower right", fontsize=7)

    width = 0.26
    for offset, key, color, name in (
        (-width, "zero_frac", ZERO_COLOR, "exact zeros"),
        (0.0, "dead_frac", DEAD_COLOR, "dead units (0 for the whole batch)"),
        (width, "saturated_frac", SATURATED_COLOR, "saturated (bounded activations)"),
    ):
        values = np.asarray(stats[key], dtype=np.float64)
        fractions.barh(rows + offset, np.nan_to_num(values, nan=0.0), height=width, color=color, label=name)
    text_at = blended_transform_factory(fractions.transAxes, fractions.transData)
    for row, state in enumerate(status):
        if state != "ok":
            color = NOT_RUN_COLOR if state == "not run" else PROBLEM_COLOR
            fractions.text(1.01, row, state, transform=text_at, va="center", fontsize=7.5, color=color)
    if dead_threshold is not None:
        fractions.axvline(dead_threshold, color=DEAD_COLOR, linestyle="--", linewidth=1, label="dead threshold")
    if saturated_threshold is not None:
        fractions.axvline(
            saturated_threshold, color=SATURATED_COLOR, linestyle=":", linewidth=1, label="saturated threshold"
        )
    fractions.set_xlim(0, 1)
    fractions.set_xlabel("fraction (epoch average)")
    fractions.grid(axis="x", alpha=0.3)
    handles, names = fractions.get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", fontsize=7, ncol=min(len(handles), 5))
    figure.suptitle(title, x=0.01, ha="left")
    return figure


def activation_heatmap_figure(
    dead: np.ndarray,
    saturated: np.ndarray,
    layer_labels: Sequence[str],
    iterations: np.ndarray,
    epochs: np.ndarray,
    *,
    title: str = "Dead and saturated fractions",
) -> Figure:
    """Layers × recorded iterations: ``dead_frac`` (and ``saturated_frac`` where any layer is bounded).

    Cells run from 0 (dark) to 1 (bright); NaN cells (not recorded, unbounded) are light
    grey; epoch boundaries are white lines. Wide histories are binned to at most 1500
    columns, keeping each bin's maximum (a dead stretch is never averaged away).

    Args:
        dead: ``(layers, iterations)`` dead fractions.
        saturated: ``(layers, iterations)`` saturated fractions (NaN: unbounded layer).
        layer_labels: ``"ID name"`` per row.
        iterations: the iteration of each column.
        epochs: the epoch of each column.
        title: figure title.

    Returns:
        The figure.
    """
    panels = [("dead units (fraction)", np.asarray(dead, dtype=np.float64))]
    saturated = np.asarray(saturated, dtype=np.float64)
    if np.isfinite(saturated).any():
        keep = np.isfinite(saturated).any(axis=1)
        panels.append(("saturated outputs (fraction), bounded layers", saturated[keep]))
        saturated_labels = [label for label, k in zip(layer_labels, keep, strict=True) if k]
    else:
        saturated_labels = []
    heights = [max(1, m.shape[0]) for _, m in panels]
    chrome = 1.6 * len(panels)
    row_in = min(0.26, (MAX_LONG_SIDE_IN - chrome) / max(sum(heights), 1))  # many layers: thinner rows
    every = max(1, math.ceil(LABEL_PT / (row_in * 72)))  # label every k-th row so labels never overlap
    figure = new_figure(11.0, max(3.0, row_in * sum(heights) + chrome))
    grid = figure.add_gridspec(len(panels), 1, height_ratios=heights)
    cmap = colormaps["magma"].with_extremes(bad="#dddddd")
    for index, (name, matrix) in enumerate(panels):
        axes = figure.add_subplot(grid[index])
        binned, its, eps = _bin_max(matrix, np.asarray(iterations), np.asarray(epochs))
        rows, width = binned.shape
        extent = (-0.5, width - 0.5, rows - 0.5, -0.5)
        image = axes.imshow(
            np.ma.masked_invalid(binned),
            aspect="auto",
            cmap=cmap,
            norm=colors.Normalize(0, 1),
            interpolation="nearest",
            extent=extent,
        )
        labels = layer_labels if index == 0 else saturated_labels
        shown = range(0, rows, every)
        axes.set_yticks(list(shown), [labels[i] for i in shown], fontsize=8)
        ticks, tick_labels = iteration_ticks(its)
        axes.set_xticks(ticks, tick_labels, fontsize=8)
        changes = np.flatnonzero(np.diff(eps)) + 1 if width else np.array([], dtype=int)
        for start in changes:
            axes.axvline(start - 0.5, color="white", linewidth=1.5)
        label_at = blended_transform_factory(axes.transData, axes.transAxes)
        starts = np.concatenate([[0], changes]) if width else []
        if len(starts) <= 30:
            for start in starts:
                axes.text(start, 1.01, f"ep {int(eps[start])}", transform=label_at, fontsize=7, va="bottom")
        figure.colorbar(image, ax=axes, pad=0.01).set_label(name, fontsize=8)
        if index == len(panels) - 1:
            axes.set_xlabel("iteration")
    figure.legend(
        handles=[Patch(color="#dddddd", label="not recorded / unbounded")], loc="outside lower left", fontsize=8
    )
    note = f" (every {every}th of the layers labelled; all in the .npz)" if every > 1 else ""
    figure.suptitle(title + note, x=0.01, ha="left")
    return figure


def _bin_max(matrix: np.ndarray, iterations: np.ndarray, epochs: np.ndarray) -> tuple[np.ndarray, ...]:
    width = matrix.shape[1]
    if width <= _MAX_COLUMNS:
        return matrix, iterations, epochs
    edges = np.linspace(0, width, _MAX_COLUMNS + 1).astype(int)
    out = np.full((matrix.shape[0], _MAX_COLUMNS), np.nan)
    for b in range(_MAX_COLUMNS):
        block = matrix[:, edges[b] : edges[b + 1]]
        seen = np.isfinite(block).any(axis=1)
        out[seen, b] = np.nanmax(block[seen], axis=1)
    return out, iterations[edges[:-1]], epochs[edges[:-1]]
