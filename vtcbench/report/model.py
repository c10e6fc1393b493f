"""What a report is, independent of its format: tables of typed cells, footnotes, skipped folders.

The layouts (tables.py) fill these; the renderers (render.py) only format them, so every format
shows the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vtcbench.report.folders import Skipped

#: Column kinds, each formatted its own way: text; tokens (mean, one decimal); total (integer);
#: tflops (3 significant figures); ms (one decimal); speedup (x, two decimals); ratio (percent);
#: score (a metric: value, interval or ± standard error, difference from the reference).
KINDS = ("text", "tokens", "total", "tflops", "ms", "speedup", "ratio", "score")
HIGHER_IS_BETTER = {"score", "speedup", "ratio"}


@dataclass(frozen=True)
class Column:
    key: str  # the name in csv / json
    header: str  # the name in markdown / latex / html
    kind: str


@dataclass(frozen=True)
class Score:
    """A metric cell in display units (% for fractions)."""

    value: float
    low: float | None = None  # 95% interval
    high: float | None = None
    stderr: float | None = None  # shown as ± (sweep grids)
    delta: Score | None = None  # the difference from the reference run
    marked: bool = False  # a difference whose interval excludes 0
    signed: bool = False  # a difference: printed with its sign


Cell = str | float | Score | None  # None: missing, shown as "-"


@dataclass
class Row:
    cells: dict[str, Cell]
    run: str  # the run folder the row comes from
    kind: str = "run"  # "run", or "delta": a difference row under its run (PyramidDrop Table 5)


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[Row]
    footnotes: list[str] = field(default_factory=list)
    ranked: bool = True  # best / second best marked (not in a sweep's grid, whose columns are settings)

    def ranks(self) -> dict[tuple[int, str], int]:
        """{(row index, column key): 1 or 2}: the best and second-best value of each score
        column among the run rows (ties share a rank), which the papers set in bold / underlined."""
        ranks: dict[tuple[int, str], int] = {}
        for column in self.columns if self.ranked else ():
            if column.kind != "score":
                continue
            values = {
                index: round(cell.value, 1) for index, row in enumerate(self.rows)
                if row.kind == "run" and isinstance(cell := row.cells.get(column.key), Score)
            }
            distinct = sorted(set(values.values()), reverse=True)
            if len(values) < 2:
                continue
            for index, value in values.items():
                rank = distinct.index(value) + 1
                if rank <= 2:
                    ranks[(index, column.key)] = rank
        return ranks


@dataclass(frozen=True)
class Figure:
    """A rendered plot (plots.py): a PNG with the words that go with it in a page."""

    name: str  # the file name, e.g. `efficiency__vtc-tiny__vtcshapes.png`
    png: bytes = field(repr=False)
    alt: str  # what the picture shows, for a reader who cannot see it
    caption: str
    panels: tuple[str, ...] = ()  # the panels' titles, in reading order
    width: int = 0  # pixels
    height: int = 0


@dataclass
class Report:
    layout: str
    tables: list[Table]
    skipped: list[Skipped] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)  # with ReportOptions(plots=True)
    figure_notes: list[str] = field(default_factory=list)  # what could not be drawn, and why
