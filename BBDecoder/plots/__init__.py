"""Figures: each function takes plain data and returns a ``matplotlib.figure.Figure``.

Nothing here touches the model or writes files, and nothing uses pyplot's global state.
"""

from __future__ import annotations

from matplotlib.figure import Figure


def new_figure(width: float, height: float, *, dpi: int = 100) -> Figure:
    """A fresh Figure with constrained layout, independent of pyplot."""
    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")
