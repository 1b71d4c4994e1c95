"""Per-layer cost: parameters, FLOPs, time, memory (issue: Grad-CAM and cost)."""

from __future__ import annotations

from ._base import AnalyzerBase


class CostMixin(AnalyzerBase):
    """Not built yet."""
