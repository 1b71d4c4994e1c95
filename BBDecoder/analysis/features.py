"""Intermediate features and their evolution video (issue: features)."""

from __future__ import annotations

from ._base import AnalyzerBase


class FeatureMixin(AnalyzerBase):
    """Not built yet."""
