"""Bar charts of the cost of each layer: FLOPs (forward and backward) and forward time."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from ..summary import printable
from . import new_figure

_FORWARD = "#3b75af"
_BACKWARD = "#ef8636"


def _si(value: float, unit: str) -> str:
    """``1.23 MFLOP``: three significant digits and an SI prefix."""
    for power, prefix in ((12, "T"), (9, "G"), (6, "M"), (3, "k")):
        if abs(value) >= 10**power:
            return f"{value / 10**power:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _height(count: int) -> float:
    return float(np.clip(1.2 + 0.32 * count, 2.6, 40.0))


def _label_bars(
    axes: Axes,
    values: Sequence[float],
    positions: np.ndarray,
    total: float,
    text: Callable[[float], str],
    *,
    ends: np.ndarray | None = None,
) -> None:
    """Write ``text(value)`` and its share of ``total`` just right of each positive bar.

    ``ends``: where each label starts (default: the bar's end; a whisker's end for times).
    """
    for value, y, end in zip(values, positions, values if ends is None else ends, strict=True):
        if value <= 0:
            continue
        share = f" ({100 * value / total:.0f}%)" if total > 0 else ""
        axes.annotate(
            f"{text(value)}{share}",
            (end, y),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )


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
    count = len(labels)
    figure = new_figure(9.0, _height(count))
    axes = figure.add_subplot(1, 1, 1)
    y = np.arange(count, dtype=float)
    height = 0.4
    total_fwd, total_bwd = float(total_forward), float(total_backward)
    axes.barh(y - height / 2, forward, height, color=_FORWARD, label=f"forward (total {_si(total_fwd, 'FLOP')})")
    axes.barh(y + height / 2, backward, height, color=_BACKWARD, label=f"backward (total {_si(total_bwd, 'FLOP')})")
    _label_bars(axes, [float(v) for v in forward], y - height / 2, total_fwd, _flop_text)
    _label_bars(axes, [float(v) for v in backward], y + height / 2, total_bwd, _flop_text)
    peak = float(max([*forward, *backward, 1]))
    _finish(axes, labels, y, "FLOPs (multiply and add counted as 2)", peak, title, EngFormatter(unit="", sep=""))
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
    count = len(labels)
    figure = new_figure(9.0, _height(count))
    axes = figure.add_subplot(1, 1, 1)
    y = np.arange(count, dtype=float)
    median = np.asarray(median_ms, dtype=float)
    high = np.asarray(high_ms, dtype=float)
    errors = np.vstack([median - np.asarray(low_ms, dtype=float), high - median])
    axes.barh(y, median, 0.6, color=_FORWARD, label="median forward time")
    axes.errorbar(
        median,
        y,
        xerr=np.clip(errors, 0, None),
        fmt="none",
        ecolor="#333333",
        capsize=2,
        lw=0.8,
        label="25th–75th percentile",
    )
    _label_bars(axes, median.tolist(), y, float(whole_ms), lambda ms: f"{ms:.3g} ms", ends=high)
    peak = float(max(np.max(high) if count else 0.0, 1e-6))
    _finish(axes, labels, y, "forward time per layer (ms)", peak, title)
    return figure


def _flop_text(value: float) -> str:
    return _si(value, "FLOP")


def _finish(
    axes: Axes,
    labels: Sequence[str],
    y: np.ndarray,
    xlabel: str,
    peak: float,
    title: str,
    formatter: EngFormatter | None = None,
) -> None:
    """Layer labels top to bottom, the x axis up to ``peak`` plus room for the bar labels, legend, title."""
    axes.set_xlim(0, peak * 1.35)
    axes.legend(loc="lower right", fontsize=8, frameon=False)
    axes.set_title(title, fontsize=10)
    axes.set_yticks(y)
    axes.set_yticklabels([printable(label) for label in labels], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    if formatter is not None:
        axes.xaxis.set_major_formatter(formatter)
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
