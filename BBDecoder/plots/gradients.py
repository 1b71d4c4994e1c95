"""Figures of gradient statistics: flow chart, per-layer norm curves, cross-epoch heatmap.

Each function takes plain arrays and returns a ``matplotlib.figure.Figure``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from . import new_figure

MEAN_COLOR = "#1f5fa8"
MAX_COLOR = "#f2a541"
L1_COLOR = "#1f5fa8"
L2_COLOR = "#c0392b"
PROBLEM_COLOR = "#c0392b"
MISSING_COLOR = "#7f7f7f"
_STATUS_COLOR = {
    "ok": "black",
    "zero": PROBLEM_COLOR,
    "nonfinite": PROBLEM_COLOR,
    "missing": MISSING_COLOR,
    "frozen": MISSING_COLOR,
}
_MAX_HEATMAP_COLUMNS = 1500
_MAX_LINE_POINTS = 1500


def _log_limits(values: np.ndarray) -> tuple[float, float]:
    """Log-axis limits that hold every positive finite value with a margin."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return 1e-12, 1.0
    low, high = float(positive.min()), float(positive.max())
    low_exp, high_exp = math.log10(low) - 0.4, math.log10(high) + 0.4
    if high_exp - low_exp < 2:  # show at least two decades
        middle = (high_exp + low_exp) / 2
        low_exp, high_exp = middle - 1, middle + 1
    return 10.0**low_exp, 10.0**high_exp


def gradient_flow_figure(
    labels: Sequence[str],
    mean_abs: np.ndarray,
    max_abs: np.ndarray,
    status: Sequence[str],
    *,
    notes: Sequence[str] | None = None,
    title: str = "Gradient flow",
    vanish_threshold: float | None = None,
    explode_threshold: float | None = None,
) -> Figure:
    """A pair of horizontal bars per parameter tensor on a log axis that holds every bar.

    Args:
        labels: ``"ID name.param"`` per tensor, drawn top to bottom in the given order.
        mean_abs: mean |g| averaged over the epoch, per tensor (NaN: unknown).
        max_abs: max |g| over the epoch, per tensor.
        status: ``"ok"``, ``"zero"``, ``"nonfinite"``, ``"missing"`` or ``"frozen"``;
            anything but ``ok`` is marked in red/grey beside the bars and on the label.
        notes: short text per tensor shown right of the bars (defaults to the status).
        title: figure title.
        vanish_threshold: drawn as a dashed line when it falls inside the axis.
        explode_threshold: likewise.

    Returns:
        The figure.
    """
    n = len(labels)
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    max_abs = np.asarray(max_abs, dtype=np.float64)
    notes = list(notes) if notes is not None else ["" if s == "ok" else s for s in status]
    longest = max((len(label) for label in labels), default=10)
    figure = new_figure(min(4.0 + 0.075 * longest + 6.5, 16.0), max(3.0, 0.3 * n + 1.6))
    axes = figure.add_subplot()
    low, high = _log_limits(np.concatenate([mean_abs, max_abs]))
    rows = np.arange(n)
    drawable_max = np.where(np.isfinite(max_abs) & (max_abs > 0), max_abs, np.nan)
    drawable_mean = np.where(np.isfinite(mean_abs) & (mean_abs > 0), mean_abs, np.nan)
    # bars start at the axis' left edge so a log axis never cuts them
    axes.barh(rows - 0.19, drawable_max - low, left=low, height=0.38, color=MAX_COLOR, label="max |grad| (epoch max)")
    axes.barh(
        rows + 0.19, drawable_mean - low, left=low, height=0.38, color=MEAN_COLOR, label="mean |grad| (epoch average)"
    )
    axes.set_xscale("log")
    axes.set_xlim(low, high)
    axes.set_ylim(n - 0.5, -0.5)
    axes.set_yticks(rows, labels, fontsize=8)
    for tick, state in zip(axes.get_yticklabels(), status, strict=True):
        tick.set_color(_STATUS_COLOR.get(state, "black"))
    text_at = blended_transform_factory(axes.transAxes, axes.transData)
    for row, (state, note) in enumerate(zip(status, notes, strict=True)):
        if state == "ok" and not note:
            continue
        color = _STATUS_COLOR.get(state, PROBLEM_COLOR)
        marker = {"zero": "0", "nonfinite": "!", "missing": "–", "frozen": "❄"}.get(state, "·")
        if state != "ok":
            axes.plot([low], [row], marker="x" if state in ("zero", "nonfinite") else "o", color=color, ms=6, mew=2)
        axes.text(1.01, row, f"{marker} {note}", transform=text_at, va="center", fontsize=7.5, color=color)
    for value, name, style in ((vanish_threshold, "vanish", ":"), (explode_threshold, "explode", "--")):
        if value is not None and low < value < high:
            axes.axvline(value, color=PROBLEM_COLOR, linestyle=style, linewidth=1, label=f"{name} threshold {value:g}")
    axes.grid(axis="x", which="major", alpha=0.3)
    axes.set_xlabel("|gradient| (log scale)")
    figure.suptitle(title, x=0.01, ha="left")
    handles, names = axes.get_legend_handles_labels()
    if any(state != "ok" for state in status):
        handles.append(Line2D([], [], marker="x", color=PROBLEM_COLOR, linestyle="", mew=2))
        names.append("zero or NaN/Inf gradient")
        handles.append(Line2D([], [], marker="o", color=MISSING_COLOR, linestyle=""))
        names.append("no gradient (frozen / unused)")
    figure.legend(handles, names, loc="outside lower center", ncol=min(len(handles), 3), fontsize=8)
    return figure


@dataclass
class NormPanel:
    """One layer's L1 and L2 norm per recorded iteration (NaN: no gradient)."""

    label: str
    iterations: np.ndarray
    l1: np.ndarray
    l2: np.ndarray
    note: str = ""


def norm_curves_figure(panels: Sequence[NormPanel], *, title: str, skipped: Sequence[int] = ()) -> Figure:
    """Small multiples: L1 and L2 of each layer's gradient over the iterations, log y.

    More than 1500 iterations are drawn as a binned geometric mean with a min-max band.
    Non-finite norms must be given as ``inf`` (NaN means "no gradient": a gap) and are
    marked with a red cross at the top of the panel; iterations a
    GradScaler skipped get a faint red line.

    Args:
        panels: one per layer, drawn left to right, top to bottom.
        title: figure title.
        skipped: iterations to mark.

    Returns:
        The figure.
    """
    count = max(len(panels), 1)
    cols = min(4, count)
    rows = math.ceil(count / cols)
    figure = new_figure(3.4 * cols + 0.6, 2.3 * rows + 0.9)
    grid = figure.add_gridspec(rows, cols)
    first = None
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(grid[index // cols, index % cols], sharex=first)
        first = first or axes
        its = np.asarray(panel.iterations)
        few = len(its) <= 40
        finite_any = False
        for values, color, name in ((panel.l1, L1_COLOR, "L1"), (panel.l2, L2_COLOR, "L2")):
            values = np.asarray(values, dtype=np.float64)
            shown = np.where(np.isfinite(values) & (values > 0), values, np.nan)
            finite_any |= bool(np.isfinite(shown).any())
            if len(its) > _MAX_LINE_POINTS:  # long epochs: binned geometric mean, min-max band
                x, middle, low, high = _envelope(its, shown)
                axes.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
                axes.plot(x, middle, color=color, linewidth=1.0, label=name)
            else:
                axes.plot(its, shown, color=color, linewidth=1.1, marker="." if few else None, ms=4, label=name)
        bad = np.isinf(np.asarray(panel.l2, dtype=np.float64))
        if finite_any:
            axes.set_yscale("log")
        marks = blended_transform_factory(axes.transData, axes.transAxes)
        if bad.any():
            axes.plot(its[bad], np.full(int(bad.sum()), 0.95), "x", color=PROBLEM_COLOR, mew=2, transform=marks)
        zero = (np.asarray(panel.l2) == 0) & ~bad
        if zero.any():
            axes.plot(its[zero], np.full(int(zero.sum()), 0.05), "v", color=PROBLEM_COLOR, transform=marks)
        for it in skipped:  # a line, not a span: visible however long the epoch
            axes.axvline(it, color=PROBLEM_COLOR, alpha=0.3, linewidth=2)
        note = panel.note
        if not note and not finite_any:
            l2 = np.asarray(panel.l2, dtype=np.float64)
            note = "all-zero gradient" if (l2 == 0).any() else "no finite gradient" if bad.any() else "no gradient"
        if note:
            color = PROBLEM_COLOR if "zero" in note or "finite" in note else MISSING_COLOR
            axes.text(0.5, 0.5, note, transform=axes.transAxes, ha="center", va="center", color=color, fontsize=9)
        if not finite_any:
            axes.set_yticks([])
        axes.set_title(panel.label, fontsize=9, loc="left")
        axes.tick_params(which="both", labelsize=7)
        axes.grid(alpha=0.3, which="major")
    handles = [
        Line2D([], [], color=L1_COLOR, label="L1 norm"),
        Line2D([], [], color=L2_COLOR, label="L2 norm"),
        Line2D([], [], marker="x", color=PROBLEM_COLOR, linestyle="", mew=2, label="NaN/Inf"),
        Line2D([], [], marker="v", color=PROBLEM_COLOR, linestyle="", label="zero"),
    ]
    if len(skipped):
        handles.append(Line2D([], [], color=PROBLEM_COLOR, alpha=0.3, linewidth=2, label="step skipped by GradScaler"))
    figure.legend(handles=handles, loc="outside upper right", ncol=len(handles), fontsize=8)
    figure.suptitle(title, x=0.01, ha="left")
    figure.supxlabel("iteration", fontsize=9)
    return figure


def _envelope(x: np.ndarray, y: np.ndarray, bins: int = 600) -> tuple[np.ndarray, ...]:
    """Per bin of consecutive points: mean x, geometric mean, min and max of ``y`` (NaN ignored)."""
    edges = np.linspace(0, len(x), bins + 1).astype(int)
    centers, middle, low, high = (np.full(bins, np.nan) for _ in range(4))
    for b in range(bins):
        xs, ys = x[edges[b] : edges[b + 1]], y[edges[b] : edges[b + 1]]
        centers[b] = xs.mean()
        ys = ys[np.isfinite(ys)]
        if ys.size:
            middle[b], low[b], high[b] = np.exp(np.log(ys).mean()), ys.min(), ys.max()
    return centers, middle, low, high


def _bin_columns(matrix: np.ndarray, iterations: np.ndarray, epochs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Shrink wide matrices for display: geometric mean of finite values per bin.

    A bin is marked non-finite (inf) if any member is, zero if all finite members are 0.
    """
    width = matrix.shape[1]
    if width <= _MAX_HEATMAP_COLUMNS:
        return matrix, iterations, epochs
    edges = np.linspace(0, width, _MAX_HEATMAP_COLUMNS + 1).astype(int)
    out = np.full((matrix.shape[0], _MAX_HEATMAP_COLUMNS), np.nan)
    for b in range(_MAX_HEATMAP_COLUMNS):
        block = matrix[:, edges[b] : edges[b + 1]].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(np.isfinite(block) & (block > 0), np.log(block), np.nan)
            counts = np.isfinite(logs).sum(axis=1)
            mean = np.exp(np.nansum(logs, axis=1) / np.maximum(counts, 1))
        mean = np.where(counts > 0, mean, np.nan)
        zero = (block == 0).any(axis=1) & (counts == 0)
        mean = np.where(zero, 0.0, mean)
        bad = np.isinf(block).any(axis=1)
        out[:, b] = np.where(bad, np.inf, mean)
    return out, iterations[edges[:-1]], epochs[edges[:-1]]


def gradient_heatmap_figure(
    matrix: np.ndarray,
    layer_labels: Sequence[str],
    iterations: np.ndarray,
    epochs: np.ndarray,
    *,
    title: str = "Per-layer gradient L2 norm",
) -> Figure:
    """Layers × iterations heatmap of log10 L2 norms, epoch boundaries marked.

    NaN cells (layer not recorded) are light grey, non-finite norms (inf) red, exact
    zeros black; very wide histories are binned to at most 1500 columns.

    Args:
        matrix: ``(layers, iterations)`` L2 norms.
        layer_labels: ``"ID name"`` per row.
        iterations: the global iteration number of each column.
        epochs: the epoch of each column.
        title: figure title.

    Returns:
        The figure.
    """
    matrix, iterations, epochs = _bin_columns(np.asarray(matrix, dtype=np.float64), iterations, epochs)
    rows, width = matrix.shape
    figure = new_figure(12.0, max(2.8, 0.26 * rows + 1.8))
    axes = figure.add_subplot()
    with np.errstate(divide="ignore"):
        logs = np.where(np.isfinite(matrix) & (matrix > 0), np.log10(np.where(matrix > 0, matrix, 1.0)), np.nan)
    finite = logs[np.isfinite(logs)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-8.0, 0.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cmap = colors.ListedColormap(_viridis()).with_extremes(bad="#dddddd")
    shown = np.ma.masked_invalid(logs)
    extent = (-0.5, width - 0.5, rows - 0.5, -0.5)
    image = axes.imshow(shown, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", extent=extent)
    overlay = np.zeros((rows, width, 4))
    overlay[np.isinf(matrix)] = colors.to_rgba(PROBLEM_COLOR)
    overlay[matrix == 0] = (0, 0, 0, 1)
    axes.imshow(overlay, aspect="auto", interpolation="nearest", extent=extent)
    axes.set_yticks(np.arange(rows), layer_labels, fontsize=8)
    ticks, tick_labels = _iteration_ticks(np.asarray(iterations))
    axes.set_xticks(ticks, tick_labels, fontsize=8)
    axes.set_xlabel("iteration")
    changes = np.flatnonzero(np.diff(epochs)) + 1 if width else np.array([], int)
    for start in changes:
        axes.axvline(start - 0.5, color="white", linewidth=1.5)
    label_at = blended_transform_factory(axes.transData, axes.transAxes)
    starts = np.concatenate([[0], changes]) if width else []
    if len(starts) <= 30:
        for start in starts:
            axes.text(start, 1.01, f"ep {int(epochs[start])}", transform=label_at, fontsize=7, va="bottom")
    colorbar = figure.colorbar(image, ax=axes, pad=0.01)
    colorbar.set_label("log10 L2 norm of the layer's gradient")
    handles = [
        Patch(color="#dddddd", label="not recorded / no gradient"),
        Patch(color=PROBLEM_COLOR, label="NaN/Inf"),
        Patch(color="black", label="zero"),
    ]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.09), ncol=3, fontsize=8, frameon=False)
    axes.set_title(title, pad=14)
    return figure


def _iteration_ticks(iterations: np.ndarray) -> tuple[list[int], list[str]]:
    """Columns where round iteration numbers (multiples of 1, 2, 5 × 10^k) first appear."""
    if iterations.size == 0:
        return [], []
    values = MaxNLocator(nbins=10, integer=True, steps=[1, 2, 5, 10]).tick_values(iterations[0], iterations[-1])
    columns: list[int] = []
    for value in values:
        column = int(np.searchsorted(iterations, value))
        if column < iterations.size and iterations[0] <= value <= iterations[-1] and column not in columns:
            columns.append(column)
    return columns, [str(int(iterations[c])) for c in columns]


def _viridis() -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0, 1, 256))
