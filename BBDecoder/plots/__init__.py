"""Figures: each function takes plain data and returns a ``matplotlib.figure.Figure``.

Nothing here touches the model or writes files, and nothing uses pyplot's global state.
"""

from __future__ import annotations

from matplotlib.figure import Figure


def new_figure(width: float, height: float, *, dpi: int = 100) -> Figure:
    """A fresh Figure with constrained layout, independent of pyplot."""
    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def spread(count: int, limit: int) -> list[int]:
    """At most ``limit`` indices out of ``range(count)``, evenly spaced, first and last included."""
    if count <= limit:
        return list(range(count))
    if limit <= 1:
        return [0][:limit]
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})
