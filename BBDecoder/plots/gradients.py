"""Figures of gradient statistics: flow chart, per-layer norm curves, cross-epoch heatmap.

Each function takes plain arrays and returns a ``matplotlib.figure.Figure`` (or a list of
them, one per page). Sizes stay readable from 5 to 500 tensors: the flow chart draws one
bar pair per tensor up to :data:`FLOW_PAGE` tensors and one row per layer or block beyond
(the per-tensor detail in :func:`gradient_flow_pages`, :data:`FLOW_PAGE` tensors a page);
norm curves come :data:`NORM_PAGE` layers a page (:func:`norm_curves_pages`); the heatmap
thins its row labels instead of growing past the size budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator
from matplotlib.transforms import blended_transform_factory

from ..errors import BBDecoderValueError
from . import (
    MAX_LONG_SIDE_IN,
    bar_figure,
    iteration_ticks,
    log_axis,
    new_figure,
    pages,
    row_labels,
    shorten,
    text_column,
)

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

FLOW_PAGE = 60
"""Tensors per flow chart; above it the chart shows groups and the pages show tensors."""
NORM_PAGE = 24
"""Layers per page of norm curves (4 columns × 6 rows)."""
MAX_NORM_PANELS = 36
"""Most panels :func:`norm_curves_figure` draws in one figure; use :func:`norm_curves_pages` beyond."""
_ROW_IN = 0.24  # one bar pair of the flow chart (26 px)
_LABEL_PT = 8.0
_NOTE_PT = 7.5


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


# ------------------------------------------------------------------- flow chart
@dataclass
class _FlowRows:
    """What one flow chart draws, one entry per row."""

    labels: list[str]
    mean: np.ndarray  # the blue bar (a group: the median of its tensors' mean |g|)
    top: np.ndarray  # the orange bar (a group: the largest max |g|)
    status: list[str]
    notes: list[str]
    low: np.ndarray | None = None  # a group: smallest and largest mean |g| of its tensors
    high: np.ndarray | None = None


def flow_groups(labels: Sequence[str], max_rows: int = FLOW_PAGE) -> list[tuple[str, list[int]]]:
    """Tensors grouped into at most ``max_rows`` rows, in order, for the overview flow chart.

    Labels are ``"ID dotted.name.param"``. Tensors are grouped by the leading parts of the
    name of the module that holds them, at the finest level that gives at most ``max_rows``
    groups without merging two layers (``"7 features.denseblock3"``); when even the layers
    are too many, by name alone across layers (``"#12–40 features.denseblock3"``), and
    finally into runs of consecutive tensors.

    Returns:
        ``[(row label, [tensor indices]), ...]``.
    """
    parsed = [_split_label(label) for label in labels]
    owners = [name.rpartition(".")[0] or name for _, name in parsed]
    deepest = max((owner.count(".") + 1 for owner in owners), default=1)

    def grouped(keys: list[tuple[str, str]]) -> dict[tuple[str, str], list[int]]:
        groups: dict[tuple[str, str], list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key, []).append(index)
        return groups

    def prefix(owner: str, level: int) -> str:
        return ".".join(owner.split(".")[:level])

    chosen: dict[tuple[str, str], list[int]] | None = None
    for level in range(1, deepest + 1):  # within layers, finest first that fits
        candidate = grouped([(layer, prefix(owner, level)) for (layer, _), owner in zip(parsed, owners, strict=True)])
        if len(candidate) > max_rows:
            break
        chosen = candidate
    if chosen is not None:
        return [
            (_group_label(layer, name, [labels[i] for i in members]), members)
            for (layer, name), members in chosen.items()
        ]
    for level in range(deepest, 0, -1):  # across layers, finest first that fits
        candidate = grouped([("", prefix(owner, level)) for owner in owners])
        if len(candidate) <= max_rows:
            rows = []
            for (_, name), members in candidate.items():
                ids = sorted({parsed[i][0] for i in members}, key=lambda s: int(s) if s.lstrip("-").isdigit() else 0)
                span = f"#{ids[0]}" if len(ids) == 1 else f"#{ids[0]}–{ids[-1]}"
                rows.append((f"{span} {name}".strip(), members))
            return rows
    size = math.ceil(len(labels) / max_rows)
    return [(f"{labels[run[0]]} … {labels[run[-1]]}", list(run)) for run in pages(len(labels), size) if len(run)]


def _split_label(label: str) -> tuple[str, str]:
    """``"3 layer1.0.conv1.weight"`` → ``("3", "layer1.0.conv1.weight")``."""
    head, _, rest = label.partition(" ")
    if head.lstrip("-").isdigit() and rest:
        return head, rest
    return "", label


def _group_label(layer: str, name: str, members: list[str]) -> str:
    if len(members) == 1:
        return members[0]
    return f"{layer} {name}".strip()


def _grouped_rows(
    labels: Sequence[str],
    mean_abs: np.ndarray,
    max_abs: np.ndarray,
    status: Sequence[str],
    max_rows: int,
) -> _FlowRows:
    rows = _FlowRows([], np.zeros(0), np.zeros(0), [], [], np.zeros(0), np.zeros(0))
    means, tops, lows, highs = [], [], [], []
    for label, members in flow_groups(labels, max_rows):
        member_mean = mean_abs[members]
        usable = member_mean[np.isfinite(member_mean) & (member_mean > 0)]
        member_top = max_abs[members]
        finite_top = member_top[np.isfinite(member_top)]
        states = [status[i] for i in members]
        means.append(float(np.median(usable)) if usable.size else (0.0 if "zero" in states else math.nan))
        tops.append(float(finite_top.max()) if finite_top.size else math.nan)
        lows.append(float(usable.min()) if usable.size else math.nan)
        highs.append(float(usable.max()) if usable.size else math.nan)
        counts = {state: states.count(state) for state in dict.fromkeys(states)}
        if counts.get("nonfinite"):
            state = "nonfinite"
        elif counts.get("zero"):
            state = "zero"
        elif counts.get("ok", 0) == 0:
            state = "frozen" if counts.get("frozen") == len(states) else "missing"
        else:
            state = "ok"
        problems = [
            f"{counts[s]} {word}"
            for s, word in (("nonfinite", "NaN/Inf"), ("zero", "zero"), ("missing", "no grad"), ("frozen", "frozen"))
            if counts.get(s)
        ]
        parts = [*problems, f"{len(members)} tensors"] if len(members) > 1 else problems
        if len(members) > 1 and usable.size > 1 and usable.max() > 10 * usable.min():
            positive = np.where(np.isfinite(member_mean) & (member_mean > 0), member_mean, np.inf)
            weakest = _split_label(labels[members[int(np.argmin(positive))]])[1]
            parts.append(f"lowest {'.'.join(weakest.split('.')[-2:])}")
        while len(parts) > 1 and len(", ".join(parts)) > 56:  # the problems come first and stay
            parts.pop()
        note = ", ".join(parts)
        rows.labels.append(label)
        rows.status.append(state)
        rows.notes.append(note)
    rows.mean, rows.top = np.array(means, dtype=np.float64), np.array(tops, dtype=np.float64)
    rows.low, rows.high = np.array(lows, dtype=np.float64), np.array(highs, dtype=np.float64)
    return rows


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
    max_rows: int = FLOW_PAGE,
) -> Figure:
    """Mean and max |g| per tensor (or, past ``max_rows`` tensors, per layer or block) on a log axis.

    Up to ``max_rows`` tensors: a pair of horizontal bars per tensor. More: one row per
    group of :func:`flow_groups` (a layer, or a block of one), whose blue bar is the median
    of its tensors' mean |g| with a whisker from the smallest to the largest, and whose
    orange bar is the largest max |g|; the per-tensor detail is in
    :func:`gradient_flow_pages`. The log axis always holds every bar; axis and legend are
    at the top (and the axis again at the bottom of long charts).

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
        max_rows: most rows drawn; more tensors are grouped.

    Returns:
        The figure.
    """
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    max_abs = np.asarray(max_abs, dtype=np.float64)
    limits = _log_limits(np.concatenate([mean_abs, max_abs]))
    if len(labels) <= max_rows:
        rows = _tensor_rows(labels, mean_abs, max_abs, status, notes)
        subtitle = ""
    else:
        rows = _grouped_rows(labels, mean_abs, max_abs, status, max_rows)
        subtitle = (
            f"{len(labels)} tensors in {len(rows.labels)} groups: bar = median mean |g| of the group's tensors, "
            f"whisker = their range; per-tensor detail on {math.ceil(len(labels) / max_rows)} "
            f"page(s) of {max_rows}"
        )
    return _flow_chart(rows, title, subtitle, limits, vanish_threshold, explode_threshold)


def gradient_flow_pages(
    labels: Sequence[str],
    mean_abs: np.ndarray,
    max_abs: np.ndarray,
    status: Sequence[str],
    *,
    notes: Sequence[str] | None = None,
    title: str = "Gradient flow",
    vanish_threshold: float | None = None,
    explode_threshold: float | None = None,
    page_size: int = FLOW_PAGE,
) -> list[Figure]:
    """The per-tensor flow chart, ``page_size`` tensors a page, every page on the same log axis.

    Arguments as :func:`gradient_flow_figure`. Titles say ``tensors 61–120 of 242 (page 2
    of 5)``. With at most ``page_size`` tensors this is one figure, the same as
    :func:`gradient_flow_figure`.

    Returns:
        One figure per page.
    """
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    max_abs = np.asarray(max_abs, dtype=np.float64)
    limits = _log_limits(np.concatenate([mean_abs, max_abs]))
    all_notes = list(notes) if notes is not None else None
    chunks = pages(len(labels), page_size)
    figures = []
    for number, chunk in enumerate(chunks, start=1):
        index = list(chunk)
        rows = _tensor_rows(
            [labels[i] for i in index],
            mean_abs[index],
            max_abs[index],
            [status[i] for i in index],
            [all_notes[i] for i in index] if all_notes is not None else None,
        )
        page = (
            f"tensors {chunk.start + 1}–{chunk.stop} of {len(labels)} (page {number} of {len(chunks)}, "
            f"{page_size} a page)"
            if len(chunks) > 1
            else ""
        )
        figures.append(_flow_chart(rows, title, page, limits, vanish_threshold, explode_threshold))
    return figures


def _tensor_rows(
    labels: Sequence[str],
    mean_abs: np.ndarray,
    max_abs: np.ndarray,
    status: Sequence[str],
    notes: Sequence[str] | None,
) -> _FlowRows:
    shown_notes = list(notes) if notes is not None else ["" if s == "ok" else s for s in status]
    return _FlowRows(list(labels), mean_abs, max_abs, list(status), shown_notes)


def _flow_chart(
    rows: _FlowRows,
    title: str,
    subtitle: str,
    limits: tuple[float, float],
    vanish_threshold: float | None,
    explode_threshold: float | None,
) -> Figure:
    n = len(rows.labels)
    low, high = limits
    labels = [shorten(label, 52) for label in rows.labels]
    grouped = rows.low is not None
    handles: list[Any] = [
        Patch(color=MAX_COLOR, label="max |grad| (epoch max" + (", largest in the group)" if grouped else ")")),
        Patch(color=MEAN_COLOR, label="mean |grad| (epoch average" + (", median of the group)" if grouped else ")")),
    ]
    if grouped:
        handles.append(Line2D([], [], color="#0b2f5e", marker="|", ms=6, label="range of the tensors' mean |grad|"))
    thresholds = [
        (value, name, style)
        for value, name, style in ((vanish_threshold, "vanish", ":"), (explode_threshold, "explode", "--"))
        if value is not None and low < value < high
    ]
    for value, name, style in thresholds:
        handles.append(
            Line2D([], [], color=PROBLEM_COLOR, linestyle=style, linewidth=1, label=f"{name} threshold {value:g}")
        )
    if any(state != "ok" for state in rows.status):
        handles.append(
            Line2D([], [], marker="x", color=PROBLEM_COLOR, linestyle="", mew=2, label="zero or NaN/Inf gradient")
        )
        handles.append(
            Line2D([], [], marker="o", color=MISSING_COLOR, linestyle="", label="no gradient (frozen / unused)")
        )
    text = title + (f"\n{subtitle}" if subtitle else "")
    tall = n > 25
    longest = max((len(label) for label in labels), default=8)
    figure, axes = bar_figure(n, text, handles, row_in=_ROW_IN, longest_label=longest, right=2.6, label_pt=_LABEL_PT)
    y = np.arange(n)
    drawable_max = np.where(np.isfinite(rows.top) & (rows.top > 0), rows.top, np.nan)
    drawable_mean = np.where(np.isfinite(rows.mean) & (rows.mean > 0), rows.mean, np.nan)
    # bars start at the axis' left edge so a log axis never cuts them
    axes.barh(y - 0.19, drawable_max - low, left=low, height=0.38, color=MAX_COLOR)
    axes.barh(y + 0.19, drawable_mean - low, left=low, height=0.38, color=MEAN_COLOR)
    if rows.low is not None and rows.high is not None:
        spans = np.isfinite(rows.low) & np.isfinite(rows.high) & (rows.high > rows.low)
        if spans.any():
            axes.hlines(y[spans] + 0.19, rows.low[spans], rows.high[spans], color="#0b2f5e", linewidth=1.2)
            axes.plot(rows.low[spans], y[spans] + 0.19, "|", color="#0b2f5e", ms=6, mew=1.2)
            axes.plot(rows.high[spans], y[spans] + 0.19, "|", color="#0b2f5e", ms=6, mew=1.2)
    axes.set_xscale("log")
    axes.set_xlim(low, high)
    log_axis(axes.xaxis)
    axes.set_ylim(n - 0.5, -0.5)
    colors = [_STATUS_COLOR.get(state, "black") for state in rows.status]
    row_labels(axes, labels, colors, row_in=_ROW_IN, size=_LABEL_PT)
    row_pt = _ROW_IN * 72
    for row, state in enumerate(rows.status):
        if state != "ok":
            marker = "x" if state in ("zero", "nonfinite") else "o"
            axes.plot([low], [row], marker=marker, color=_STATUS_COLOR.get(state, PROBLEM_COLOR), ms=6, mew=2)
    marks = {"zero": "0", "nonfinite": "!", "missing": "–", "frozen": "❄"}
    notes = [
        f"{marks.get(state, '')} {shorten(note, 56)}".strip() if (state != "ok" or note) else ""
        for state, note in zip(rows.status, rows.notes, strict=True)
    ]
    note_colors = [_STATUS_COLOR.get(state, PROBLEM_COLOR) if state != "ok" else "0.3" for state in rows.status]
    side = blended_transform_factory(axes.transAxes, axes.transData)
    text_column(axes, 1.01, notes, row_pt=row_pt, colors=note_colors, default="0.3", size=_NOTE_PT, transform=side)
    for value, _, style in thresholds:
        axes.axvline(value, color=PROBLEM_COLOR, linestyle=style, linewidth=1)
    axes.grid(axis="x", which="major", alpha=0.3)
    axes.xaxis.set_label_position("top")
    axes.tick_params(axis="x", top=True, labeltop=True, bottom=tall, labelbottom=tall, labelsize=8)
    axes.set_xlabel("|gradient| (log scale)", fontsize=9)
    return figure


# ------------------------------------------------------------------- norm curves
@dataclass
class NormPanel:
    """One layer's L1 and L2 norm per recorded iteration (NaN: no gradient)."""

    label: str
    iterations: np.ndarray
    l1: np.ndarray
    l2: np.ndarray
    note: str = ""


def norm_limits(panels: Sequence[NormPanel]) -> tuple[float, float] | None:
    """One log y range for every panel (``None`` when no panel has a positive finite norm)."""
    values = [np.asarray(v, dtype=np.float64) for p in panels for v in (p.l1, p.l2)]
    if not values:
        return None
    joined = np.concatenate(values)
    if not (np.isfinite(joined) & (joined > 0)).any():
        return None
    low, high = _log_limits(joined)
    return low * 10**0.2, high / 10**0.2  # _log_limits' margin is for bars; curves need less


def norm_curves_figure(
    panels: Sequence[NormPanel],
    *,
    title: str,
    skipped: Sequence[int] = (),
    y_scale: str = "shared",
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """Small multiples: L1 and L2 of each layer's gradient over the iterations, log y.

    Iterations are integers on the x axis. ``y_scale="shared"`` (the default) puts every
    panel on one log range, so layers compare at a glance; ``"panel"`` gives each its own.
    More than 1500 iterations are drawn as a binned geometric mean with a min-max band.
    Non-finite norms must be given as ``inf`` (NaN means "no gradient": a gap) and are
    marked with a red cross at the top of the panel; iterations a GradScaler skipped get a
    faint red line. At most :data:`MAX_NORM_PANELS` panels: page with
    :func:`norm_curves_pages`.

    Args:
        panels: one per layer, drawn left to right, top to bottom.
        title: figure title.
        skipped: iterations to mark.
        y_scale: ``"shared"`` or ``"panel"``.
        ylim: the shared range (default: from ``panels``; pages pass one for all pages).

    Returns:
        The figure.

    Raises:
        BBDecoderValueError: an unknown ``y_scale``, or more than :data:`MAX_NORM_PANELS` panels.
    """
    if y_scale not in ("shared", "panel"):
        raise BBDecoderValueError(f"y_scale must be 'shared' or 'panel', got y_scale={y_scale!r}")
    if len(panels) > MAX_NORM_PANELS:
        raise BBDecoderValueError(
            f"norm_curves_figure draws at most {MAX_NORM_PANELS} panels, got {len(panels)}; use norm_curves_pages"
        )
    shared = y_scale == "shared"
    limits = (ylim or norm_limits(panels)) if shared else None
    count = max(len(panels), 1)
    cols = min(4, count)
    rows = math.ceil(count / cols)
    handles = [
        Line2D([], [], color=L1_COLOR, label="L1 norm"),
        Line2D([], [], color=L2_COLOR, label="L2 norm"),
        Line2D([], [], marker="x", color=PROBLEM_COLOR, linestyle="", mew=2, label="NaN/Inf"),
        Line2D([], [], marker="v", color=PROBLEM_COLOR, linestyle="", label="zero"),
    ]
    if len(skipped):
        handles.append(Line2D([], [], color=PROBLEM_COLOR, alpha=0.3, linewidth=2, label="step skipped by GradScaler"))
    scale_note = "one log scale for every panel" if shared and limits is not None else "log scale per panel"
    # a fixed grid, laid out by hand: constrained layout re-measured every tick of every panel
    # several times (most of the time of saving a page of 24 panels)
    labels_each = not (shared and limits is not None)
    panel_w, panel_h, gap_w, gap_h = 2.45, 1.3, (0.72 if labels_each else 0.22), 0.36
    left, right, top, bottom = 0.72, 0.15, 1.05, 0.55
    width = left + cols * panel_w + (cols - 1) * gap_w + right
    height = top + rows * panel_h + (rows - 1) * gap_h + bottom
    figure = new_figure(width, height, layout=None)
    figure.set_label(f"{title}  ({scale_note})")
    figure.text(0.05 / width, 1 - 0.08 / height, f"{title}  ({scale_note})", fontsize=10, va="top")
    figure.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.0, 1 - 0.36 / height),
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
    spans = [np.asarray(p.iterations) for p in panels if len(p.iterations)]
    first_it = min((int(s.min()) for s in spans), default=0)
    last_it = max((int(s.max()) for s in spans), default=1)
    pad = max(0.5, 0.02 * (last_it - first_it))
    xlim = (first_it - pad, last_it + pad)
    xticks = [
        v for v in MaxNLocator(nbins=4, integer=True, min_n_ticks=1).tick_values(*xlim) if xlim[0] <= v <= xlim[1]
    ]
    for index, panel in enumerate(panels):
        row, col = divmod(index, cols)
        x0 = (left + col * (panel_w + gap_w)) / width
        y0 = (height - top - row * (panel_h + gap_h) - panel_h) / height
        axes = figure.add_axes((x0, y0, panel_w / width, panel_h / height))
        # ticks are the costliest part of a panel: only the bottom row gets x ticks and (with a
        # shared scale) only the first column y ticks; the others get the same grid as plain lines
        _draw_norms(
            axes,
            panel,
            skipped,
            limits,
            xlim=xlim,
            xticks=xticks,
            x_labels=index + cols >= len(panels),
            y_labels=labels_each or col == 0,
        )
    figure.text(0.5, 0.12 / height, "iteration", ha="center", va="bottom", fontsize=9)
    return figure


def norm_curves_pages(
    panels: Sequence[NormPanel],
    *,
    title: str,
    skipped: Sequence[int] = (),
    y_scale: str = "shared",
    page_size: int = NORM_PAGE,
) -> list[Figure]:
    """:func:`norm_curves_figure` ``page_size`` layers a page, every page on the same y range.

    Titles get ``(layers 25–48 of 107, page 2 of 5)`` when there is more than one page.

    Returns:
        One figure per page.
    """
    size = max(1, min(int(page_size), MAX_NORM_PANELS))
    limits = norm_limits(panels) if y_scale == "shared" else None
    chunks = pages(len(panels), size)
    figures = []
    for number, chunk in enumerate(chunks, start=1):
        suffix = (
            f" (layers {chunk.start + 1}–{chunk.stop} of {len(panels)}, page {number} of {len(chunks)})"
            if len(chunks) > 1
            else ""
        )
        figures.append(
            norm_curves_figure(
                [panels[i] for i in chunk], title=title + suffix, skipped=skipped, y_scale=y_scale, ylim=limits
            )
        )
    return figures


def _draw_norms(
    axes: Axes,
    panel: NormPanel,
    skipped: Sequence[int],
    limits: tuple[float, float] | None,
    *,
    xlim: tuple[float, float],
    xticks: Sequence[float],
    x_labels: bool,
    y_labels: bool,
) -> None:
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
    axes.set_xlim(*xlim)
    grid = {"colors": "0.85", "linewidths": 0.8, "zorder": 0}
    if x_labels:
        axes.set_xticks(xticks)
        axes.grid(axis="x", alpha=0.3)
    else:
        axes.xaxis.set_major_locator(NullLocator())
        axes.vlines(xticks, 0, 1, transform=blended_transform_factory(axes.transData, axes.transAxes), **grid)
    if finite_any or limits is not None:
        axes.set_yscale("log")
        if limits is not None:
            axes.set_ylim(*limits)
        low, high = axes.get_ylim()
        subs = (1.0,) if high > 100 * low else (1.0, 2.0, 5.0)
        if y_labels:
            log_axis(axes.yaxis, subs=subs)
            axes.grid(axis="y", alpha=0.3)
        else:
            decades = LogLocator(base=10.0, subs=subs).tick_values(low, high)
            decades = [d for d in decades if low <= d <= high]
            axes.yaxis.set_major_locator(NullLocator())
            axes.yaxis.set_minor_locator(NullLocator())
            axes.hlines(decades, 0, 1, transform=blended_transform_factory(axes.transAxes, axes.transData), **grid)
    else:
        axes.set_yticks([])
    marks = blended_transform_factory(axes.transData, axes.transAxes)
    if bad.any():
        axes.plot(its[bad], np.full(int(bad.sum()), 0.95), "x", color=PROBLEM_COLOR, mew=2, transform=marks)
    zero = (np.asarray(panel.l2) == 0) & ~bad
    if zero.any():
        axes.plot(its[zero], np.full(int(zero.sum()), 0.05), "v", color=PROBLEM_COLOR, transform=marks)
    if len(skipped):  # lines, not spans: visible however long the epoch
        axes.vlines(list(skipped), 0, 1, transform=marks, colors=PROBLEM_COLOR, alpha=0.3, linewidths=2)
    note = panel.note
    if not note and not finite_any:
        l2 = np.asarray(panel.l2, dtype=np.float64)
        note = "all-zero gradient" if (l2 == 0).any() else "no finite gradient" if bad.any() else "no gradient"
    if note:
        color = PROBLEM_COLOR if "zero" in note or "finite" in note else MISSING_COLOR
        axes.text(0.5, 0.5, note, transform=axes.transAxes, ha="center", va="center", color=color, fontsize=8)
    axes.set_title(shorten(panel.label, 34), fontsize=8.5, loc="left", y=1.0)
    axes.tick_params(which="both", labelsize=7.5)


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


# ----------------------------------------------------------------------- heatmap
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
    zeros black; very wide histories are binned to at most 1500 columns. Rows get thinner
    as layers grow in number (the figure stays under the size budget); past about 230
    layers only every k-th row is labelled, and the title says which.

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
    chrome = 2.6  # title, colour bar, legend and axes, in inches
    row_in = min(0.24, (MAX_LONG_SIDE_IN - chrome) / max(rows, 1))
    every = max(1, math.ceil(0.125 / row_in))  # labels at least 13.75 px apart
    tall = rows > 40
    handles = [
        Patch(color="#dddddd", label="not recorded / no gradient"),
        Patch(color=PROBLEM_COLOR, label="NaN/Inf"),
        Patch(color="black", label="zero"),
    ]
    note = f"  (every {every}th of {rows} layers labelled; all in heatmap.npz)" if every > 1 else ""
    epochs_note = f", epochs {int(epochs[0])}–{int(epochs[-1])}" if width and tall else ""
    text = title + epochs_note + note
    longest = min(40, max((len(label) for label in layer_labels), default=8))
    figure, axes = bar_figure(  # the iteration axis and its label below, whatever the height
        rows, text, handles, row_in=row_in, longest_label=longest, width=10.5, right=0.3, label_pt=7.5, bottom=0.6
    )
    box = axes.get_position()
    colorbar_axes = figure.add_axes(
        (
            box.x0 + 0.55 * box.width,
            box.y1 + 0.42 / figure.get_figheight(),
            0.45 * box.width,
            0.1 / figure.get_figheight(),
        )
    )
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
    labelled = np.arange(0, rows, every)
    axes.set_yticks(labelled, [shorten(layer_labels[i], 40) for i in labelled], fontsize=7.5)
    if every > 1:
        axes.set_yticks(np.arange(rows), minor=True)
    ticks, tick_labels = iteration_ticks(np.asarray(iterations))
    axes.set_xticks(ticks, tick_labels, fontsize=8)
    axes.tick_params(axis="x", top=tall, labeltop=tall, bottom=True, labelbottom=True)
    axes.set_xlabel("iteration", fontsize=9)
    axes.xaxis.set_label_position("bottom")
    changes = np.flatnonzero(np.diff(epochs)) + 1 if width else np.array([], int)
    for start in changes:
        axes.axvline(start - 0.5, color="white", linewidth=1.5)
    label_at = blended_transform_factory(axes.transData, axes.transAxes)
    starts = np.concatenate([[0], changes]) if width else []
    if len(starts) <= 30 and not tall:
        for start in starts:
            axes.text(start, 1.01, f"ep {int(epochs[start])}", transform=label_at, fontsize=7.5, va="bottom")
    colorbar = figure.colorbar(image, cax=colorbar_axes, orientation="horizontal")
    colorbar.ax.xaxis.set_ticks_position("top")
    colorbar.ax.xaxis.set_label_position("top")
    colorbar.set_label("log10 L2 norm of the layer's gradient", fontsize=8)
    colorbar.ax.tick_params(labelsize=7.5)
    return figure


def _viridis() -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0, 1, 256))
