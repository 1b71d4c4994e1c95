"""Feature similarity across a dimension (issue: weights and similarity)."""

from __future__ import annotations

from ._base import AnalyzerBase


class SimilarityMixin(AnalyzerBase):
    """Not built yet."""
