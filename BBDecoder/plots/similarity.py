"""Figures of ``get_sim``: the values of one call, and their course over calls."""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from . import MAX_WIDTH_IN, new_figure, shorten

BAR_ROWS = 120
"""Layers per column of the similarity bar chart."""
LEGEND_LAYERS = 12
"""Above this many layers the trend figure colours lines by layer order instead of a legend."""

_AXIS_LABELS = {
    "cosine": "mean cosine similarity between slices",
    "abs_cosine": "mean |cosine| between slices",
    "kl_divergence": "mean KL(softmax(h_i) ‖ softmax(h_j))",
}


def _axis_label(method: str) -> str:
    return _AXIS_LABELS.get(method, method)


def similarity_bar_figure(
    labels: Sequence[str], values: Sequence[float], method: str, dim: object, call: int
) -> Figure:
    """One horizontal bar per layer (top to bottom in the requested order), value at its end.

    Up to :data:`BAR_ROWS` layers a column; more layers go into side-by-side columns on
    the same value axis, so the figure stays within the size budget.

    Args:
        labels: ``"ID name"`` per layer.
        values: the layer's mean pairwise similarity.
        method: the measure, for the axis label and range.
        dim: the compared dimension, for the title.
        call: the call number, for the title.

    Returns:
        The figure.
    """
    count = len(labels)
    columns = max(1, math.ceil(count / BAR_ROWS))
    per_column = math.ceil(count / columns) if count else 0
    row_in = 0.3 if per_column <= 60 else 0.2
    figure = new_figure(7.5 if columns == 1 else min(MAX_WIDTH_IN, 3.6 * columns), 1.5 + row_in * per_column)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    finite = [v for v in values if math.isfinite(v)]
    if method in ("cosine", "abs_cosine"):
        low = -1.0 if method == "cosine" and any(v < 0 for v in finite) else 0.0
        limits = (low, 1.12)
    else:
        top = max(finite, default=0.0)
        limits = (0.0, top * 1.18 if top > 0 else 1.0)
    for column, ax in enumerate(axes):
        chunk = range(column * per_column, min(count, (column + 1) * per_column))
        shown = [values[i] for i in chunk]
        positions = list(range(len(shown)))
        colours = ["#c44e52" if v < 0 else "#4c72b0" for v in shown]
        ax.barh(positions, [v if math.isfinite(v) else 0.0 for v in shown], color=colours, height=0.65)
        ax.set_yticks(positions, [shorten(labels[i], 30 if columns > 1 else 48) for i in chunk], fontsize=8)
        ax.set_ylim(len(shown) - 0.5 if shown else 0.5, -0.5)
        ax.set_xlim(*limits)
        span = limits[1] - limits[0]
        for y, v in zip(positions, shown if len(shown) <= 60 else [], strict=False):  # past 60 rows: the axis
            text = f"{v:.4g}" if math.isfinite(v) else "nan"
            x = (v if math.isfinite(v) else 0.0) + (0.01 * span if not v < 0 else -0.01 * span)
            ax.text(x, y, text, va="center", ha="right" if v < 0 else "left", fontsize=7.5)
        ax.axvline(0.0, color="0.3", linewidth=0.8)
        ax.xaxis.set_label_position("top")
        tall = len(shown) > 25
        ax.tick_params(axis="x", top=True, labeltop=True, bottom=tall, labelbottom=tall, labelsize=8)
        ax.set_xlabel(_axis_label(method), fontsize=8.5)
        ax.grid(axis="x", alpha=0.3)
    figure.suptitle(
        f"Feature similarity ({method}) between slices along dim {dim}, call {call}", fontsize=10, x=0.01, ha="left"
    )
    return figure


def similarity_trend_figure(series: dict[tuple[str, str], dict[str, list[tuple[int, float]]]]) -> Figure:
    """Value per layer against call number; one panel per (method, dim) used.

    Args:
        series: ``{(method, dim): {layer label: [(call, value), ...]}}``.

    Returns:
        The figure (an empty note when there is nothing to draw).
    """
    keys = sorted(series)
    panels = max(1, len(keys))
    figure = new_figure(9.5, 0.9 + 2.9 * panels)
    if not keys:
        ax = figure.add_subplot()
        ax.text(0.5, 0.5, "no get_sim calls yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return figure
    axes = figure.subplots(panels, 1, squeeze=False)[:, 0]
    labels = list(dict.fromkeys(label for key in keys for label in series[key]))
    many = len(labels) > LEGEND_LAYERS
    ramp = colormaps["viridis"]
    colours = {  # one colour per layer; many layers: a ramp from the first (dark) to the last (yellow)
        label: ramp(0.92 * index / max(1, len(labels) - 1)) if many else f"C{index % 10}"
        for index, label in enumerate(labels)
    }
    for ax, key in zip(axes, keys, strict=True):
        method, dim = key
        lines = series[key]
        for label, points in lines.items():
            points = sorted(points)
            calls = [c for c, _ in points]
            values = [v for _, v in points]
            ax.plot(
                calls,
                values,
                marker="o" if not many else None,
                markersize=3.5,
                linewidth=1.4 if not many else 0.9,
                label=shorten(label, 40),
                color=colours[label],
            )
        ax.set_ylabel(_axis_label(method), fontsize=9)
        ax.set_title(f"{method} along dim {dim}", fontsize=9.5, loc="left")
        ax.set_xlabel("get_sim call", fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=8)
        if method in ("cosine", "abs_cosine"):
            low, high = ax.get_ylim()
            ax.set_ylim(max(low, -1.05), min(high, 1.05))
        if not many:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if many:
        bar = figure.colorbar(
            ScalarMappable(Normalize(0, len(labels) - 1), ramp), ax=list(axes), location="top", shrink=0.6, aspect=40
        )
        ticks = [0, len(labels) - 1]
        bar.set_ticks(ticks, labels=[shorten(labels[t], 30) for t in ticks], fontsize=8)
        bar.set_label(f"layer, in order ({len(labels)} layers)", fontsize=8)
    figure.suptitle("Feature similarity over calls", fontsize=10, x=0.01, ha="left")
    return figure
