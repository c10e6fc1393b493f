"""Layouts: which runs become rows and which columns they get, after the papers' tables.

- `efficiency`: ViCo supplement Table 1, PyramidDrop Table 1 (tokens, TFLOPs, latency, tasks);
- `inference`: PyramidDrop Table 5 (TFLOPs, tasks, and a difference row against FastV);
- `compressors`: LLaVolta Tables 3 and 5 (token total, compression ratio, latency, tasks);
- `ablation`: ViCo supplement Table 2, PyramidDrop Table 4 (one method, its hyperparameters);
- `sweep`: a redundancy sweep's layer x retained-share grid;
- `auto`: `sweep` for sweeps, `ablation` for one method in several settings, else `efficiency`.

Every task cell is lmms-eval's aggregate with a 95% interval and the difference from the
reference run of the same model (stats.py); whatever a reader needs to trust a cell (interval
sources, definitions, provenance differences) goes into the table's footnotes.
"""

from __future__ import annotations

from collections.abc import Callable

from vtcbench.errors import VtcbenchError, choices_error
from vtcbench.report.context import (
    Context,
    ReportOptions,
    natural_key,
    params_text,
    short_task,
    value_text,
)
from vtcbench.report.folders import Run, load_runs
from vtcbench.report.model import (
    HIGHER_IS_BETTER,
    Cell,
    Column,
    Report,
    Row,
    Score,
    Table,
)
from vtcbench.report.plots import report_figures

LAYOUTS = ("auto", "efficiency", "inference", "compressors", "ablation", "iso", "sweep")
SWEEP_KEPT_BY = {"attention": "the last instruction token's attention", "pool": "average pooling", "random": "random choice"}


def build_report(options: ReportOptions) -> Report:
    """Read the run folders and build the tables of the chosen layout (and the figures, with
    `options.plots`)."""
    if options.layout not in LAYOUTS:
        raise choices_error("layout", options.layout, LAYOUTS)
    runs, skipped = load_runs(options.results, options.runs)
    if not runs:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped)
        raise VtcbenchError(f"no readable run folder in {options.results} ({reasons})")
    present = sorted({run.method for run in runs})
    for method in options.methods:
        if method not in present:
            raise choices_error("method", method, present)
    for option, method in (("--reference", options.reference), ("--delta-vs", options.delta_vs)):
        if method is not None and method not in present:
            raise VtcbenchError(f"{option} {method!r} has no run here; valid choices: {', '.join(present)}")
    shown = [run for run in runs if not options.methods or run.method in options.methods]
    sweeps = [run for run in shown if run.is_sweep]
    plain = [run for run in shown if not run.is_sweep]
    reference = options.reference or "vanilla"
    layout = options.layout if options.layout != "auto" else _auto_layout(plain, sweeps, reference)
    if layout == "sweep":
        if not sweeps:
            raise VtcbenchError("--layout sweep: none of the selected run folders is a sweep (vtcbench redundancy-sweep)")
        _check_models(sweeps, options.allow_mixed)
        tables = [_sort(sweep_table(run), options.sort) for run in sweeps]
        return _with_figures(Report(layout, tables, skipped), plain, runs, options)
    if not plain:
        raise VtcbenchError(f"--layout {layout}: the selected run folders are sweeps; use --layout sweep")
    _check_models(plain, options.allow_mixed)
    context = Context(plain, [run for run in runs if not run.is_sweep], options, reference)
    table = LAYOUT_TABLES[layout](context)
    if sweeps:
        table.footnotes.append(f"{len(sweeps)} sweep folder(s) not shown here: --layout sweep.")
    return _with_figures(Report(layout, [table], skipped), plain, runs, options)


def _with_figures(report: Report, shown: list[Run], runs: list[Run], options: ReportOptions) -> Report:
    if options.plots:
        report.figures, report.figure_notes = report_figures(shown, [run for run in runs if not run.is_sweep], options)
    return report


def _auto_layout(plain: list[Run], sweeps: list[Run], reference: str) -> str:
    if sweeps and not plain:
        return "sweep"
    compared = [run for run in plain if run.method != reference]
    if len({run.method for run in compared}) == 1 and len({params_text(run.params) for run in compared}) > 1:
        return "ablation"
    return "efficiency"


def _check_models(runs: list[Run], allow_mixed: bool) -> None:
    models = sorted({run.model for run in runs})
    if len(models) > 1 and not allow_mixed:
        raise VtcbenchError(
            f"the selected runs are of different models ({', '.join(models)}); select one with --runs or --methods, "
            "or pass --allow-mixed"
        )


# -- layouts -----------------------------------------------------------------------------------------


METHOD = Column("method", "method", "text")


def _task_columns(context: Context) -> list[Column]:
    columns = [Column(t.key, t.key, "score") for t in context.tasks]
    return columns + ([Column("average", "average", "score")] if context.averaged else [])


def efficiency_table(context: Context) -> Table:
    """ViCo suppl. Table 1 / PyramidDrop Table 1: cost columns, then tasks and their average."""
    columns = [
        METHOD, Column("tokens", "visual tokens", "tokens"), Column("tflops", "TFLOPs", "tflops"),
        Column("prefill_ms", "prefill ms", "ms"), Column("speedup", "speedup", "speedup"), *_task_columns(context),
    ]
    rows = [
        Row({"method": context.label(run), "tokens": context.tokens(run), "tflops": context.tflops(run),
             "prefill_ms": context.prefill(run), "speedup": context.speedup(run), **context.score_cells(run)}, run.name)
        for run in context.rows
    ]
    footnotes = [
        ("visual tokens: mean over decoder layers of the image tokens entering each layer, per sample, averaged over "
         "samples (ViCo's average tokens)."),
        "TFLOPs: analytic multiply-accumulates of the decoder on the image tokens only (the papers' convention).",
        "prefill ms: median time to the first token per task; speedup: vanilla's prefill / the row's.",
        *_several_tasks_note(context),
        *context.footnotes(),
    ]
    return _sort(Table(_title("Efficiency (ViCo suppl. Tab. 1, PyramidDrop Tab. 1)", context), columns, rows, footnotes),
                 context.options.sort)


def inference_table(context: Context) -> Table:
    """PyramidDrop Table 5: TFLOPs and tasks, and under each method a row of its difference from
    the `--delta-vs` method (default FastV)."""
    delta_vs = context.options.delta_vs or ("fastv" if any(r.method == "fastv" for r in context.pool) else None)
    columns = [METHOD, Column("tflops", "TFLOPs", "tflops"), *_task_columns(context)]
    groups: list[list[Row]] = []
    for run in sorted(context.rows, key=lambda run: run.method not in (context.reference, delta_vs)):
        group = [Row({"method": context.label(run), "tflops": context.tflops(run), **context.score_cells(run)}, run.name)]
        other = context.reference_of(run, delta_vs) if delta_vs and run.method != context.reference else None
        if other is not None:
            group.append(Row({"method": f"Δ vs {context.label(other)}", "tflops": None,
                              **context.difference_cells(run, other)}, run.name, kind="delta"))
        groups.append(group)
    footnotes = [
        "TFLOPs: analytic multiply-accumulates of the decoder on the image tokens only (the papers' convention).",
        *_several_tasks_note(context),
        *context.footnotes(),
    ]
    if delta_vs:
        footnotes.append(f"Δ vs {delta_vs} rows: the method minus {delta_vs} (same model), paired bootstrap interval; "
                         "* where it excludes 0.")
    else:
        footnotes.append("No fastv run: no difference rows (choose another method with --delta-vs).")
    table = Table(_title("Inference (PyramidDrop Tab. 5)", context), columns, [], footnotes)
    return _sort(table, context.options.sort, groups)


def compressors_table(context: Context) -> Table:
    """LLaVolta Tables 3 and 5: token total over layers, compression ratio, latency, tasks."""
    columns = [
        METHOD, Column("token_total", "#tokens", "total"), Column("compression_ratio", "CR", "ratio"),
        Column("latency_ms", "latency ms", "ms"), *_task_columns(context),
    ]
    rows = [
        Row({"method": context.label(run), "token_total": context.token_total(run),
             "compression_ratio": context.compression_ratio(run), "latency_ms": context.prefill(run),
             **context.score_cells(run)}, run.name)
        for run in context.rows
    ]
    footnotes = [
        ("#tokens: the image tokens summed over decoder layers (mean over samples); CR: N*L / #tokens, N*L being "
         "vanilla's total (LLaVolta's compression ratio)."),
        "latency ms: median time to the first answer token (prefill) per task.",
        *_several_tasks_note(context),
        *context.footnotes(),
    ]
    return _sort(Table(_title("Compressors (LLaVolta Tab. 3, 5)", context), columns, rows, footnotes), context.options.sort)


def ablation_table(context: Context) -> Table:
    """ViCo suppl. Table 2 / PyramidDrop Table 4: one method's hyperparameters as columns."""
    ablated = sorted({run.method for run in context.rows if run.method != context.reference})
    if len(ablated) > 1:
        raise VtcbenchError(
            f"--layout ablation compares one method's settings; the runs hold {', '.join(ablated)}: choose one with --methods"
        )
    settings = [run.params for run in context.rows if run.method != context.reference]
    keys = list(dict.fromkeys(k for params in settings for k in params))
    varying = [k for k in keys if len({params_text({k: p.get(k)}) for p in settings}) > 1] or keys
    columns = [
        METHOD, *(Column(f"param_{k}", k, "text") for k in varying),
        Column("tokens", "visual tokens", "tokens"), Column("tflops", "TFLOPs", "tflops"), *_task_columns(context),
    ]
    rows = []
    for run in context.rows:
        params = {f"param_{k}": value_text(run.params[k]) if k in run.params else None for k in varying}
        rows.append(Row({"method": context.label(run, with_params=False), **params, "tokens": context.tokens(run),
                         "tflops": context.tflops(run), **context.score_cells(run)}, run.name))
    footnotes = [
        "visual tokens: mean over decoder layers of the image tokens entering each layer, per sample, averaged over samples.",
        "TFLOPs: analytic multiply-accumulates of the decoder on the image tokens only (the papers' convention).",
        *_several_tasks_note(context),
        *context.footnotes(),
    ]
    title = _title(f"Ablation of {ablated[0] if ablated else context.reference} (ViCo suppl. Tab. 2, PyramidDrop Tab. 4)", context)
    return _sort(Table(title, columns, rows, footnotes), context.options.sort)


def iso_table(context: Context) -> Table:
    """Methods at equal cost (`run --budget`): per budget, each method's chosen setting, the cost
    it reaches, its selection's own TFLOPs, its prefill time, and the tasks with each one's paired
    difference from vanilla."""
    columns = [
        Column("budget", "budget", "text"), METHOD, Column("tokens", "visual tokens", "tokens"),
        Column("tflops", "TFLOPs", "tflops"), Column("overhead", "selection TFLOPs", "tflops"),
        Column("prefill_ms", "prefill ms", "ms"), *_task_columns(context),
    ]
    from vtcbench.methods import METHODS

    reference = [run for run in context.rows if run.method == context.reference]
    budgeted = sorted((run for run in context.rows if run.budget), key=lambda run: (_budget_order(run.budget), run.method))
    if not budgeted:
        raise VtcbenchError("--layout iso: none of the selected runs was made with --budget (vtcbench run --budget tokens=N)")
    # a method whose count each image sets takes no budget: shown at the cost it reached
    adaptive = [run for run in context.rows if getattr(METHODS.get(run.method), "adaptive", None) and not run.budget]
    rows = [
        Row({"budget": run.budget or ("adaptive" if run in adaptive else "-"), "method": context.label(run),
             "tokens": context.tokens(run), "tflops": context.tflops(run),
             "overhead": context.task_mean(run, lambda e: e.get("tflops_method_overhead")),
             "prefill_ms": context.prefill(run), **context.score_cells(run)}, run.name)
        for run in [*reference, *budgeted, *adaptive]
    ]
    footnotes = [
        ("budget: what `vtcbench run --budget` asked for; each method's setting is the one of its budget knob whose cost "
         "is closest (docs/methods.md#budgets); visual tokens and TFLOPs are what the run reached."),
        *(["adaptive: a method whose count each image sets (PruMerge+) takes no budget; it is shown at the cost it reached."]
          if adaptive else []),
        "visual tokens: mean over decoder layers of the image tokens entering each layer, per sample, averaged over samples.",
        ("TFLOPs: analytic multiply-accumulates of the decoder on the image tokens only (the papers' convention); "
         "selection TFLOPs: the method's own work (its scores, keys, similarities), apart; prefill ms: median time to the "
         "first token, the selection included."),
        *_several_tasks_note(context),
        *context.footnotes(),
    ]
    return Table(_title("Methods at equal cost", context), columns, rows, footnotes, ranked=False)


def _budget_order(budget: str) -> tuple[str, float]:
    measure, _, value = budget.partition("=")
    return measure, float(value)


def sweep_table(run: Run) -> Table:
    """A redundancy sweep's grid: a row per layer K, a column per retained share r (r = 1 is vanilla)."""
    curves = run.summary["curves"]
    vanilla = next((c for c in curves if c["layer"] == ""), None)
    cells = [c for c in curves if c["layer"] != ""]
    percent = all(0 <= c["metric"] <= 1 for c in curves)
    scale = 100.0 if percent else 1.0
    ratios = sorted({c["ratio"] for c in cells} | ({1.0} if vanilla else set()))
    columns = [Column("layer", "layer K", "text"), *(Column(f"r{r:g}", f"r={r:g}", "score") for r in ratios)]
    rows = []
    for layer in sorted({c["layer"] for c in cells}):
        by_ratio = {c["ratio"]: c for c in cells if c["layer"] == layer}
        if vanilla:
            by_ratio.setdefault(1.0, vanilla)
        row: dict[str, Cell] = {"layer": str(layer)}
        for ratio in ratios:
            cell = by_ratio.get(ratio)
            row[f"r{ratio:g}"] = None if cell is None else Score(
                cell["metric"] * scale, stderr=cell["stderr"] * scale if cell.get("stderr") is not None else None
            )
        rows.append(Row(row, run.name))
    task = ", ".join(short_task(t) for t in run.identity.get("tasks", []))
    metric = curves[0]["metric_name"] if curves else "?"
    kept = SWEEP_KEPT_BY.get(run.method.removeprefix("sweep-"), run.method)
    footnotes = [
        (f"{metric}{' (%)' if percent else ''} ± lmms-eval's standard error, keeping a share r of the image tokens from "
         f"layer K on, chosen by {kept}; r = 1 is vanilla (computed once)."),
        f"Run folder {run.name}; plots and per-document scores: curves.png, cells.jsonl.",
    ]
    title = f"Redundancy sweep: {run.model} on {task}, {metric} by layer K and retained share r"
    return Table(title, columns, rows, footnotes, ranked=False)


LAYOUT_TABLES: dict[str, Callable[[Context], Table]] = {
    "efficiency": efficiency_table,
    "inference": inference_table,
    "compressors": compressors_table,
    "ablation": ablation_table,
    "iso": iso_table,
}


# -- helpers -----------------------------------------------------------------------------------------


def _sort(table: Table, column: str | None, groups: list[list[Row]] | None = None) -> Table:
    """Rows (with the difference rows under them) ordered by `column`: best first for scores,
    speedup and compression ratio, cheapest first for costs; missing values last."""
    groups = groups if groups is not None else [[row] for row in table.rows]
    if column is not None:
        match = next((c for c in table.columns if column.lower() in (c.key.lower(), c.header.lower())), None)
        if match is None:
            raise choices_error("--sort column", column, [c.key for c in table.columns])
        descending = match.kind in HIGHER_IS_BETTER

        def key(group: list[Row]) -> tuple:
            value = group[0].cells.get(match.key)
            value = value.value if isinstance(value, Score) else value
            if value is None:
                return (1, 0)
            if isinstance(value, str):
                return (0, natural_key(value))
            return (0, -value if descending else value)

        groups = sorted(groups, key=key)
    table.rows = [row for group in groups for row in group]
    return table


def _title(name: str, context: Context) -> str:
    models = ", ".join(sorted({run.model for run in context.rows}))
    return f"{name}: {models}"


def _several_tasks_note(context: Context) -> list[str]:
    if len({task.short for task in context.tasks}) > 1:
        return ["Cost columns: per-task values averaged over the tasks, weighted by their samples."]
    return []
