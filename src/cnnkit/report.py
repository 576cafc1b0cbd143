"""Moved to cnnkit.viz.report; this name is kept for code that imports it."""

from cnnkit.viz.report import default_report_folder, write_report

__all__ = ["default_report_folder", "write_report"]
