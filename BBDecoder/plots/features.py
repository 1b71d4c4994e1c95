"""Pictures of one layer's features: channel grids, token heatmaps, bar plots, images.

Every function takes NumPy arrays and returns a :class:`~matplotlib.figure.Figure`; the
colour (or y-axis) scale is a :class:`ColorScale`, so a whole run of frames can share one.
Arrays always carry a leading *sample* axis: ``(S, C, H, W)`` for a grid, ``(S, T, D)``
for a heatmap, ``(S, D)`` for bars and ``(S, H, W)`` for an image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

from ..errors import BBDecoderValueError
from . import new_figure

VIEWS = ("grid", "heatmap", "bars", "image")
SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"
MAX_CHANNELS = 64
MAX_PANELS = 8
_BACKGROUND = "#ffffff"
_SAMPLE_VALUES = 250_000  # values per array used to pick the colour range


@dataclass(frozen=True)
class ColorScale:
    """One value range and colour map, shared by every panel (and every frame of a video).

    Attributes:
        vmin, vmax: the values mapped to the ends of the colour map (or the y-limits of bars).
        cmap: a matplotlib colour map name.
        extend: ``"neither"``, ``"min"``, ``"max"`` or ``"both"``: which ends were capped.
    """

    vmin: float
    vmax: float
    cmap: str
    extend: str = "neither"

    def norm(self) -> Normalize:
        return Normalize(self.vmin, self.vmax, clip=False)

    def colormap(self) -> Colormap:
        import matplotlib

        return matplotlib.colormaps[self.cmap].with_extremes(bad=_BACKGROUND)


def color_scale(arrays: Iterable[np.ndarray], *, cap: float = 99.5) -> ColorScale:
    """A robust colour scale for ``arrays`` taken together.

    Values beyond the ``cap`` percentile of the data (and below ``100 - cap``) are capped so
    that a few outliers do not wash out every other value. Non-negative data gets the
    sequential ``viridis`` map from its low to its high percentile; signed data gets the
    diverging ``RdBu_r`` map, symmetric around zero.

    Args:
        arrays: the values to cover; non-finite values are ignored.
        cap: upper percentile kept, in ``(50, 100]``.

    Returns:
        The shared :class:`ColorScale`.
    """
    samples: list[np.ndarray] = []
    for array in arrays:
        flat = np.asarray(array, dtype=np.float64).ravel()
        if flat.size > _SAMPLE_VALUES:
            flat = flat[:: math.ceil(flat.size / _SAMPLE_VALUES)]
        samples.append(flat[np.isfinite(flat)])
    values = np.concatenate(samples) if samples else np.zeros(0)
    if values.size == 0:
        return ColorScale(0.0, 1.0, SEQUENTIAL_CMAP)
    data_min, data_max = float(values.min()), float(values.max())
    low, high = (float(v) for v in np.percentile(values, [100.0 - cap, cap]))
    if low < 0.0 < high:
        limit = float(np.percentile(np.abs(values), cap)) or max(-low, high)
        vmin, vmax, cmap = -limit, limit, DIVERGING_CMAP
    else:
        vmin, vmax, cmap = low, high, SEQUENTIAL_CMAP
        if data_min >= 0.0 and low <= 0.05 * high:
            vmin = 0.0  # activations after ReLU: anchor the dark end at zero
    if vmax <= vmin:
        pad = 0.5 * abs(vmin) if vmin else 0.5
        vmin, vmax = vmin - pad, vmax + pad
    below, above = data_min < vmin, data_max > vmax
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max"}.get((below, above), "both")
    return ColorScale(vmin, vmax, cmap, extend)


def view_for(sample_ndim: int, *, from_post_proc: bool) -> str:
    """Which picture fits one sample of ``sample_ndim`` dimensions.

    ``(D,)`` → bars; ``(T, D)`` → heatmap (``image`` when ``post_proc`` made it: shown as
    it is); ``(C, H, W)`` and more → grid of channels.
    """
    if sample_ndim <= 1:
        return "bars"
    if sample_ndim == 2:
        return "image" if from_post_proc else "heatmap"
    return "grid"


def as_panels(array: np.ndarray, view: str) -> np.ndarray:
    """``array`` (with its sample axis) reshaped to what ``view`` draws.

    Scalars become one bar; ``(S, C, D, H, W)`` maps stack their extra axes above ``H``.
    """
    array = np.asarray(array)
    if view == "bars":
        return array.reshape(array.shape[0], -1)
    if view == "grid" and array.ndim > 4:
        return array.reshape(array.shape[0], array.shape[1], -1, array.shape[-1])
    return array


def feature_figure(
    array: np.ndarray,
    view: str,
    *,
    title: str,
    subtitle: str = "",
    channels: Sequence[int] | None = None,
    scale: ColorScale | None = None,
    max_channels: int = MAX_CHANNELS,
    dpi: int = 100,
) -> Figure:
    """Draw one frame of features.

    Args:
        array: values with a leading sample axis (see the module docstring).
        view: ``"grid"``, ``"heatmap"``, ``"bars"`` or ``"image"``.
        title: first line of the caption (layer and frame).
        subtitle: second line (shape, selection).
        channels: the original index of each kept channel/feature (labels); default
            ``0..C-1``.
        scale: the colour scale; default: :func:`color_scale` of ``array``.
        max_channels: at most this many channel images in a grid (the rest are named in
            the subtitle).
        dpi: figure resolution.

    Returns:
        The Figure; its size depends only on ``array``'s shape and ``view``.

    Raises:
        BBDecoderValueError: an unknown ``view``.
    """
    if view not in VIEWS:
        raise BBDecoderValueError(f"view must be one of {VIEWS}, got view={view!r}")
    data = as_panels(np.asarray(array, dtype=np.float64), view)
    if view == "grid" and np.ndim(array) > 4:
        extra = "×".join(map(str, np.shape(array)[2:-2]))
        plane = "×".join(map(str, np.shape(array)[-2:]))
        note = f"each channel's {extra} depth slices of {plane} stacked top to bottom"
        subtitle = ", ".join(x for x in [subtitle, note] if x)
    style = _Style(title, subtitle, channels, scale or color_scale([data]), max_channels, dpi)
    draw = {"grid": _grid, "heatmap": _heatmap, "bars": _bars, "image": _images}[view]
    return draw(data, style)


# ----------------------------------------------------------------- views
@dataclass(frozen=True)
class _Style:
    """What every view needs besides the data (the arguments of :func:`feature_figure`)."""

    title: str
    subtitle: str
    channels: Sequence[int] | None
    scale: ColorScale
    max_channels: int
    dpi: int

    def labels(self, count: int) -> list[int]:
        """The original index of each of ``count`` channels/features."""
        channels = self.channels
        return list(channels) if channels is not None and len(channels) == count else list(range(count))

    def caption(self, figure: Figure, *notes: str) -> None:
        """The title, then the subtitle and the view's non-empty ``notes``, at the top left."""
        subtitle = "  ·  ".join(x for x in [self.subtitle, ", ".join(n for n in notes if n)] if x)
        text = self.title if not subtitle else f"{self.title}\n{subtitle}"
        figure.suptitle(text, fontsize=11, x=0.02, ha="left")

    def colorbar(self, figure: Figure, image: object, axes: Axes | list[Axes], label: str) -> None:
        """A colour bar for ``image``, marked when the scale caps values."""
        scale = self.scale
        bar = figure.colorbar(image, ax=axes, extend=scale.extend, shrink=0.85, pad=0.02)  # type: ignore[arg-type]
        bar.set_label(label + (" (capped)" if scale.extend != "neither" else ""))


def _first_samples(shown: int, samples: int) -> str:
    """``"first 8 of 20 samples"`` when not every sample is drawn, else ``""``."""
    return f"first {shown} of {samples} samples" if samples > shown else ""


def _grid(data: np.ndarray, style: _Style) -> Figure:
    samples, count, height, width = data.shape
    labels = style.labels(count)
    shown_samples = min(samples, MAX_PANELS)
    if shown_samples == 1:
        shown = min(count, style.max_channels)
        cols = shown if shown <= 4 else math.ceil(math.sqrt(shown * height / max(width, 1)))
        cols = max(1, min(shown, cols))
        rows = math.ceil(shown / cols)
    else:  # one row of channels per sample
        shown = min(count, max(4, min(16, style.max_channels // shown_samples)))
        cols, rows = shown, shown_samples
    gap = max(1, round(0.15 * min(height, width)))
    mosaic = np.full((rows * (height + gap) - gap, cols * (width + gap) - gap), np.nan)
    places: list[tuple[int, int, int]] = []  # (row offset, column offset, label)
    for index in range(rows * cols if shown_samples > 1 else shown):
        row, col = divmod(index, cols)
        sample, channel = (row, col) if shown_samples > 1 else (0, index)
        top, left = row * (height + gap), col * (width + gap)
        mosaic[top : top + height, left : left + width] = data[sample, channel]
        places.append((top, left, labels[channel]))
    long_side = 9.0
    aspect = mosaic.shape[0] / mosaic.shape[1]
    fig_w = long_side if aspect <= 1 else max(4.5, long_side / aspect)
    fig_h = max(3.0, fig_w * aspect) + 0.9
    figure = new_figure(fig_w + 1.2, fig_h, dpi=style.dpi)
    ax = figure.add_subplot()
    image = ax.imshow(mosaic, cmap=style.scale.colormap(), norm=style.scale.norm(), interpolation="nearest")
    font = 9 if cols <= 4 else 8 if cols <= 8 else 7  # never below 7 pt (10.7 px at the store's 110 dpi)
    if rows * cols <= 256:
        for top, left, label in places:
            ax.text(
                left - 0.5 + 0.03 * width,
                top - 0.5 + 0.03 * height,
                str(label),
                fontsize=font,
                va="top",
                ha="left",
                color="white",
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "black", "alpha": 0.55, "linewidth": 0},
                in_layout=False,  # inside the axes: no need to lay them out (much faster)
            )
    ax.set_xticks([])
    if shown_samples > 1:
        ax.set_yticks([r * (height + gap) + (height - 1) / 2 for r in range(rows)])
        ax.set_yticklabels([f"sample {r}" for r in range(rows)])
        ax.tick_params(length=0)
    else:
        ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    style.caption(
        figure,
        f"{count} channels of {height}×{width} (index at top left)",
        f"first {shown} shown" if shown < count else "",
        _first_samples(shown_samples, samples),
    )
    style.colorbar(figure, image, ax, "activation")
    return figure


def _heatmap(data: np.ndarray, style: _Style, rows: str = "token") -> Figure:
    samples, tokens, features = data.shape
    shown = min(samples, MAX_PANELS)
    panel_h = min(4.0, max(1.6, 0.18 * tokens + 0.8))
    figure = new_figure(min(14.0, max(7.0, 0.12 * features + 2.5)), 1.0 + shown * panel_h, dpi=style.dpi)
    axes = figure.subplots(shown, 1, squeeze=False)[:, 0]
    labels = style.labels(features)
    image = None
    for sample, ax in enumerate(axes):
        image = ax.imshow(
            data[sample], cmap=style.scale.colormap(), norm=style.scale.norm(), aspect="auto", interpolation="nearest"
        )
        ax.set_ylabel(f"{rows} (sample {sample})" if samples > 1 else rows)
        _index_ticks(ax, labels, "x")
        if tokens <= 32:
            ax.set_yticks(range(tokens))
            ax.tick_params(axis="y", labelsize=7)
    axes[-1].set_xlabel("feature index")
    style.caption(figure, f"{tokens} {rows}s × {features} features", _first_samples(shown, samples))
    style.colorbar(figure, image, list(axes), "activation")
    return figure


def _bars(data: np.ndarray, style: _Style) -> Figure:
    samples, features = data.shape
    labels = style.labels(features)
    if samples > 1:  # several samples: samples × features heatmap
        return _heatmap(data[None], style, rows="sample")
    figure = new_figure(min(14.0, max(6.0, 0.1 * features + 3.0)), 4.2, dpi=style.dpi)
    ax = figure.add_subplot()
    values = data[0]
    positions = np.arange(features)
    colors = np.where(values >= 0, "#3b6fb6", "#c0504d")
    if features <= 512:
        ax.bar(positions, values, width=0.85 if features <= 64 else 1.0, color=colors)
    else:
        ax.plot(positions, values, color="#3b6fb6", linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    low = min(style.scale.vmin, 0.0)
    high = max(style.scale.vmax, 0.0)
    margin = 0.05 * (high - low or 1.0)
    ax.set_ylim(low - margin, high + margin)
    ax.set_xlim(-0.6, features - 0.4)
    ax.set_xlabel("feature index")
    ax.set_ylabel("activation")
    ax.grid(axis="y", alpha=0.3)
    _index_ticks(ax, labels, "x")
    clipped = int(np.sum((values > high) | (values < low)))
    style.caption(figure, f"{features} features", f"{clipped} beyond the axis" if clipped else "")
    return figure


def _images(data: np.ndarray, style: _Style) -> Figure:
    samples, height, width = data.shape
    shown = min(samples, MAX_PANELS)
    aspect = height / max(width, 1)
    panel_w = 6.0 if shown == 1 else max(2.5, 10.0 / shown)
    panel_h = min(8.0, max(2.0, panel_w * aspect))
    figure = new_figure(panel_w * shown + 1.2, panel_h + 1.0, dpi=style.dpi)
    axes = figure.subplots(1, shown, squeeze=False)[0]
    image = None
    labels = style.labels(width)
    for sample, ax in enumerate(axes):
        image = ax.imshow(
            data[sample],
            cmap=style.scale.colormap(),
            norm=style.scale.norm(),
            interpolation="nearest",
            aspect="equal" if 0.2 <= aspect <= 5 else "auto",
        )
        if samples > 1:
            ax.set_title(f"sample {sample}", fontsize=9)
        _index_ticks(ax, labels, "x")
    style.caption(figure, f"{height}×{width} from post_proc", _first_samples(shown, samples))
    style.colorbar(figure, image, list(axes), "value")
    return figure


def _index_ticks(ax: Axes, labels: Sequence[int], axis: str) -> None:
    """Label positions with the original indices when they are few or not ``0..n-1``."""
    count = len(labels)
    if labels == list(range(count)) and count > 32:
        return  # matplotlib's automatic ticks already read as indices
    step = max(1, math.ceil(count / 32))
    positions = list(range(0, count, step))
    setter, label_setter = (ax.set_xticks, ax.set_xticklabels) if axis == "x" else (ax.set_yticks, ax.set_yticklabels)
    setter(positions)
    label_setter([str(labels[p]) for p in positions], fontsize=7, rotation=90 if count > 16 else 0)
