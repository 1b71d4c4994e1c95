"""Figures of ``get_sim``: the values of one call, and their course over calls."""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.figure import Figure

from . import new_figure

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
    figure = new_figure(7.5, 1.4 + 0.38 * count)
    ax = figure.add_subplot()
    positions = list(range(count))
    finite = [v for v in values if math.isfinite(v)]
    colours = ["#c44e52" if v < 0 else "#4c72b0" for v in values]
    ax.barh(positions, [v if math.isfinite(v) else 0.0 for v in values], color=colours, height=0.65)
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    if method in ("cosine", "abs_cosine"):
        low = -1.0 if method == "cosine" and any(v < 0 for v in finite) else 0.0
        ax.set_xlim(low, 1.12)
    else:
        top = max(finite, default=0.0)
        ax.set_xlim(0.0, top * 1.18 if top > 0 else 1.0)
    span = ax.get_xlim()[1] - ax.get_xlim()[0]
    for y, v in zip(positions, values, strict=True):
        text = f"{v:.4g}" if math.isfinite(v) else "nan"
        x = (v if math.isfinite(v) else 0.0) + (0.01 * span if not v < 0 else -0.01 * span)
        ax.text(x, y, text, va="center", ha="right" if v < 0 else "left", fontsize=8)
    ax.axvline(0.0, color="0.3", linewidth=0.8)
    ax.set_xlabel(_axis_label(method))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Feature similarity ({method}) between slices along dim {dim}, call {call}", fontsize=11)
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
    figure = new_figure(9.0, 0.4 + 3.2 * panels)
    if not keys:
        ax = figure.add_subplot()
        ax.text(0.5, 0.5, "no get_sim calls yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return figure
    axes = figure.subplots(panels, 1, squeeze=False)[:, 0]
    labels = list(dict.fromkeys(label for key in keys for label in series[key]))
    colours = {label: f"C{index % 10}" for index, label in enumerate(labels)}  # one colour per layer
    for ax, key in zip(axes, keys, strict=True):
        method, dim = key
        lines = series[key]
        for label, points in lines.items():
            points = sorted(points)
            calls = [c for c, _ in points]
            values = [v for _, v in points]
            ax.plot(calls, values, marker="o", markersize=3.5, linewidth=1.4, label=label, color=colours[label])
        ax.set_ylabel(_axis_label(method), fontsize=9)
        ax.set_title(f"{method} along dim {dim}", fontsize=10, loc="left")
        ax.set_xlabel("get_sim call", fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if method in ("cosine", "abs_cosine"):
            low, high = ax.get_ylim()
            ax.set_ylim(max(low, -1.05), min(high, 1.05))
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.suptitle("Feature similarity over calls", fontsize=11)
    return figure
