"""The HTML report and the optional TensorBoard writer (issue: report and demo)."""

from __future__ import annotations

from ._base import AnalyzerBase


class ReportMixin(AnalyzerBase):
    """Not built yet."""
