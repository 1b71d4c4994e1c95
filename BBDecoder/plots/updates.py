"""Figures of the update-to-weight ratio ‖Δw‖/‖w‖: per layer over the steps, and each layer's median.

Each function takes plain arrays and returns a ``matplotlib.figure.Figure``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import new_figure

GUIDE_RATIO = 1e-3
PROBLEM_COLOR = "#c0392b"
SMALL_COLOR = "#1f5fa8"
BAND_COLOR = "#2e7d32"
LAYERS_PER_PAGE = 40
_MAX_POINTS = 1500
_LABELLED = 12


def update_ratio_figure(
    labels: Sequence[str],
    steps: np.ndarray,
    ratios: np.ndarray,
    medians: np.ndarray,
    status: Sequence[str],
    *,
    title: str = "Update-to-weight ratio",
    center: float = math.nan,
    far: float = math.nan,
    small: float | None = None,
    large: float | None = None,
) -> Figure:
    """Left: each layer's ratio over the steps (log y, 1e-3 guide). Right: each layer's median against the band.

    Layers flagged ``"large"`` are drawn red, ``"small"`` / ``"not updated"`` blue, and
    named; the others take colours from first to last layer. More than 1500 steps are
    drawn as binned geometric means.

    Args:
        labels: ``"ID name"`` per layer.
        steps: ``(S,)`` step numbers.
        ratios: ``(layers, S)`` ratios (NaN: not recorded; 0 and inf are not drawn).
        medians: each layer's median ratio over the steps.
        status: ``"ok"``, ``"small"``, ``"large"``, ``"not updated"`` or ``"missing"`` per layer.
        title: figure title.
        center: the median over layers of log10 of their medians (NaN: unknown).
        far: the "far" distance in decades around ``center`` (NaN: not applied).
        small: the absolute lower limit, drawn dashed.
        large: the absolute upper limit, drawn dashed.

    Returns:
        The figure.
    """
    n = len(labels)
    figure = new_figure(11.0, max(4.0, min(0.28 * n + 1.8, 16.0)))
    over, per_layer = figure.subplots(1, 2, width_ratios=[1.7, 1])
    steps = np.asarray(steps)
    ratios = np.asarray(ratios, dtype=np.float64).reshape(n, -1)
    palette = colormaps["viridis"](np.linspace(0.0, 0.9, max(n, 1)))
    drawn = []
    for i in range(n):
        values = np.where(np.isfinite(ratios[i]) & (ratios[i] > 0), ratios[i], np.nan)
        x, y = _binned(steps, values)
        flagged = status[i] in ("small", "large", "not updated")
        color = PROBLEM_COLOR if status[i] == "large" else SMALL_COLOR if flagged else palette[i]
        line_width, alpha = (1.8, 1.0) if flagged else (0.9, 0.75)
        marker = "." if len(x) <= 40 else None
        over.plot(x, y, color=color, linewidth=line_width, alpha=alpha, marker=marker, ms=3, label=labels[i])
        drawn.append(np.isfinite(y).any())
    if any(drawn):
        over.set_yscale("log")
    over.axhline(GUIDE_RATIO, color="black", linestyle="--", linewidth=1)
    over.text(0.01, GUIDE_RATIO, " 1e-3 guide", transform=over.get_yaxis_transform(), va="bottom", fontsize=8)
    over.set_xlabel("optimizer step")
    over.set_ylabel("‖Δw‖ / ‖w‖ (log)")
    over.grid(alpha=0.3, which="major")
    flagged_rows = [i for i in range(n) if status[i] in ("small", "large", "not updated")]
    shown = flagged_rows if flagged_rows else list(range(min(n, _LABELLED)))
    if n <= _LABELLED or flagged_rows:
        handles = [
            Line2D([], [], color=over.lines[i].get_color(), linewidth=over.lines[i].get_linewidth()) for i in shown
        ]
        over.legend(handles, [labels[i] for i in shown], fontsize=7, loc="best")

    rows = np.arange(n)
    medians = np.asarray(medians, dtype=np.float64)
    positive = np.where(np.isfinite(medians) & (medians > 0), medians, np.nan)
    if math.isfinite(center) and math.isfinite(far):
        per_layer.axvspan(10 ** (center - far), 10 ** (center + far), color=BAND_COLOR, alpha=0.12, label="not far")
        per_layer.axvline(10**center, color=BAND_COLOR, linewidth=1.2, label="median layer")
    colors_ = [
        PROBLEM_COLOR if s == "large" else SMALL_COLOR if s in ("small", "not updated") else "black" for s in status
    ]
    per_layer.scatter(positive, rows, c=colors_, s=22, zorder=3)
    for value, name in ((small, "small_ratio"), (large, "large_ratio")):
        if value is not None and math.isfinite(value):
            per_layer.axvline(value, color=PROBLEM_COLOR, linestyle=":", linewidth=1, label=name)
    per_layer.axvline(GUIDE_RATIO, color="black", linestyle="--", linewidth=1)
    per_layer.set_xscale("log")
    finite = positive[np.isfinite(positive)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        if math.isfinite(center) and math.isfinite(far):
            low, high = min(low, 10 ** (center - far)), max(high, 10 ** (center + far))
        per_layer.set_xlim(low / 3, high * 3)
    per_layer.set_yticks(rows, labels, fontsize=7)
    per_layer.set_ylim(n - 0.5, -0.5)
    per_layer.yaxis.tick_right()
    for tick, color in zip(per_layer.get_yticklabels(), colors_, strict=True):
        tick.set_color(color)
    for row, state in enumerate(status):
        if state in ("not updated", "missing"):
            per_layer.text(0.02, row, state, transform=per_layer.get_yaxis_transform(), va="center", fontsize=7)
    per_layer.set_xlabel("median over the epoch's steps (log)")
    per_layer.grid(axis="x", alpha=0.3)
    per_layer.legend(fontsize=7, loc="best")  # not over the lowest layer, the one most often flagged
    figure.suptitle(title, x=0.01, ha="left")
    return figure


def _binned(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most 1500 points: geometric mean of the positive finite values per bin of consecutive steps."""
    if len(x) <= _MAX_POINTS:
        return x, y
    edges = np.linspace(0, len(x), _MAX_POINTS + 1).astype(int)
    centers = np.array([x[a:b].mean() for a, b in itertools.pairwise(edges)])
    means = np.full(_MAX_POINTS, np.nan)
    for k, (a, b) in enumerate(itertools.pairwise(edges)):
        block = y[a:b]
        block = block[np.isfinite(block) & (block > 0)]
        if block.size:
            means[k] = float(np.exp(np.log(block).mean()))
    return centers, means
