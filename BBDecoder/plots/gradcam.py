"""Grad-CAM figures: the input, the map, and the map laid over the input."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from . import new_figure

CMAP = "turbo"  # a perceptually smoother jet: the colours Grad-CAM readers expect


def display_image(sample: np.ndarray) -> np.ndarray | None:
    """One input sample ``(C, H, W)`` as a picture scaled to [0, 1], or ``None`` if it is not an image.

    Three channels give an RGB ``(H, W, 3)`` image; any other channel count is averaged into
    a grey ``(H, W)`` image. Each sample is min–max scaled on its own, so normalised inputs
    (ImageNet mean/std) are shown with their full contrast.

    Args:
        sample: one sample of the input batch.

    Returns:
        ``(H, W, 3)`` or ``(H, W)`` floats in [0, 1]; ``None`` for inputs that are not
        ``(C, H, W)`` floating arrays.
    """
    array = np.asarray(sample)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        return None
    array = array.astype(np.float64)
    picture = np.transpose(array, (1, 2, 0)) if array.shape[0] == 3 else array.mean(axis=0)
    finite = np.isfinite(picture)
    if not finite.any():
        return np.zeros_like(picture)
    low, high = float(picture[finite].min()), float(picture[finite].max())
    scaled = (picture - low) / (high - low) if high > low else np.zeros_like(picture)
    return np.clip(np.nan_to_num(scaled), 0.0, 1.0)


def gradcam_figure(image: np.ndarray | None, cam: np.ndarray, *, title: str, alpha: float = 0.45) -> Figure:
    """Three panels: the input, the Grad-CAM map with its colour scale, and the overlay.

    Args:
        image: ``(H, W, 3)`` or ``(H, W)`` picture in [0, 1] (see :func:`display_image`);
            ``None`` draws the map alone (token or non-image inputs).
        cam: the ``(H, W)`` map in [0, 1]; one with no positive value is titled as such.
        title: the figure's title.
        alpha: opacity of the map over the image.

    Returns:
        The figure.
    """
    panels = 1 if image is None else 3
    height, width = cam.shape
    aspect = width / max(height, 1)
    # compact (about 600 px wide at the store's 110 dpi), so two fit side by side in the
    # report at a scale where 8-pt type is still 8 px or more
    panel_width = float(np.clip(1.65 * aspect, 1.3, 4.0))
    figure = new_figure(panel_width * panels + 0.8, 2.45)
    grid = figure.add_gridspec(1, panels)
    grey = "gray" if image is not None and image.ndim == 2 else None
    if image is not None:
        axes = figure.add_subplot(grid[0, 0])
        axes.imshow(image, cmap=grey, vmin=0.0, vmax=1.0, interpolation="nearest")
        axes.set_title("input", fontsize=9)
        axes.set_axis_off()
    axes = figure.add_subplot(grid[0, 1 if image is not None else 0])
    shown = axes.imshow(cam, cmap=CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    if np.nanmax(cam, initial=0.0) > 0:
        axes.set_title("Grad-CAM (0 least, 1 most)", fontsize=9)
    else:  # a flat map would read as "nothing matters here": say what it is
        axes.set_title("Grad-CAM: zero everywhere\n(no gradient reaches these positions)", fontsize=8, color="#c0392b")
    axes.set_axis_off()
    bar = figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=8)
    if image is not None:
        axes = figure.add_subplot(grid[0, 2])
        axes.imshow(image, cmap=grey, vmin=0.0, vmax=1.0, interpolation="nearest")
        axes.imshow(cam, cmap=CMAP, vmin=0.0, vmax=1.0, alpha=alpha, interpolation="nearest")
        axes.set_title("overlay", fontsize=9)
        axes.set_axis_off()
    figure.suptitle(title, fontsize=9)
    return figure
