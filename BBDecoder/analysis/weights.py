"""Weight histograms over training (issue: weights and similarity)."""

from __future__ import annotations

from ._base import AnalyzerBase


class WeightMixin(AnalyzerBase):
    """Not built yet."""
