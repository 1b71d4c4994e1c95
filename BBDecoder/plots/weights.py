"""Figures of ``visualize_weight_hist``: one call's histograms, and their course over calls.

A layer with up to :data:`MAX_PANELS` tensors gets a panel per tensor. A container layer
holding more (a ResNet stage, a DenseNet block, a whole transformer) gets a summary
instead of a wall of panels: one row per tensor with a small histogram on the tensor's own
range and its statistics, flagged rows in red and the flags counted at the top; its
evolution figure is a pair of heatmaps, tensors × calls, of how each tensor's spread and
mean moved since the first call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.colors import TwoSlopeNorm, to_rgba
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from ..analyses.histograms import SATURATION
from ..summary import printable
from . import (
    PlainFormatter,
    colour_scale,
    grid_size,
    new_figure,
    panel_grid,
    plain_number,
    shorten,
    spread,
    text_width_in,
)

if TYPE_CHECKING:
    from ..analyses.histograms import LayerHistograms, ParamHistogram

MAX_COLUMNS = 4
MAX_PANELS = 16
"""Most tensors drawn as panels; a layer with more gets the summary figure."""
MAX_RIDGES = 40
RIDGE_BINS = 80
ZEROS_FLAG = 0.5
"""A tensor with at least this fraction of exact zeros, besides values that are not, is flagged
(pruned or dead units). One that is zero throughout is not: that is a deliberate start (a norm
layer's β, a zero-initialised residual branch or LoRA ``B``); it reads "constant", and the drift
figure shows whether it ever moves."""
_FILL = "#4c72b0"
_SATURATED = "#c44e52"
_FLAGGED = "#b42318"


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
    """Three significant digits, compact exponent (``1.23e-5``)."""
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _percent(fraction: float) -> str:
    if fraction <= 0:
        return "0%"
    if fraction < 0.001:
        return "<0.1%"
    return f"{100 * fraction:.3g}%"


def _shape(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def saturated_ends(p: ParamHistogram) -> tuple[bool, bool]:
    """Which ends of ``p``'s range hold its saturated elements (for shading; display only).

    The count is one number (:func:`~BBDecoder.analyses.weights.tensor_histogram`); an end
    is shaded when its edge bin holds at least a quarter of it.
    """
    if not p.finite or p.saturation_fraction <= 0 or len(p.counts) == 0:
        return False, False
    count = p.saturation_fraction * p.numel
    counts = np.asarray(p.counts, dtype=float)
    return bool(counts[0] >= 0.25 * count), bool(counts[-1] >= 0.25 * count)


def flags(p: ParamHistogram) -> list[str]:
    """What a researcher should look at in ``p``: ``saturated``, ``zeros``, ``non-finite``."""
    found = []
    if p.saturation_fraction > 0:
        found.append("saturated")
    if p.zeros_fraction >= ZEROS_FLAG and p.min < p.max:
        found.append("zeros")
    if p.nonfinite:
        found.append("non-finite")
    return found


# ------------------------------------------------------------------ one call
def _draw_param(ax: Axes, p: ParamHistogram) -> None:
    counts = np.asarray(p.counts, dtype=float)
    edges = np.asarray(p.edges, dtype=float)
    # the filled steps and their outline as one polygon (stairs would measure its path's curves for the limits)
    outline = np.column_stack([np.repeat(edges, 2), np.r_[0.0, np.repeat(counts, 2), 0.0]])
    fill, line = to_rgba(_FILL, 0.75), to_rgba(_FILL)
    ax.add_collection(PolyCollection([outline], facecolors=[fill], edgecolors=[line], linewidths=0.8), autolim=False)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(0, max(1.0, counts.max()) * 1.6)  # headroom for the statistics box
    low_end, high_end = saturated_ends(p)
    band = (1.0 - SATURATION) / 2 * (edges[-1] - edges[0])
    if low_end:
        ax.axvspan(edges[0], edges[0] + max(band, (edges[1] - edges[0]) / 2), color=_SATURATED, alpha=0.35, lw=0)
    if high_end:
        ax.axvspan(edges[-1] - max(band, (edges[-1] - edges[-2]) / 2), edges[-1], color=_SATURATED, alpha=0.35, lw=0)
    if edges[0] < 0 < edges[-1]:
        ax.axvline(0, color="0.35", linewidth=0.6)
    if math.isfinite(p.mean):
        ax.axvline(p.mean, color="k", linestyle="--", linewidth=0.8)
    constant = p.finite and p.min == p.max
    lines = [
        f"μ {_fmt(p.mean)}  σ {_fmt(p.std)}",
        "min {}  max {}".format(*_fmt_range(p.min, p.max)),
        f"zeros {_percent(p.zeros_fraction)}  "
        + ("constant" if constant else f"sat {_percent(p.saturation_fraction)}"),
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
        color=_SATURATED if flags(p) else "0.1",
        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.8"},
    )
    title = shorten(f"{printable(p.name)}  [{_shape(p.shape)}]", 40)
    if p.tied:  # one tensor under several names, computed once: say so where its panel starts
        title += "\n" + shorten("tied to " + ", ".join(map(printable, p.tied)), 44)
    ax.set_title(title, fontsize=8, loc="left", y=1.0)
    ax.tick_params(labelsize=7.5)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
    ax.xaxis.set_major_formatter(PlainFormatter())
    # no count axis: the shape is what matters, and n is in the box (ticks are the costliest
    # part of a small panel to draw)
    ax.yaxis.set_major_locator(NullLocator())


def weight_histogram_figure(layer: LayerHistograms) -> Figure:
    """The call's histograms of one layer: a panel per tensor, or a summary for a container.

    Up to :data:`MAX_PANELS` tensors: one panel each with the histogram, the mean (dashed)
    and the statistics; the ends of the range where values pile up (saturation, see
    :func:`~BBDecoder.analyses.weights.tensor_histogram`) are shaded red. More tensors: the
    summary of :func:`weight_summary_figure`.

    Args:
        layer: the call's histograms of one layer.

    Returns:
        The figure.
    """
    params = layer.params
    if len(params) > MAX_PANELS:
        return weight_summary_figure(layer)
    cells, rows, columns = panel_layout([p.name for p in params])
    layout = {"panel": (2.35, 1.55), "gap": (0.45, 0.62), "margins": (0.5, 0.15, 0.95, 0.35)}
    title = (
        f"Weights of layer {layer.layer_id} {shorten(printable(layer.layer_name), 60)} ({layer.layer_type}), "
        f"call {layer.call}\ndashed: mean · red: the end of the range where values pile up (saturation)"
    )
    width, height = grid_size(rows, columns, **layout)
    figure = new_figure(max(width, text_width_in(title, 9.5) + 0.15), height, layout=None)  # the title fits
    figure.set_label(title)
    figure.text(0.05 / figure.get_figwidth(), 1 - 0.06 / figure.get_figheight(), title, fontsize=9.5, va="top")
    for p, ax in zip(params, panel_grid(figure, len(params), columns, cells=cells, **layout), strict=True):
        _draw_param(ax, p)
    return figure


_KINDS = (
    ("weights", "weights (2-D and more: linear, conv, embedding)"),
    ("scales", "1-D weights (norm scales γ, …)"),
    ("biases", "biases and shifts (β, …)"),
    ("other", "other parameters"),
)


def tensor_kind(p: ParamHistogram) -> str:
    """``"weights"`` (2-D or more), ``"scales"`` (a 1-D ``weight``: a norm layer's γ), ``"biases"`` or ``"other"``."""
    last = p.name.rpartition(".")[2]
    if "bias" in last:
        return "biases"
    if last.endswith("weight"):
        return "weights" if len(p.shape) >= 2 else "scales"
    return "other"


def _group_ticks(names: Sequence[str], limit: int = 48, prefix: str = "") -> tuple[list[float], list[str], list[float]]:
    """Tick positions and labels of tensors in model order: one per submodule group, thinned.

    Tensors are grouped by the first part of their name (``denselayer5`` of
    ``denselayer5.conv1.weight``), or the first two parts when that leaves a single group.

    Returns:
        ``(centres, labels, boundaries)``: where each labelled group sits, its label, and
        the x positions between consecutive groups.
    """
    parts = [name.split(".") for name in names]
    level = 1
    if len({tuple(p[:1]) for p in parts}) == 1 and max((len(p) for p in parts), default=1) > 2:
        level = 2
    keys = [".".join(p[:level]) if len(p) > level else ".".join(p[:-1]) or p[0] for p in parts]
    groups: list[tuple[str, int, int]] = []
    for index, key in enumerate(keys):
        if groups and groups[-1][0] == key:
            groups[-1] = (key, groups[-1][1], index)
        else:
            groups.append((key, index, index))
    every = max(1, math.ceil(len(groups) / limit))
    centres = [(first + last) / 2 for _, first, last in groups[::every]]
    # a bare index ("0" of a Sequential) reads better with its layer's name: "layer3.0"
    named = [f"{prefix}.{key}" if prefix and key.isdigit() else key for key, _, _ in groups[::every]]
    labels = [shorten(printable(name), 24) for name in named]
    boundaries = [first - 0.5 for _, first, _ in groups[1:]]
    return centres, labels, boundaries


def weight_summary_figure(layer: LayerHistograms) -> Figure:
    """A container layer's call at a glance: every tensor's range and spread, by kind, flags on top.

    One panel per kind of tensor (weights of two or more dimensions, 1-D norm scales,
    biases; each on its own value axis), tensors left to right in model order, grouped by
    submodule. Per tensor: a thin line from its minimum to its maximum, a bar from
    ``μ - σ`` to ``μ + σ`` and a dot at ``μ``. A tensor is flagged (red, named in the
    header) when it is saturated, holds at least :data:`ZEROS_FLAG` zeros, or has non-finite
    elements. Every number is in the call's ``.npz``.

    Args:
        layer: the call's histograms of one layer.

    Returns:
        The figure.
    """
    params = layer.params
    by_kind = {kind: [p for p in params if tensor_kind(p) == kind] for kind, _ in _KINDS}
    kinds = [(kind, title) for kind, title in _KINDS if by_kind[kind]]
    flagged = [p for p in params if flags(p)]
    listed = flagged[:10]
    words = {"saturated": "saturated", "zeros": f"≥ {ZEROS_FLAG:.0%} zeros", "non-finite": "NaN/Inf"}
    lines = [
        f"{printable(p.name)} [{_shape(p.shape)}]: "
        + ", ".join(
            f"{words[f]} {_percent(p.saturation_fraction if f == 'saturated' else p.zeros_fraction)}"
            if f != "non-finite"
            else f"{p.nonfinite:,} NaN/Inf"
            for f in flags(p)
        )
        for p in listed
    ]
    if len(flagged) > len(listed):
        lines.append(f"… and {len(flagged) - len(listed)} more (see the .npz)")
    owners = len(dict.fromkeys(p.name.rpartition(".")[0] for p in params))
    head = (
        f"Weights of layer {layer.layer_id} {shorten(printable(layer.layer_name), 60)} ({layer.layer_type}), "
        f"call {layer.call}: {len(params)} tensors in {owners} submodules"
    )
    state = (
        f"flagged (red): {len(flagged)} tensor(s)"
        if flagged
        else "nothing flagged: no saturation, no tensor ≥ 50% zeros beside other values, no NaN/Inf"
    )
    tied = [p for p in params if p.tied]
    if tied:  # one tensor under several names: computed once, said once here
        named = ", ".join(f"{printable(p.name)} = {', '.join(map(printable, p.tied))}" for p in tied[:4])
        tied_line = shorten(f"tied: {named}" + (f" … and {len(tied) - 4} more" if len(tied) > 4 else ""), 150)
    else:
        tied_line = ""
    key = "each column a tensor, in model order; line = min to max, bar = μ ± σ, dot = μ; numbers in the .npz"
    header_in = 0.92 + 0.13 * (len(lines) + bool(tied_line))  # title, key, the flagged lines and ties (7.5 pt)
    panel_in, gap_in, label_in = 1.55, 0.32, 1.05
    height = header_in + len(kinds) * (panel_in + gap_in) + label_in
    figure = new_figure(10.6, height, layout=None)
    figure.set_label(head)
    figure.text(0.01, 1 - 0.06 / height, head, fontsize=9.5, weight="bold", va="top")
    figure.text(0.01, 1 - 0.3 / height, f"{state} · {key}", fontsize=8, va="top", color=_FLAGGED if flagged else "0.3")
    if lines:
        figure.text(0.03, 1 - 0.52 / height, "\n".join(lines), fontsize=7.5, va="top", color=_FLAGGED)
    if tied_line:
        figure.text(0.03, 1 - (0.52 + 0.13 * len(lines)) / height, tied_line, fontsize=7.5, va="top", color="0.3")
    position = {id(p): i for i, p in enumerate(params)}
    centres, labels, boundaries = _group_ticks([p.name for p in params], prefix=layer.layer_name)
    first: Axes | None = None
    for row, (kind, title) in enumerate(kinds):
        bottom = height - header_in - (row + 1) * (panel_in + gap_in) + gap_in
        ax = figure.add_axes((0.75 / 10.6, bottom / height, 9.65 / 10.6, panel_in / height), sharex=first)
        first = first or ax
        members = by_kind[kind]
        _kind_panel(ax, members, [position[id(p)] for p in members], len(params), f"{title}: {len(members)}")
        if 0 < len(boundaries) <= 60:  # one collection, not a line per boundary
            ax.vlines(boundaries, 0, 1, transform=ax.get_xaxis_transform(), colors="0.88", linewidths=0.6, zorder=0)
        ax.xaxis.set_major_locator(NullLocator())
        if row == len(kinds) - 1:  # the submodule names once, under the last panel (the columns are shared)
            _column_names(ax, centres, labels)
    return figure


def _column_names(ax: Axes, centres: Sequence[float], labels: Sequence[str]) -> None:
    """Group names under ``ax`` as plain texts (a tick costs a line, a grid line and a copy of its style).

    Numbered groups with one name (``denselayer1`` … ``denselayer24``) show their numbers,
    level, with the shared name once below them, where the numbers fit between their
    neighbours; other names stay level where they fit, else are turned upright and thinned
    (a rotated text also costs some four times as much to draw).
    """
    if not labels:
        return
    shared = ""
    if len(labels) > 1:
        first, last = min(labels), max(labels)  # the shared start of all is that of these two
        size = next(
            (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), min(len(first), len(last))
        )
        shared = first[:size].rstrip("0123456789")
    low, high = ax.get_xlim()
    width_in = ax.get_position().width * ax.get_figure().get_figwidth()
    spacing_in = width_in * (float(np.min(np.diff(centres))) if len(centres) > 1 else high - low) / (high - low)

    def fits(texts: Sequence[str]) -> bool:
        return max(text_width_in(text, 7) for text in texts) <= 0.85 * spacing_in

    numbered = bool(shared) and all(label[len(shared) :].isdigit() for label in labels)
    numbered = numbered and fits([label[len(shared) :] for label in labels])  # a bare number only where it reads level
    shown = [label[len(shared) :] for label in labels] if numbered else list(labels)
    level = fits(shown)
    below = ax.get_xaxis_transform()
    inches_per_column = width_in / (high - low)
    last = -math.inf
    for centre, text in zip(centres, shown, strict=True):
        if not level and (centre - last) * inches_per_column < 0.12:
            continue  # an upright name would overlap the one before (7-pt type is 0.1 in tall)
        last = centre
        ax.text(centre, -0.04, text, transform=below, rotation=0 if level else 90, ha="center", va="top", fontsize=7)
    if numbered:
        ax.annotate(
            f"{shared.rstrip('.')} (number)",
            (0.5, 0),
            xycoords="axes fraction",
            xytext=(0, -16),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=7,
            color="0.3",
        )


def _kind_panel(ax: Axes, params: Sequence[ParamHistogram], x: Sequence[int], columns: int, title: str) -> None:
    x = np.asarray(x)
    low = np.array([p.min for p in params], dtype=float)
    high = np.array([p.max for p in params], dtype=float)
    mean = np.array([p.mean for p in params], dtype=float)
    std = np.array([p.std for p in params], dtype=float)
    bad = np.array([bool(flags(p)) for p in params])
    colour = np.where(bad, _FLAGGED, _FILL)
    ax.vlines(x, low, high, colors=np.where(bad, _FLAGGED, "0.55"), linewidth=0.9)
    width = float(np.clip(0.7 * 9.65 * 72 / max(columns, 1), 1.0, 9.0))  # points
    ax.vlines(x, mean - std, mean + std, colors=colour, linewidth=width)
    ax.scatter(x, mean, s=min(12.0, width**2), c="#0b2f5e", zorder=3, linewidths=0)
    if bad.any():
        ax.scatter(x[bad], high[bad], marker="v", s=22, c=_FLAGGED, zorder=4, linewidths=0)
    ax.set_xlim(-0.7, columns - 0.3)
    finite = np.concatenate([low[np.isfinite(low)], high[np.isfinite(high)]])
    if finite.size:
        span = float(finite.max() - finite.min()) or max(abs(float(finite.max())), 1e-12)
        ax.set_ylim(float(finite.min()) - 0.06 * span, float(finite.max()) + 0.12 * span)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.yaxis.set_major_formatter(PlainFormatter())
    ax.tick_params(axis="y", labelsize=7.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=8.5, loc="left", y=1.0)


def _fmt_range(low: float, high: float) -> tuple[str, str]:
    """``min`` and ``max`` with digits enough to tell them apart (γ ≈ 1 ± 4e-5: ``0.99994``, ``1.00006``)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return _fmt(low), _fmt(high)
    rough = float(f"{(high - low) / 4:.1g}")
    return plain_number(low, rough), plain_number(high, rough)


def rebin(edges: np.ndarray, counts: np.ndarray, new_edges: np.ndarray) -> np.ndarray:
    """Counts of a histogram moved onto ``new_edges``, each bin's mass spread evenly over its width."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(counts, dtype=float))])
    return np.diff(np.interp(new_edges, np.asarray(edges, dtype=float), cumulative))


# ------------------------------------------------------------------ over calls
def evolution_calls(history: Sequence[LayerHistograms]) -> list[LayerHistograms]:
    """The calls of ``history`` that :func:`weight_evolution_figure` draws: at most ``MAX_RIDGES``, evenly.

    Pass them with ``calls=len(history)``: the figure is the same, and what a helper process
    is sent stays that size however long training runs.
    """
    return [history[i] for i in spread(len(history), MAX_RIDGES)]


def weight_evolution_figure(history: Sequence[LayerHistograms], calls: int | None = None) -> Figure:
    """The layer's histograms over calls: ridges per tensor, or heatmaps for a container.

    Up to :data:`MAX_PANELS` tensors: a ridge plot per tensor, one histogram per call
    (earliest at the bottom, colour from dark to yellow), each ridge scaled to its own
    peak. More tensors: :func:`weight_drift_figure`. With more than ``MAX_RIDGES`` calls an
    even selection (first and latest included) is drawn. After a single call there is no
    course to draw: the figure is a one-line note (the call's histogram figure has it all).

    Args:
        history: the layer's results, oldest first (the latest defines the panels), or
            the selection of them made by :func:`evolution_calls`.
        calls: how many calls the layer has had (default ``len(history)``).

    Returns:
        The figure.
    """
    latest = history[-1]
    calls = len(history) if calls is None else calls
    if calls == 1:  # one ridge, or a drift of zero: the call's own figure says it all
        return _first_call_figure(latest)
    if len(latest.params) > MAX_PANELS:
        return weight_drift_figure(history, calls)
    names = [p.name for p in latest.params]
    shapes = {p.name: p.shape for p in latest.params}
    cells, rows, columns = panel_layout(names)
    chosen = evolution_calls(history)
    cmap = colormaps["viridis"]
    layout = {"panel": (2.35, 1.3 + 0.07 * len(chosen)), "gap": (0.72, 0.62), "margins": (0.72, 0.15, 0.75, 0.35)}
    drawn = f", {len(chosen)} drawn" if len(chosen) < calls else ""
    title = (
        f"Weight evolution of layer {latest.layer_id} {shorten(printable(latest.layer_name), 60)} "
        f"({latest.layer_type}), {calls} call(s){drawn}"
    )
    width, height = grid_size(rows, columns, **layout)
    figure = new_figure(max(width, text_width_in(title, 9.5) + 0.15), height, layout=None)  # the title fits
    figure.set_label(title)
    figure.text(0.05 / figure.get_figwidth(), 1 - 0.06 / figure.get_figheight(), title, fontsize=9.5, va="top")
    for name, ax in zip(names, panel_grid(figure, len(names), columns, cells=cells, **layout), strict=True):
        ridges = []
        for record in chosen:
            match = next((p for p in record.params if p.name == name and p.shape == shapes[name]), None)
            if match is not None:
                ridges.append((record.call, match))
        low = min(float(p.edges[0]) for _, p in ridges)
        high = max(float(p.edges[-1]) for _, p in ridges)
        grid_edges = np.linspace(low, high, RIDGE_BINS + 1)
        polygons, colours = [], []
        steps = np.repeat(grid_edges, 2)
        for level in range(len(ridges) - 1, -1, -1):  # top first, so lower ridges overlap it
            _, p = ridges[level]
            counts = rebin(p.edges, p.counts, grid_edges)
            height = counts / counts.max() * 1.6 if counts.max() > 0 else counts
            tops = level + np.repeat(height, 2)
            polygons.append(np.column_stack([steps, np.r_[level, tops, level]]))
            colours.append(cmap(level / max(1, len(ridges) - 1) * 0.9))
        # one collection, drawn in order (each ridge filled, then outlined): as stacked stairs, far cheaper
        ax.add_collection(PolyCollection(polygons, facecolors=colours, edgecolors="0.15", linewidths=0.5, alpha=0.9))
        ticks = spread(len(ridges), 5)
        ax.set_yticks(ticks, [f"call {ridges[i][0]}" for i in ticks], fontsize=7.5)
        ax.set_ylim(-0.2, len(ridges) + 1.0)
        ax.set_xlim(low, high)
        ax.tick_params(axis="x", labelsize=7.5)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
        ax.xaxis.set_major_formatter(PlainFormatter())
        ax.set_title(shorten(f"{printable(name)}  [{_shape(shapes[name])}]", 40), fontsize=8, loc="left", y=1.0)
    return figure


def _first_call_figure(layer: LayerHistograms) -> Figure:
    """What the evolution figure shows after the first call: a note (redrawn from the second call on)."""
    title = (
        f"Weight evolution of layer {layer.layer_id} {shorten(printable(layer.layer_name), 60)} "
        f"({layer.layer_type}): one call so far (call {layer.call}); the course over calls is drawn from the next one"
    )
    figure = new_figure(text_width_in(title, 8.5) + 0.2, 0.55, layout=None)
    figure.set_label(title)
    figure.text(0.01, 0.5, title, fontsize=8.5, va="center")
    return figure


def weight_drift_figure(history: Sequence[LayerHistograms], calls: int | None = None) -> Figure:
    """A container layer over calls: calls × tensors heatmaps of spread and mean drift.

    Top: ``log2(σ / σ₀)`` (red: widened, blue: narrowed; ±1 is a factor of 2). Middle:
    ``(μ − μ₀) / σ₀``, the mean's move in units of the reference spread. Bottom: the
    saturated fraction. ``σ₀, μ₀`` are a tensor's values at its first call with a spread
    (a norm layer's γ and β start constant: their reference is the next call). Tensors run
    left to right in model order (the latest call's), grouped by submodule as in
    :func:`weight_summary_figure`; a cell without a reference or a tensor is grey.

    Args:
        history: the layer's results, oldest first, or the selection of :func:`evolution_calls`.
        calls: how many calls the layer has had (default ``len(history)``).

    Returns:
        The figure.
    """
    latest = history[-1]
    calls = len(history) if calls is None else calls
    chosen = evolution_calls(history)
    keys = [(p.name, p.shape) for p in latest.params]
    index = {key: i for i, key in enumerate(keys)}
    tensors, drawn = len(keys), len(chosen)
    std = np.full((drawn, tensors), np.nan)
    mean = np.full((drawn, tensors), np.nan)
    sat = np.full((drawn, tensors), np.nan)
    for c, record in enumerate(chosen):
        for p in record.params:
            i = index.get((p.name, p.shape))
            if i is not None:
                std[c, i], mean[c, i], sat[c, i] = p.std, p.mean, p.saturation_fraction
    # the reference is each tensor's first call with a spread: a norm layer's γ and β start constant
    first_std, first_mean = _first_spread(std, mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        widen = np.log2(std / first_std[None, :])
        shift = (mean - first_mean[None, :]) / first_std[None, :]
    widen = np.where(np.isfinite(widen), widen, np.nan)
    shift = np.where(np.isfinite(shift), shift, np.nan)
    panel_in = float(np.clip(0.12 * drawn + 0.5, 0.9, 2.6))
    label_in, header_in = 1.05, 0.75
    height = header_in + 3 * (panel_in + 0.35) + label_in
    figure = new_figure(10.6, height, layout=None)
    title = (
        f"Weight drift of layer {latest.layer_id} {shorten(printable(latest.layer_name), 60)} ({latest.layer_type}): "
        f"{tensors} tensors, {calls} call(s)" + (f", {drawn} drawn" if drawn < calls else "")
    )
    figure.set_label(title)
    figure.text(0.01, 1 - 0.06 / height, title, fontsize=9.5, weight="bold", va="top")
    figure.text(
        0.01,
        1 - 0.32 / height,
        "each column a tensor (model order), each row a call, compared with its first call with a spread; "
        "grey: no spread yet (constant, as a norm layer's γ and β at init) or tensor absent",
        fontsize=8,
        va="top",
        color="0.3",
    )
    panels = [
        (widen, "RdBu_r", "spread since the first call: log2(σ / first σ)", True),
        (shift, "PuOr_r", "mean since the first call: (μ − first μ) / first σ", True),
        (100 * sat, "Reds", "saturated %", False),
    ]
    call_numbers = [record.call for record in chosen]
    centres, labels, boundaries = _group_ticks([name for name, _ in keys], prefix=latest.layer_name)
    for row, (values, cmap_name, label, diverging) in enumerate(panels):
        bottom = height - header_in - (row + 1) * (panel_in + 0.35) + 0.05
        ax = figure.add_axes((0.75 / 10.6, bottom / height, 8.55 / 10.6, panel_in / height))
        cmap = colormaps[cmap_name].with_extremes(bad="#d0d5dd")
        shown = np.ma.masked_invalid(values)
        if diverging:
            peak = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
            span = max(min(2.0, peak), 1e-3)
            norm = TwoSlopeNorm(0.0, -span, span)
            image = ax.imshow(shown, aspect="auto", cmap=cmap, interpolation="nearest", norm=norm)
        else:
            top = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
            image = ax.imshow(shown, aspect="auto", cmap=cmap, interpolation="nearest", vmin=0, vmax=max(top, 1.0))
        ticks = spread(drawn, 4)
        ax.set_yticks(ticks, [f"call {call_numbers[t]}" for t in ticks], fontsize=7.5)
        ax.set_title(label, fontsize=8.5, loc="left", y=1.0)
        if 0 < len(boundaries) <= 60:
            ax.vlines(boundaries, 0, 1, transform=ax.get_xaxis_transform(), colors="white", linewidths=0.5)
        ax.xaxis.set_major_locator(NullLocator())
        if row == 2:
            _column_names(ax, centres, labels)
        colour_scale(ax, image)
    return figure


def _first_spread(std: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per tensor (column), σ and μ at the first call where σ is positive and finite (NaN when never)."""
    first_std = np.full(std.shape[1], np.nan)
    first_mean = np.full(std.shape[1], np.nan)
    for column in range(std.shape[1]):
        usable = np.flatnonzero(np.isfinite(std[:, column]) & (std[:, column] > 0))
        if usable.size:
            first_std[column], first_mean[column] = std[usable[0], column], mean[usable[0], column]
    return first_std, first_mean
