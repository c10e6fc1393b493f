"""`vtcbench report`: run folders -> the comparison tables of the papers (docs/report.md).

folders.py reads the run folders, stats.py gives each number its interval, context.py computes
each row's cells (shared by the tables and the figures), tables.py lays out the rows and columns
of a paper's table, plots.py draws the figures, render.py writes markdown, LaTeX, CSV, JSON or HTML.
"""

from vtcbench.report.context import ReportOptions
from vtcbench.report.folders import Run, Skipped, load_runs
from vtcbench.report.model import Column, Report, Row, Score, Table
from vtcbench.report.render import FORMATS, render
from vtcbench.report.tables import LAYOUTS, build_report

__all__ = [
    "FORMATS", "LAYOUTS", "Column", "Report", "ReportOptions", "Row", "Run", "Score", "Skipped", "Table",
    "build_report", "load_runs", "render",
]
