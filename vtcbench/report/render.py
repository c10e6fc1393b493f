"""A report in the formats researchers paste or load: markdown, LaTeX (booktabs), CSV, JSON, HTML.

Numbers read as in the papers: metrics in % with one decimal, TFLOPs to 3 significant figures;
a missing cell is `-`, never 0. CSV and JSON carry the unrounded numbers (intervals and
differences as their own columns) so that they load back into pandas as they were computed.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Callable
from typing import Any

from vtcbench.report.model import Cell, Column, Figure, Report, Score, Table

FORMATS = ("markdown", "latex", "csv", "json", "html")
MISSING = "-"


def render(report: Report, fmt: str) -> str:
    """The report as text in `fmt` (one of FORMATS)."""
    return RENDERERS[fmt](report)


# -- cell text ----------------------------------------------------------------------------------------


def number_text(value: float, kind: str) -> str:
    """A number as the papers print it in a column of `kind`."""
    if kind == "tflops":
        return f"{value:.3g}"
    if kind == "total":
        return f"{value:.0f}"
    if kind == "speedup":
        return f"{value:.2f}×"
    if kind == "ratio":
        return f"{100 * value:.0f}%"
    return f"{value:.1f}"


def _metric_text(value: float, signed: bool) -> str:
    if signed:
        return f"{0.0 if round(value, 1) == 0 else value:+.1f}"
    return f"{value:.1f}"


def score_parts(score: Score) -> tuple[str, str]:
    """(the value, the rest: ± stderr, [interval], Δ difference [interval] *) in plain text."""
    rest = []
    if score.stderr is not None:
        rest.append(f"± {score.stderr:.1f}")
    if score.low is not None and score.high is not None:
        interval = f"[{_metric_text(score.low, False)}, {_metric_text(score.high, False)}]"
        rest.append(interval + ("*" if score.marked else ""))
    if score.delta is not None:
        delta_value, delta_rest = score_parts(score.delta)
        rest.append(f"Δ {delta_value}" + (f" {delta_rest}" if delta_rest else ""))
    return _metric_text(score.value, score.signed), " ".join(rest)


def cell_text(cell: Cell, column: Column) -> str:
    if cell is None:
        return MISSING
    if isinstance(cell, Score):
        value, rest = score_parts(cell)
        return f"{value} {rest}" if rest else value
    if isinstance(cell, str):
        return cell
    return number_text(cell, column.kind)


# -- markdown -----------------------------------------------------------------------------------------


def render_markdown(report: Report) -> str:
    parts = []
    for table in report.tables:
        lines = [f"### {table.title}", ""]
        lines.append("| " + " | ".join(_md_escape(c.header) for c in table.columns) + " |")
        lines.append("|" + "|".join(":--" if c.kind == "text" else "--:" for c in table.columns) + "|")
        for row in table.rows:
            lines.append("| " + " | ".join(_md_escape(cell_text(row.cells.get(c.key), c)) for c in table.columns) + " |")
        lines.append("")
        lines += [f"- {note}" for note in table.footnotes]
        parts.append("\n".join(lines))
    if report.skipped:
        parts.append("\n".join(["Skipped run folders:", "", *(f"- {s.name}: {s.reason}" for s in report.skipped)]))
    return "\n\n".join(parts) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


# -- LaTeX --------------------------------------------------------------------------------------------

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$", "±": r"$\pm$", "×": r"$\times$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def _latex_number(text: str) -> str:
    """A leading minus as a math minus (a text hyphen is too short)."""
    return "$-$" + text[1:] if text.startswith("-") else text


def _latex_score(score: Score, rank: int | None, *, nested: bool = False) -> str:
    value = _latex_number(_metric_text(score.value, score.signed))
    if rank == 1:
        value = rf"\textbf{{{value}}}"
    elif rank == 2:
        value = rf"\underline{{{value}}}"
    extra = []
    if score.stderr is not None:
        extra.append(rf"$\pm$ {score.stderr:.1f}")
    if score.low is not None and score.high is not None:
        low, high = (_latex_number(_metric_text(v, False)) for v in (score.low, score.high))
        extra.append(f"[{low}, {high}]" + ("$^{*}$" if score.marked else ""))
    if score.delta is not None:
        extra.append(r"$\Delta$\," + _latex_score(score.delta, None, nested=True))
    if not extra:
        return value
    if nested:
        return " ".join([value, *extra])
    return value + r"\,{\scriptsize " + " ".join(extra) + "}"


def render_latex(report: Report) -> str:
    parts = ["% vtcbench report; needs \\usepackage{booktabs}"]
    for table in report.tables:
        ranks = table.ranks()
        spec = "".join("l" if c.kind == "text" else "r" for c in table.columns)
        lines = [
            r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
            rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
            " & ".join(latex_escape(c.header) for c in table.columns) + r" \\", r"\midrule",
        ]
        for index, row in enumerate(table.rows):
            cells = []
            for column in table.columns:
                cell = row.cells.get(column.key)
                if isinstance(cell, Score):
                    cells.append(_latex_score(cell, ranks.get((index, column.key))))
                elif isinstance(cell, (int, float)):
                    cells.append(latex_escape(number_text(cell, column.kind)))
                else:
                    cells.append(latex_escape(cell_text(cell, column)))
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        if table.footnotes:
            lines += [r"\par\smallskip", r"{\footnotesize", *(latex_escape(note) + r"\par" for note in table.footnotes), "}"]
        lines.append(r"\end{table}")
        parts.append("\n".join(lines))
    if report.skipped:
        parts.append("\n".join(f"% skipped {s.name}: {s.reason}" for s in report.skipped))
    return "\n\n".join(parts) + "\n"


# -- CSV and JSON -------------------------------------------------------------------------------------

_SCORE_FIELDS: tuple[tuple[str, Callable[[Score], float | None]], ...] = (
    ("", lambda s: s.value), ("_low", lambda s: s.low), ("_high", lambda s: s.high), ("_stderr", lambda s: s.stderr),
    ("_delta", lambda s: s.delta.value if s.delta else None),
    ("_delta_low", lambda s: s.delta.low if s.delta else None),
    ("_delta_high", lambda s: s.delta.high if s.delta else None),
)


def records(table: Table) -> list[dict[str, Any]]:
    """One flat record per row: unrounded numbers, None where missing; a score column becomes
    `<task>`, and those of `<task>_low`, `<task>_high`, `<task>_stderr`, `<task>_delta`,
    `<task>_delta_low`, `<task>_delta_high` that some row has."""
    rows, optional = [], set()
    for row in table.rows:
        record: dict[str, Any] = {"run": row.run, "row": row.kind}
        for column in table.columns:
            cell = row.cells.get(column.key)
            if column.kind != "score":
                record[column.key] = cell
                continue
            for suffix, read in _SCORE_FIELDS:
                record[column.key + suffix] = read(cell) if isinstance(cell, Score) else None
                if suffix:
                    optional.add(column.key + suffix)
        rows.append(record)
    empty = {key for key in optional if all(record[key] is None for record in rows)}
    return [{key: value for key, value in record.items() if key not in empty} for record in rows]


def render_csv(report: Report) -> str:
    """One header row; with several tables (sweeps), a `table` column names each row's table."""
    several = len(report.tables) > 1
    rows = [({"table": table.title} if several else {}) | record for table in report.tables for record in records(table)]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def render_json(report: Report) -> str:
    data = {
        "layout": report.layout,
        "tables": [
            {"title": t.title, "columns": [{"key": c.key, "header": c.header, "kind": c.kind} for c in t.columns],
             "rows": records(t), "footnotes": t.footnotes}
            for t in report.tables
        ],
        "skipped": [{"folder": s.name, "reason": s.reason} for s in report.skipped],
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# -- HTML ---------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 90em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; }
table { border-collapse: collapse; border-top: 2px solid #222; border-bottom: 2px solid #222; font-size: 0.9em; }
thead th { border-bottom: 1px solid #222; }
th, td { padding: 0.3em 0.7em; text-align: right; white-space: nowrap; vertical-align: top; }
th.text, td.text { text-align: left; }
tr.delta td { color: #555; font-style: italic; }
.rest { display: block; font-size: 0.8em; color: #666; }
.best { font-weight: bold; } .second { text-decoration: underline; }
.notes, .skipped { font-size: 0.85em; color: #444; max-width: 70em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #444; max-width: 60em; margin-top: 0.4em; }
""".strip()


def _html_cell(cell: Cell, column: Column, rank: int | None) -> str:
    if not isinstance(cell, Score):
        return html.escape(cell_text(cell, column))
    value, rest = score_parts(cell)
    css = {1: ' class="best"', 2: ' class="second"'}.get(rank or 0, "")
    text = f"<span{css}>{html.escape(value)}</span>"
    return text + (f'<span class="rest">{html.escape(rest)}</span>' if rest else "")


def _html_figure(figure: Figure) -> str:
    """A figure inline as a base64 `data:image/png` (nothing fetched), shown at half its pixels (200 dpi)."""
    data = base64.b64encode(figure.png).decode("ascii")
    size = f' width="{figure.width // 2}" height="{figure.height // 2}"' if figure.width and figure.height else ""
    return (f'<figure>\n<img src="data:image/png;base64,{data}" alt="{html.escape(figure.alt)}"{size}>\n'
            f"<figcaption>{html.escape(figure.caption)}</figcaption>\n</figure>")


def render_html(report: Report) -> str:
    """One self-contained page: inline CSS, figures as base64 data, no scripts, fonts or links to elsewhere."""
    body = [f"<h1>vtcbench report ({html.escape(report.layout)})</h1>"]
    for table in report.tables:
        ranks = table.ranks()
        body.append(f"<h2>{html.escape(table.title)}</h2>")
        head = "".join(f'<th class="{"text" if c.kind == "text" else "num"}">{html.escape(c.header)}</th>' for c in table.columns)
        rows = []
        for index, row in enumerate(table.rows):
            cells = "".join(
                f'<td class="{"text" if c.kind == "text" else "num"}">'
                f"{_html_cell(row.cells.get(c.key), c, ranks.get((index, c.key)))}</td>"
                for c in table.columns
            )
            rows.append(f'<tr class="{row.kind}">{cells}</tr>')
        body.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>")
        if table.footnotes:
            body.append('<ul class="notes">\n' + "\n".join(f"<li>{html.escape(n)}</li>" for n in table.footnotes) + "\n</ul>")
    if report.figures or report.figure_notes:
        body.append("<h2>Figures</h2>")
        body += [_html_figure(figure) for figure in report.figures]
        if report.figure_notes:
            body.append('<ul class="notes">\n' + "\n".join(f"<li>{html.escape(n)}</li>" for n in report.figure_notes) + "\n</ul>")
    if report.skipped:
        items = "\n".join(f"<li>{html.escape(s.name)}: {html.escape(s.reason)}</li>" for s in report.skipped)
        body.append(f'<h2>Skipped run folders</h2>\n<ul class="skipped">\n{items}\n</ul>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>vtcbench report</title>\n'
        f"<style>\n{_STYLE}\n</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


RENDERERS: dict[str, Callable[[Report], str]] = {
    "markdown": render_markdown, "latex": render_latex, "csv": render_csv, "json": render_json, "html": render_html,
}
