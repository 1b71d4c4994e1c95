"""The static HTML report of a ``save_path`` (see :func:`build_report`)."""

from .builder import REPORT_NAME, build_report, collect, open_save_path, render

__all__ = ["REPORT_NAME", "build_report", "collect", "open_save_path", "render"]
