"""Grad-CAM (issue: Grad-CAM and cost)."""

from __future__ import annotations

from ._base import AnalyzerBase


class GradCamMixin(AnalyzerBase):
    """Not built yet."""
