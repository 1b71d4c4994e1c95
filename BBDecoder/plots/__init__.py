"""Figures: each function takes plain data and returns a ``matplotlib.figure.Figure``.

Nothing here touches the model or writes files, and nothing uses pyplot's global state.

Readability rules every figure follows, whatever the model's size (checked by
``tests/test_readability.py`` for 5 to 500 tensors):

* type is never smaller than :data:`MIN_FONT_PT` (7 pt: 10.7 px at the store's 110 dpi);
* the long side stays under :data:`MAX_LONG_SIDE_IN` inches (4,000 px at 110 dpi): long
  lists are grouped (by layer or block, the per-tensor detail one level down) or paged, and
  every figure that pages says so in its title;
* legends and the value axis sit at the top, where the eye starts (tall figures repeat the
  axis at the bottom);
* tick labels are plain numbers, never an offset such as ``1e-4+1`` (:class:`PlainFormatter`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, MaxNLocator

MIN_FONT_PT = 7.0
"""The smallest type any figure uses."""
STORE_DPI = 110
"""The resolution :meth:`BBDecoder.output.store.Store.save_figure` renders at."""
MAX_LONG_SIDE_IN = 34.0
"""Longest side of any figure, in inches (3,740 px at 110 dpi, under the 4,000 px budget)."""
PNG_COMPRESSION = 3
"""zlib level of the PNGs cut by :class:`PlotFigure` (6, the default, costs half as much again for 3% smaller files)."""
MAX_WIDTH_IN = 11.0
"""Widest figure: shown at 75% or more of its size in the report's 1,060-px column."""


class PlotFigure(Figure):
    """A ``Figure`` whose tight PNG is cut from one drawing instead of measured and drawn again.

    ``savefig(..., bbox_inches="tight")`` makes matplotlib measure every artist (a dry-run
    draw) and then draw the figure again. A figure laid out by hand (``layout=None``, as
    most of these are) and saved as PNG is instead drawn once on its own canvas; its tight
    box is the inked pixels joined with the boxes of its texts and legends (titles, notes,
    labels: their line boxes, as matplotlib measures them), padded by ``pad_inches`` and cut out of the
    pixels. Measuring the artists again, as ``Figure.get_tightbbox`` does, would recompute
    every axis' ticks: a third of a drawing. Where ink reaches the canvas' edge or a text
    lies beyond it (an artist placed outside the figure), for a figure with a frame, figure
    images or subfigures, under ``savefig.facecolor``/``edgecolor``/``transparent``
    settings, or for any other format or layout, it falls back to ``Figure.savefig``
    unchanged: the picture is the same either way, to a few pixels of white margin.
    """

    def savefig(self, fname: Any, *args: Any, **kwargs: Any) -> None:
        if (
            kwargs.get("bbox_inches") == "tight"
            and kwargs.get("format") == "png"
            and self.get_layout_engine() is None
            and not args
            and set(kwargs) <= {"bbox_inches", "format", "dpi", "pad_inches"}
            and self._plain_enough()
            and self._save_cropped(fname, kwargs.get("dpi"), kwargs.get("pad_inches"))
        ):
            return
        super().savefig(fname, *args, **kwargs)

    def _plain_enough(self) -> bool:
        """No saving option a single drawing would miss: a frame, figure images, savefig colours or transparency."""
        import matplotlib as mpl

        rc = mpl.rcParams
        return (
            not self.images
            and not self.subfigs
            and self.get_linewidth() == 0
            and not rc["savefig.transparent"]
            and all(str(rc[key]) == "auto" for key in ("savefig.facecolor", "savefig.edgecolor"))
        )

    def _save_cropped(self, fname: Any, dpi: Any, pad: Any) -> bool:
        """Draw once, cut out the tight box, write PNG; ``False`` (nothing written) where the box leaves the canvas."""
        import matplotlib as mpl
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import to_rgba_array
        from PIL import Image

        dpi = mpl.rcParams["savefig.dpi"] if dpi is None else dpi
        dpi = self.dpi if dpi == "figure" else float(dpi)
        pad = mpl.rcParams["savefig.pad_inches"] if pad in (None, "layout") else float(pad)
        original, canvas = self.dpi, self.canvas
        try:
            ours = FigureCanvasAgg(self)  # first: a window behind the old canvas is not resized to the save dpi
            self.dpi = dpi
            ours._is_saving = True  # a throwaway canvas, saving as savefig does: animated artists are drawn too
            ours.draw()
            pixels = np.asarray(ours.buffer_rgba())
            box = _inked_box(pixels, self._measured_boxes(ours.get_renderer()))
        finally:
            self.dpi = original
            self.set_canvas(canvas)
        if box is None:
            return False  # something may lie outside the canvas: matplotlib's own save measures and draws it
        height, width = pixels.shape[:2]
        left, top, right, bottom = box
        margin = round(pad * dpi)  # the padding, in the background's colour where it leaves the canvas
        cut = pixels[max(top - margin, 0) : bottom + margin, max(left - margin, 0) : right + margin]
        grow = (
            (max(margin - top, 0), max(bottom + margin - height, 0)),
            (max(margin - left, 0), max(right + margin - width, 0)),
        )
        if any(any(pair) for pair in grow):
            background = np.asarray(to_rgba_array(self.get_facecolor())[0] * 255, dtype=np.uint8)
            cut = np.concatenate(
                [np.pad(cut[..., k], grow, constant_values=background[k])[..., None] for k in range(4)], axis=2
            )
        Image.fromarray(np.ascontiguousarray(cut)).save(
            fname, format="png", dpi=(dpi, dpi), pnginfo=_png_info(), compress_level=PNG_COMPRESSION
        )
        return True

    def _measured_boxes(self, renderer: Any) -> list[Any]:
        """Display boxes of the figure's texts and legends, and of each axes' texts, legend, axis and tick labels.

        The tick labels are those of the ticks inside the view, as the drawing just placed
        them (asking the axis for its labels would compute its ticks once more).
        """
        from matplotlib.text import Text

        texts = list(self.texts)
        boxes = [legend.get_window_extent(renderer) for legend in self.legends]  # a legend may sit outside too
        for axes in self.axes:
            texts += [child for child in axes.get_children() if isinstance(child, Text)]
            legend = axes.get_legend()
            if legend is not None and legend.get_visible():
                boxes.append(legend.get_window_extent(renderer))
            for axis in (axes.xaxis, axes.yaxis):
                texts += [axis.label, axis.offsetText]
                low, high = sorted(axis.get_view_interval())
                slack = 1e-9 * (high - low)
                for tick in (*axis.majorTicks, *axis.minorTicks):
                    where = tick.get_loc()
                    if where is not None and low - slack <= where <= high + slack:
                        texts += [tick.label1, tick.label2]
        return boxes + [
            text.get_window_extent(renderer)
            for text in texts
            if text.get_visible() and text.get_in_layout() and text.get_text()
        ]


def _inked_box(pixels: np.ndarray, boxes: Sequence[Any]) -> tuple[int, int, int, int] | None:
    """``(left, top, right, bottom)`` in pixels (top down) of what differs from the background, and ``boxes``.

    The background is the corner's colour; ``None`` where ink reaches the canvas' edge, a
    box (display coordinates) lies beyond it, or nothing is drawn: what lies there must be
    measured instead.
    """
    height, width = pixels.shape[:2]
    flat = np.ascontiguousarray(pixels).view(np.uint32)[..., 0]  # one number per RGBA pixel
    background = flat[0, 0]
    if any(bool((edge != background).any()) for edge in (flat[0], flat[-1], flat[:, 0], flat[:, -1])):
        return None
    ink = flat != background
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not rows.size:
        return None
    left, top, right, bottom = int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1
    for box in boxes:  # display boxes: y up from the bottom
        x0, x1 = math.floor(box.x0), math.ceil(box.x1)
        y0, y1 = height - math.ceil(box.y1), height - math.floor(box.y0)
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            return None
        left, top, right, bottom = min(left, x0), min(top, y0), max(right, x1), max(bottom, y1)
    return left, top, right, bottom


def figure_bytes(figure: Figure, format: str = "png", dpi: int = STORE_DPI) -> bytes:
    """``figure`` saved as ``format`` with a tight box: what the store writes, whoever draws it."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format=format, dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _png_info() -> Any:
    import matplotlib as mpl
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", f"BBDecoder (Matplotlib version{mpl.__version__})")
    return info


def new_figure(width: float, height: float, *, dpi: int = 100, layout: str | None = "constrained") -> Figure:
    """A fresh :class:`PlotFigure` (constrained layout unless ``layout=None``), independent of pyplot."""
    return PlotFigure(figsize=(width, min(height, MAX_LONG_SIDE_IN)), dpi=dpi, layout=layout)


def panel_grid(
    figure: Figure,
    count: int,
    columns: int,
    *,
    panel: tuple[float, float],
    gap: tuple[float, float],
    margins: tuple[float, float, float, float],
    cells: Sequence[tuple[int, int]] | None = None,
    sharex: bool = False,
) -> list[Any]:
    """``count`` axes on a fixed grid, placed by hand (inches), no layout engine.

    Constrained layout measures every tick label of every panel at each draw, twice per
    save with a tight bounding box; for a figure of small multiples that was most of the
    time of writing it. The figure must already have its final size.

    Args:
        figure: the figure (``layout=None``).
        count: number of panels.
        columns: panels per row (unless ``cells`` place them).
        panel: ``(width, height)`` of a panel.
        gap: ``(horizontal, vertical)`` space between panels (tick labels, titles).
        margins: ``(left, right, top, bottom)``.
        cells: ``(row, column)`` of each panel (default: row-major).
        sharex: share the x axis of the first panel.

    Returns:
        The axes, in the order of ``cells``.
    """
    width, height = figure.get_figwidth(), figure.get_figheight()
    left, _, top, _ = margins
    places = list(cells) if cells is not None else [divmod(i, columns) for i in range(count)]
    axes: list[Any] = []
    for row, column in places:
        x0 = left + column * (panel[0] + gap[0])
        y0 = height - top - row * (panel[1] + gap[1]) - panel[1]
        box = (x0 / width, y0 / height, panel[0] / width, panel[1] / height)
        axes.append(figure.add_axes(box, sharex=axes[0] if sharex and axes else None))
    return axes


def grid_size(
    rows: int,
    columns: int,
    *,
    panel: tuple[float, float],
    gap: tuple[float, float],
    margins: tuple[float, float, float, float],
) -> tuple[float, float]:
    """Figure size in inches for :func:`panel_grid` with these panels, gaps and margins."""
    left, right, top, bottom = margins
    width = left + columns * panel[0] + (columns - 1) * gap[0] + right
    height = top + rows * panel[1] + (rows - 1) * gap[1] + bottom
    return width, height


def spread(count: int, limit: int) -> list[int]:
    """At most ``limit`` indices out of ``range(count)``, evenly spaced, first and last included."""
    if count <= limit:
        return list(range(count))
    if limit <= 1:
        return [0][:limit]
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def shorten(text: str, limit: int = 48) -> str:
    """``text`` cut in the middle with ``…`` when longer than ``limit`` characters (ends kept)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 5
    return f"{text[:head]}…{text[-(limit - 1 - head) :]}"


def pages(count: int, size: int) -> list[range]:
    """``range(count)`` cut into consecutive pages of at most ``size``."""
    size = max(1, int(size))
    return [range(start, min(start + size, count)) for start in range(0, count, size)] or [range(0)]


def plain_number(value: float, step: float, scale: float | None = None) -> str:
    """``value`` written with just enough digits to tell it from a neighbour ``step`` away.

    Fixed notation when ``scale`` (the largest magnitude on the axis; default ``|value|``)
    lies between 1e-3 and 1e5 (``0.99996``, ``1.00004``), else compact scientific
    (``2.5e-5``); never an offset or a multiplier at the axis' end.
    """
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    scale = magnitude if scale is None or not math.isfinite(scale) or scale <= 0 else scale
    step = abs(step) if step and math.isfinite(step) else magnitude
    if 1e-3 <= scale < 1e5:
        text = f"{value:.{_decimals(step)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    digits = min(12, _decimals(step / 10 ** math.floor(math.log10(magnitude))))
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _decimals(step: float) -> int:
    """Fewest decimals that write ``step`` (a tick spacing such as 0.25 or 2e-5) exactly."""
    for decimals in range(13):
        if abs(round(step, decimals) - step) <= 1e-9 * step:
            return decimals
    return 12


class PlainFormatter(Formatter):
    """Tick labels as :func:`plain_number`: every label complete, no offset text."""

    def __init__(self) -> None:
        self._step = 0.0
        self._scale: float | None = None

    def set_locs(self, locs: Sequence[float]) -> None:
        values = np.unique(np.asarray([v for v in locs if math.isfinite(v)], dtype=np.float64))
        self._step = float(np.min(np.diff(values))) if values.size > 1 else 0.0
        self._scale = float(np.abs(values).max()) if values.size else None
        super().set_locs(locs)

    def __call__(self, x: float, pos: int | None = None) -> str:
        return plain_number(float(x), self._step, self._scale)

    def get_offset(self) -> str:
        return ""


class PowerFormatter(Formatter):
    """Log-axis labels as plain text, ``1e-3`` or ``2e-3``: full-size digits (a superscript exponent
    renders at 60% of the type size), and no mathtext, which was slow to lay out."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        if not math.isfinite(x) or x <= 0:
            return ""
        exponent = math.floor(math.log10(x) + 1e-9)
        mantissa = x / 10.0**exponent
        if abs(mantissa - 1) < 1e-6:
            return f"1e{exponent}"
        return f"{mantissa:.2g}e{exponent}"


def log_axis(axis: Any, *, subs: Sequence[float] = (1.0,)) -> None:
    """A log ``axis`` with ticks at ``subs`` × decades, plain-text labels and no minor ticks.

    Minor ticks of a log axis cost a Tick (a line and a text) each, eight a decade, and
    matplotlib's default labels go through mathtext: together they were most of the time
    of saving a chart.
    """
    from matplotlib.ticker import LogLocator, NullLocator

    axis.set_major_locator(LogLocator(base=10.0, subs=tuple(subs), numticks=12))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(PowerFormatter())


def text_column(
    axes: Any,
    x: float,
    lines: Sequence[str],
    *,
    row_pt: float,
    colors: Sequence[str] | None = None,
    default: str = "black",
    size: float = 8.0,
    ha: str = "left",
    family: str = "sans-serif",
    transform: Any = None,
    chunk: int = 24,
) -> None:
    """Row labels at ``y = 0, 1, 2, …`` (data, rows ``row_pt`` points apart) as a few multi-line texts.

    Matplotlib (3.11) gives each line of a text a box ``fontsize × linespacing`` tall with
    the glyphs centred in it, so with ``linespacing = row_pt / size`` and the text's top on
    the first row's top edge every line sits centred on its row; ``chunk`` lines share one
    text. A line whose colour is not ``default`` is drawn on its own, with the same spacing.
    Each text costs about the same to lay out whatever its length, so a column of 240
    labels is 10 texts instead of 240: seconds saved on every big chart.
    """
    spacing = row_pt / size
    pad = 0.0
    shades = list(colors) if colors is not None else [default] * len(lines)
    options: dict[str, Any] = {"fontsize": size, "family": family, "ha": ha, "va": "top", "linespacing": spacing}
    if transform is not None:
        options["transform"] = transform
    for start in range(0, len(lines), chunk):
        rows = range(start, min(start + chunk, len(lines)))
        plain = "\n".join(lines[i] if shades[i] == default else "" for i in rows)
        if plain.strip():
            axes.text(x, start - 0.5 + pad, plain, color=default, multialignment=ha, **options)
        for i in rows:
            if shades[i] != default and lines[i]:
                axes.text(x, i - 0.5 + pad, lines[i], color=shades[i], **options)


def bar_figure(
    rows: int,
    title: str,
    handles: Sequence[Any],
    *,
    row_in: float,
    longest_label: int,
    width: float = 10.0,
    right: float = 1.2,
    label_pt: float = 8.0,
    ncol: int = 3,
    bottom: float | None = None,
) -> tuple[Figure, Any]:
    """A figure with one axes of ``rows`` horizontal rows, laid out by hand: title, legend, axis on top.

    The rows are exactly ``row_in`` tall, so labels can be drawn with :func:`text_column`;
    the left margin fits ``longest_label`` characters; ``bottom`` is the margin below the
    axes in inches (default: room for the repeated axis of a tall chart). The title is the
    figure's label.

    Returns:
        ``(figure, axes)``; the caller sets the y limits to ``(rows - 0.5, -0.5)``.
    """
    lines = title.count("\n") + 1
    legend_rows = math.ceil(len(handles) / max(ncol, 1)) if handles else 0
    header = 0.15 + 0.2 * lines + 0.22 * legend_rows + 0.55  # title, legend, top axis
    tall = rows > 25
    left = min(4.2, 0.25 + 0.058 * longest_label * label_pt / 8)
    bottom = (0.45 if tall else 0.15) if bottom is None else bottom
    height = max(2.2, header + row_in * rows + bottom)
    figure = new_figure(width, height, layout=None)
    figure.set_label(title)
    figure.text(0.01, 1 - 0.1 / height, title, fontsize=10, va="top")
    if handles:
        figure.legend(
            handles=list(handles),
            loc="upper left",
            bbox_to_anchor=(0.0, 1 - (0.2 + 0.2 * lines) / height),
            ncol=ncol,
            fontsize=8,
            frameon=False,
        )
    axes = figure.add_axes((left / width, bottom / height, (width - left - right) / width, row_in * rows / height))
    return figure, axes


def row_labels(
    axes: Any, labels: Sequence[str], colors: Sequence[str] | None = None, *, row_in: float, size: float = 8.0
) -> None:
    """Labels of the rows ``0..n-1`` left of ``axes``: tick labels for a few, :func:`text_column` for many."""
    from matplotlib.transforms import blended_transform_factory

    count = len(labels)
    if count <= 30:
        axes.set_yticks(range(count), list(labels), fontsize=size)
        if colors is not None:
            for tick, color in zip(axes.get_yticklabels(), colors, strict=True):
                tick.set_color(color)
        return
    axes.set_yticks([])  # no tick objects at all: sixty empty ones cost more to draw than the labels
    side = blended_transform_factory(axes.transAxes, axes.transData)
    text_column(axes, -0.012, labels, row_pt=row_in * 72, colors=colors, size=size, ha="right", transform=side)


def colour_scale(
    axes: Any, mappable: Any, *, gap_in: float = 0.15, width_in: float = 0.14, size: float = 7.5, ticks: int = 5
) -> None:
    """A vertical colour scale for ``mappable`` right of ``axes``, drawn inside ``axes``.

    What ``figure.colorbar`` shows (the colours evenly along the bar, values at ``norm(value)``,
    plain labels), as an image, a frame, tick marks and texts: a colour bar's own axes and
    its ticks cost more to draw than the heatmap they explain. ``axes`` must have its
    final position.
    """
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize
    from matplotlib.image import AxesImage
    from matplotlib.patches import Rectangle

    norm = mappable.norm
    width = axes.get_position().width * axes.get_figure().get_figwidth()
    left, right = 1 + gap_in / width, 1 + (gap_in + width_in) / width
    bar = AxesImage(  # the extent given here, not set: setting it would move the axes' data limits
        axes,
        cmap=mappable.get_cmap(),
        norm=Normalize(0, 1),
        interpolation="nearest",
        origin="lower",
        extent=(left, right, 0, 1),
    )
    bar.set_data(np.linspace(0, 1, 256)[:, None])
    bar.set_transform(axes.transAxes)
    axes.add_artist(bar)  # not add_image: that would clip it to the axes
    bar.set_clip_on(False)
    frame = Rectangle((left, 0), right - left, 1, transform=axes.transAxes, fill=False, linewidth=0.6, clip_on=False)
    axes.add_artist(frame)
    values = [v for v in MaxNLocator(nbins=ticks - 1).tick_values(norm.vmin, norm.vmax) if norm.vmin <= v <= norm.vmax]
    formatter = PlainFormatter()
    formatter.set_locs(values)
    places = [float(norm(v)) for v in values]
    mark = 0.05 / width
    axes.add_collection(
        LineCollection(
            [[(right, y), (right + mark, y)] for y in places],
            colors="black",
            linewidths=0.6,
            transform=axes.transAxes,
            clip_on=False,
        ),
        autolim=False,
    )
    for value, y in zip(values, places, strict=True):
        axes.text(right + 2 * mark, y, formatter(value), transform=axes.transAxes, va="center", fontsize=size)


def text_width_in(text: str, size: float) -> float:
    """Width in inches of the longest line of ``text`` in ``size``-pt DejaVu Sans, on average (0.62 em a character)."""
    return max(len(line) for line in text.split("\n")) * size * 0.62 / 72


def font_px(size_pt: float, dpi: int = STORE_DPI) -> float:
    """Height in pixels of ``size_pt`` type at ``dpi``, as the browser shows it at 100% zoom."""
    return size_pt * dpi / 72.0


def iteration_ticks(iterations: np.ndarray) -> tuple[list[int], list[str]]:
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
