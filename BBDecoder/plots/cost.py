"""Bar charts of the cost of each layer: FLOPs (forward and backward) and forward time.

Up to :data:`MAX_ROWS` layers every layer gets a row; beyond, the :data:`TOP_ROWS` costliest
are drawn in model order and the rest summed into one row (every number is in
``layer_costs.csv``). The legend and the value axis sit at the top; each row's numbers and
shares of the model's total stand in one aligned column right of the bars.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter
from matplotlib.transforms import blended_transform_factory

from ..summary import printable
from . import bar_figure, row_labels, shorten, text_column

_FORWARD = "#3b75af"
_BACKWARD = "#ef8636"
_OTHERS = "#98a2b3"
MAX_ROWS = 70
"""Most layers drawn one row each."""
TOP_ROWS = 60
"""Layers kept past :data:`MAX_ROWS` (the costliest); the others share one row."""
_ROW_IN = 0.27


def _si(value: float, unit: str) -> str:
    """``1.23 MFLOP``: three significant digits and an SI prefix."""
    for power, prefix in ((12, "T"), (9, "G"), (6, "M"), (3, "k")):
        if abs(value) >= 10**power:
            return f"{value / 10**power:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def keep_rows(weights: Sequence[float], limit: int = MAX_ROWS, top: int = TOP_ROWS) -> tuple[list[int], list[int]]:
    """Rows to draw (model order) and rows summed into "others": all when at most ``limit``."""
    count = len(weights)
    if count <= limit:
        return list(range(count)), []
    order = np.argsort(-np.asarray(weights, dtype=float), kind="stable")
    kept = sorted(int(i) for i in order[:top])
    chosen = set(kept)
    return kept, [i for i in range(count) if i not in chosen]


def _share(value: float, total: float) -> str:
    return f" ({100 * value / total:.0f}%)" if total > 0 and value > 0 else ""


def _value_column(axes: Axes, texts: Sequence[str]) -> None:
    """Each row's numbers in one aligned column right of the bars (a few texts, not one per bar)."""
    side = blended_transform_factory(axes.transAxes, axes.transData)
    text_column(axes, 1.01, list(texts), row_pt=_ROW_IN * 72, default="0.15", size=7.5, transform=side)


def flops_figure(
    labels: Sequence[str],
    forward: Sequence[int],
    backward: Sequence[int],
    *,
    total_forward: int,
    total_backward: int,
    title: str,
) -> Figure:
    """Horizontal grouped bars: forward and backward FLOPs of each layer, first layer on top.

    Args:
        labels: one label per layer (``"3 layer1"``).
        forward: forward FLOPs per layer.
        backward: backward FLOPs per layer.
        total_forward: the whole model's forward FLOPs (shares are of this total; nested
            layers at depth > 1 would make the bars add up to more).
        total_backward: the whole model's backward FLOPs.
        title: the figure's title.

    Returns:
        The figure; each bar is labelled with its value and its share of the model's total.
    """
    kept, others = keep_rows([float(f) + float(b) for f, b in zip(forward, backward, strict=True)])
    shown = [printable(labels[i]) for i in kept]
    fwd = [float(forward[i]) for i in kept]
    bwd = [float(backward[i]) for i in kept]
    if others:
        shown.append(f"{len(others)} other layers (sum)")
        fwd.append(float(sum(forward[i] for i in others)))
        bwd.append(float(sum(backward[i] for i in others)))
    count = len(shown)
    total_fwd, total_bwd = float(total_forward), float(total_backward)
    handles = [
        Patch(color=_FORWARD, label=f"forward (total {_si(total_fwd, 'FLOP')})"),
        Patch(color=_BACKWARD, label=f"backward (total {_si(total_bwd, 'FLOP')})"),
    ]
    if others:
        handles.append(Patch(color=_OTHERS, label="the other layers, summed"))
    note = f"\n{len(kept)} costliest of {len(labels)} layers; every layer in layer_costs.csv" if others else ""
    longest = max((len(label) for label in shown), default=8)
    figure, axes = bar_figure(count, title + note, handles, row_in=_ROW_IN, longest_label=min(longest, 48), right=2.4)
    y = np.arange(count, dtype=float)
    height = 0.4
    bars = axes.barh(y - height / 2, fwd, height, color=_FORWARD)
    back = axes.barh(y + height / 2, bwd, height, color=_BACKWARD)
    if others:
        bars[-1].set_color(_OTHERS)
        back[-1].set_color(_OTHERS)
    limit = float(max([*fwd[: len(kept)], *bwd[: len(kept)], 1])) * 1.05
    _value_column(
        axes,
        [
            f"{_flop_text(f)}{_share(f, total_fwd)} · {_flop_text(b)}{_share(b, total_bwd)}"
            + (" →" if max(f, b) > limit else "")
            for f, b in zip(fwd, bwd, strict=True)
        ],
    )
    _finish(axes, shown, y, "FLOPs (multiply and add counted as 2)", limit, EngFormatter(unit="", sep=""))
    return figure


def time_figure(
    labels: Sequence[str],
    median_ms: Sequence[float],
    low_ms: Sequence[float],
    high_ms: Sequence[float],
    *,
    whole_ms: float,
    title: str,
) -> Figure:
    """Horizontal bars of each layer's median forward time; whiskers span the 25th–75th percentile.

    Args:
        labels: one label per layer.
        median_ms: median forward time per layer, in milliseconds.
        low_ms: 25th percentile of the repeats per layer.
        high_ms: 75th percentile of the repeats per layer.
        whole_ms: median time of the whole forward pass (shares are of this).
        title: the figure's title.

    Returns:
        The figure.
    """
    kept, others = keep_rows([float(m) for m in median_ms])
    shown = [printable(labels[i]) for i in kept]
    median = np.asarray([float(median_ms[i]) for i in kept], dtype=float)
    low = np.asarray([float(low_ms[i]) for i in kept], dtype=float)
    high = np.asarray([float(high_ms[i]) for i in kept], dtype=float)
    if others:
        rest = float(sum(median_ms[i] for i in others))
        shown.append(f"{len(others)} other layers (sum of medians)")
        median, low, high = np.append(median, rest), np.append(low, rest), np.append(high, rest)
    count = len(shown)
    handles = [
        Patch(color=_FORWARD, label="median forward time"),
        Line2D([], [], color="#333333", marker="|", lw=0.8, label="25th–75th percentile"),
    ]
    if others:
        handles.append(Patch(color=_OTHERS, label="the other layers, summed"))
    note = f"\n{len(kept)} slowest of {len(labels)} layers; every layer in layer_costs.csv" if others else ""
    longest = max((len(label) for label in shown), default=8)
    figure, axes = bar_figure(count, title + note, handles, row_in=_ROW_IN, longest_label=min(longest, 48), right=1.3)
    y = np.arange(count, dtype=float)
    errors = np.vstack([median - low, high - median])
    bars = axes.barh(y, median, 0.6, color=_FORWARD)
    if others:
        bars[-1].set_color(_OTHERS)
    axes.errorbar(median, y, xerr=np.clip(errors, 0, None), fmt="none", ecolor="#333333", capsize=2, lw=0.8)
    kept_high = high[: len(kept)]
    limit = float(max(np.max(kept_high) if len(kept_high) else 0.0, 1e-6)) * 1.05
    whole = float(whole_ms)
    _value_column(
        axes, [f"{m:.3g} ms{_share(m, whole)}" + (" →" if h > limit else "") for m, h in zip(median, high, strict=True)]
    )
    _finish(axes, shown, y, "forward time per layer (ms)", limit)
    return figure


def _flop_text(value: float) -> str:
    return _si(value, "FLOP")


def _finish(
    axes: Axes,
    labels: Sequence[str],
    y: np.ndarray,
    xlabel: str,
    limit: float,
    formatter: EngFormatter | None = None,
) -> None:
    """Layer labels top to bottom; the x axis up to ``limit`` at the top (and the bottom of long charts)."""
    axes.set_xlim(0, limit)
    row_labels(axes, [shorten(label, 48) for label in labels], row_in=_ROW_IN)
    axes.set_ylim(len(labels) - 0.5, -0.5)
    tall = len(labels) > 25
    axes.xaxis.set_label_position("top")
    axes.tick_params(axis="x", top=True, labeltop=True, bottom=tall, labelbottom=tall, labelsize=8)
    axes.set_xlabel(xlabel, fontsize=9)
    if formatter is not None:
        axes.xaxis.set_major_formatter(formatter)
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)
    for side in ("right",) if tall else ("bottom", "right"):
        axes.spines[side].set_visible(False)
