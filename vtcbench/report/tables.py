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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtcbench.errors import VtcbenchError, choices_error
from vtcbench.report.aggregation import AGGREGATION_RESAMPLES
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
from vtcbench.report.stats import (
    AGGREGATE,
    BOOTSTRAP,
    NONE,
    RESAMPLES,
    STDERR,
    Estimate,
    estimate,
    paired_difference,
)
from vtcbench.results import primary_metric

LAYOUTS = ("auto", "efficiency", "inference", "compressors", "ablation", "sweep")
MME_FULL_SCORE = 2000  # LLaVolta and PyramidDrop average MME's score divided by 2000
#: provenance fields whose difference between compared runs can move their numbers
PROVENANCE_FIELDS = (("device", "device"), ("dtype", "dtype"), ("attention", "attention"),
                     ("transformers", "transformers"), ("git_revision", "git revision"))
SETTING_FIELDS = ("limit", "seed", "random_weights")
SWEEP_KEPT_BY = {"attention": "the last instruction token's attention", "pool": "average pooling", "random": "random choice"}


@dataclass(frozen=True)
class ReportOptions:
    results: Path = Path("results")
    layout: str = "auto"
    runs: str | None = None  # glob on run-folder names
    methods: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()  # short names or lmms-eval names
    sort: str | None = None  # a column key or header
    delta_vs: str | None = None  # inference: default fastv when present
    reference: str | None = None  # default vanilla (differences omitted when absent)
    allow_mixed: bool = False
    metrics: tuple[str, ...] = ()  # metric names shown per task (default: each task's first)
    seed: int = 0
    resamples: int = RESAMPLES
    plots: bool = False  # also draw the figures (plots.py) into Report.figures
    plot_metric: str | None = None  # the efficiency plots' metric (default: overall, else the task's primary)


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
        from vtcbench.report.plots import report_figures

        report.figures, report.figure_notes = report_figures(shown, [run for run in runs if not run.is_sweep], options)
    return report


def _auto_layout(plain: list[Run], sweeps: list[Run], reference: str) -> str:
    if sweeps and not plain:
        return "sweep"
    compared = [run for run in plain if run.method != reference]
    if len({run.method for run in compared}) == 1 and len({_params_text(run.params) for run in compared}) > 1:
        return "ablation"
    return "efficiency"


def _check_models(runs: list[Run], allow_mixed: bool) -> None:
    models = sorted({run.model for run in runs})
    if len(models) > 1 and not allow_mixed:
        raise VtcbenchError(
            f"the selected runs are of different models ({', '.join(models)}); select one with --runs or --methods, "
            "or pass --allow-mixed"
        )


# -- what a row knows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskColumn:
    short: str  # the task's name (vtcshapes, mme, ...)
    metric: str  # lmms-eval's key, `name,filter`
    percent: bool  # a fraction, shown in %
    mme: bool  # MME's score (0..2800), divided by 2000 in the average
    primary: bool = True  # the task's first metric (`--metrics` adds others)

    @property
    def key(self) -> str:
        """The column's key and header: the task, or `task metric` for a metric `--metrics` named."""
        return self.short if self.primary else f"{self.short} {self.metric.partition(',')[0]}"


@dataclass
class Context:
    """The rows of a table and everything their cells are computed from."""

    rows: list[Run]
    pool: list[Run]  # every readable run (references are found here, shown or not)
    options: ReportOptions
    reference: str
    tasks: list[TaskColumn] = field(init=False)
    mixed: bool = field(init=False)
    _estimates: dict[tuple[str, str, str], Estimate | None] = field(default_factory=dict, init=False)
    _compared: dict[str, Run] = field(default_factory=dict, init=False)
    _documents_differ: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.rows = sorted(self.rows, key=lambda run: (run.model, run.method != self.reference, run.method,
                                                       _natural(run.params), run.name))
        self.mixed = len({run.model for run in self.rows}) > 1
        self.tasks = self._task_columns()

    # runs and tasks

    def _task_columns(self) -> list[TaskColumn]:
        order: list[str] = []
        for run in self.rows:
            order += [s for s in (_short(t) for t in run.summary.get("tasks", {})) if s not in order]
        wanted = [_short(t) for t in self.options.tasks]
        for task in wanted:
            if task not in order:
                raise choices_error("task", task, order)
        columns = []
        for short in wanted or order:
            source = next(r for r in [self.reference_of(self.rows[0]), *self.rows] if r and self.task_name(r, short))
            reported = source.summary["tasks"][self.task_name(source, short)]["metrics"]
            primary = primary_metric(reported)
            if primary is None:
                continue
            named = [key for name in self.options.metrics for key in reported if key.partition(",")[0] == name]
            for metric in named or [primary]:
                values = [e.value for run in self.rows if (e := self.estimate(run, short, metric)) is not None]
                name = metric.partition(",")[0]
                columns.append(TaskColumn(short, metric, all(0 <= v <= 1 for v in values),
                                          name.startswith("mme") and name.endswith("_score"), not named))
        return columns

    def task_name(self, run: Run, short: str) -> str | None:
        """The run's own name of the task (local runs: `vtc_local_<task>`)."""
        return next((name for name in run.summary.get("tasks", {}) if _short(name) == short), None)

    def reference_of(self, run: Run, method: str | None = None) -> Run | None:
        """The run of `method` (default: the reference) with the same model, the same settings
        where there is one; None for a run of that method itself."""
        method = method or self.reference
        if run.method == method:
            return None
        candidates = [r for r in self.pool if r.method == method and r.model == run.model]
        same = [r for r in candidates if all(r.identity.get(k) == run.identity.get(k) for k in (*SETTING_FIELDS, "dtype"))]
        chosen = min(same or candidates, key=lambda r: r.name, default=None)
        if chosen is not None:
            self._compared[chosen.name] = chosen
        return chosen

    def estimate(self, run: Run, short: str, metric: str) -> Estimate | None:
        key = (run.name, short, metric)
        if key not in self._estimates:
            task = self.task_name(run, short)
            entry = run.summary["tasks"].get(task) if task else None
            self._estimates[key] = None if entry is None else estimate(
                entry.get("metrics", {}), run.samples, task, metric, resamples=self.options.resamples,
                seed=self.options.seed,
            )
        return self._estimates[key]

    # cells

    def label(self, run: Run, *, with_params: bool = True) -> str:
        params = _params_text(run.params)
        text = f"{run.method} ({params})" if with_params and params else run.method
        return f"{run.model}: {text}" if self.mixed else text

    def score_cells(self, run: Run) -> dict[str, Cell]:
        """Each task's value with its interval and its difference from the reference; the average."""
        reference = self.reference_of(run)
        cells: dict[str, Cell] = {}
        for task in self.tasks:
            own = self.estimate(run, task.short, task.metric)
            if own is None:
                cells[task.key] = None
                continue
            scale = 100.0 if task.percent else 1.0
            delta = None
            other = self.estimate(reference, task.short, task.metric) if reference else None
            if other is not None:
                delta = self._difference(own, other, scale)
            cells[task.key] = _score(own, scale, delta, clip=task.percent)
        if self.averaged:
            average = self.average(run)
            reference_average = self.average(reference) if reference else None
            delta = None
            if average is not None and reference_average is not None:
                delta = Score(average - reference_average, signed=True)
            cells["average"] = None if average is None else Score(average, delta=delta)
        return cells

    def difference_cells(self, run: Run, other: Run) -> dict[str, Cell]:
        """run - other per task (paired interval) and for the average: a difference row."""
        cells: dict[str, Cell] = {}
        for task in self.tasks:
            own, theirs = self.estimate(run, task.short, task.metric), self.estimate(other, task.short, task.metric)
            cells[task.key] = (
                None if own is None or theirs is None else self._difference(own, theirs, 100.0 if task.percent else 1.0)
            )
        if self.averaged:
            mine, theirs = self.average(run), self.average(other)
            cells["average"] = None if mine is None or theirs is None else Score(mine - theirs, signed=True)
        return cells

    def _difference(self, own: Estimate, other: Estimate, scale: float) -> Score:
        difference = paired_difference(own, other, resamples=self.options.resamples, seed=self.options.seed)
        if difference.documents and difference.documents < max(len(own.scores or ()), len(other.scores or ())):
            self._documents_differ = True
        interval = difference.interval
        return Score(
            difference.value * scale, interval.low * scale if interval else None, interval.high * scale if interval else None,
            marked=difference.excludes_zero, signed=True,
        )

    @property
    def averaged(self) -> bool:
        """An average column: several tasks, one metric each (an average over one task's metrics
        would mix its families with their overall)."""
        return len(self.tasks) > 1 and all(task.primary for task in self.tasks)

    def average(self, run: Run) -> float | None:
        """The mean of the task columns in % (MME's score / 2000); None when a task is missing."""
        values = []
        for task in self.tasks:
            own = self.estimate(run, task.short, task.metric)
            if own is None:
                return None
            values.append(own.value * 100 / MME_FULL_SCORE if task.mme else own.value * (100 if task.percent else 1))
        return math.fsum(values) / len(values) if values else None

    def task_mean(self, run: Run, read: Callable[[dict[str, Any]], float | None]) -> float | None:
        """A per-task summary quantity over the shown tasks, weighted by their samples."""
        values, weights = [], []
        for task in self.tasks:
            name = self.task_name(run, task.short)
            entry = run.summary["tasks"].get(name) if name else None
            value = read(entry) if entry else None
            if value is not None:
                values.append(value)
                weights.append(entry.get("samples") or 1)
        if len(set(values)) == 1:  # one task, or the same value on each: exactly that value
            return values[0]
        return math.fsum(v * w for v, w in zip(values, weights)) / sum(weights) if values else None

    def tokens(self, run: Run) -> float | None:
        return self.task_mean(run, lambda e: _mean(e.get("mean_image_tokens_per_layer")))

    def token_total(self, run: Run) -> float | None:
        return self.task_mean(run, lambda e: sum(e["mean_image_tokens_per_layer"]) if e.get("mean_image_tokens_per_layer") else None)

    def tflops(self, run: Run) -> float | None:
        return self.task_mean(run, lambda e: e.get("tflops_image"))

    def prefill(self, run: Run) -> float | None:
        return self.task_mean(run, lambda e: e.get("prefill_ms_median"))

    def speedup(self, run: Run) -> float | None:
        vanilla = run if run.method == "vanilla" else self.reference_of(run, "vanilla")
        mine, theirs = self.prefill(run), self.prefill(vanilla) if vanilla else None
        return theirs / mine if mine and theirs else None

    def compression_ratio(self, run: Run) -> float | None:
        """N*L / the run's token total (LLaVolta's CR), N*L from vanilla's run or the model's facts."""
        vanilla = run if run.method == "vanilla" else self.reference_of(run, "vanilla")
        full = self.token_total(vanilla) if vanilla else _full_total(run.model)
        total = self.token_total(run)
        return full / total if full and total else None

    # footnotes

    def footnotes(self) -> list[str]:
        notes = []
        if self.tasks:
            metrics = ", ".join(f"{t.key}: {t.metric.partition(',')[0]}{' (%)' if t.percent else ''}" for t in self.tasks)
            which = "the metrics named by --metrics" if self.options.metrics else "lmms-eval's first metric of each task"
            notes.append(f"Task columns: {which} ({metrics}).")
        notes += self._interval_notes()
        notes.append(self._delta_note())
        if self._documents_differ:
            notes.append("Some compared runs scored different documents: differences use the documents both scored.")
        if self.averaged:
            mme = " (MME's score divided by 2000, as LLaVolta and PyramidDrop average it)" if any(t.mme for t in self.tasks) else ""
            notes.append(f"average: the mean of the task columns{mme}, without an interval; - where a task is missing.")
        notes += self._provenance_notes()
        return notes

    def _interval_notes(self) -> list[str]:
        notes = [
            (f"[low, high]: 95% percentile-bootstrap interval over documents ({self.options.resamples:,} resamples, "
             f"seed {self.options.seed}).")
        ]
        fallback, missing, aggregated = [], [], []
        for run in self.rows:
            for task in self.tasks:
                own = self.estimate(run, task.short, task.metric)
                if own is None or own.source == BOOTSTRAP:
                    continue
                if own.source == AGGREGATE:
                    aggregated.append(f"{self.label(run)} on {task.key}")
                    continue
                scored = any("metrics" in r for r in run.samples if r.get("task") == self.task_name(run, task.short))
                why = "not a mean of per-document scores" if scored else "older folder without per-document scores"
                where = f"{self.label(run)} on {task.key}"
                if own.source == NONE:
                    missing.append(f"{where} ({why})")
                else:
                    fallback.append(f"{where} ({why}; {'bootstrap' if own.source == STDERR else 'CLT'} SE)")
        if aggregated:
            notes.append(
                "Interval from the bootstrap of lmms-eval's own aggregation (not a mean of per-document scores), "
                f"resampling documents as it groups them (MME: image pairs), {AGGREGATION_RESAMPLES:,} resamples, for: "
                + "; ".join(aggregated) + "."
            )
        if fallback:
            notes.append("Interval from lmms-eval's standard error (value ± 1.96 SE) for: " + "; ".join(fallback) + ".")
        if missing:
            notes.append("No interval (neither per-document scores nor a standard error) for: " + "; ".join(missing) + ".")
        return notes

    def _delta_note(self) -> str:
        if not any(self.reference_of(run) for run in self.rows):
            return f"No {self.reference} run of this model: no differences shown."
        return (
            f"Δ: difference from {self.reference} (same model), paired bootstrap over the documents both runs scored; "
            "* where its 95% interval excludes 0; without an interval where a run has no per-document scores."
        )

    def _provenance_notes(self) -> list[str]:
        compared = {run.name: run for run in self.rows} | self._compared
        runs = sorted(compared.values(), key=lambda r: r.name)
        differing, common = [], []
        for key, title in PROVENANCE_FIELDS:
            groups: dict[str, list[str]] = {}
            for run in runs:
                groups.setdefault(_provenance_value(key, run.provenance.get(key)), []).append(self.label(run))
            if len(groups) > 1:
                differing.append(f"{title}: " + "; ".join(f"{value} ({', '.join(sorted(set(names)))})" for value, names in groups.items()))
            else:
                common.append(f"{title} {next(iter(groups))}")
        for key in SETTING_FIELDS:
            groups = {}
            for run in runs:
                groups.setdefault(str(run.identity.get(key)), []).append(self.label(run))
            if len(groups) > 1:
                differing.append(f"{key}: " + "; ".join(f"{value} ({', '.join(sorted(set(names)))})" for value, names in groups.items()))
        notes = [f"Runs: {', '.join(common)}."] if common else []
        if differing:
            notes.append("Compared runs differ in " + " | ".join(differing) + ".")
        return notes


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
    varying = [k for k in keys if len({_params_text({k: p.get(k)}) for p in settings}) > 1] or keys
    columns = [
        METHOD, *(Column(f"param_{k}", k, "text") for k in varying),
        Column("tokens", "visual tokens", "tokens"), Column("tflops", "TFLOPs", "tflops"), *_task_columns(context),
    ]
    rows = []
    for run in context.rows:
        params = {f"param_{k}": _value_text(run.params[k]) if k in run.params else None for k in varying}
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
    task = ", ".join(_short(t) for t in run.identity.get("tasks", []))
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
                return (0, _natural(value))
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


def _score(own: Estimate, scale: float, delta: Score | None, *, clip: bool) -> Score:
    """A run's cell; a fraction's interval clipped to [0, 100]% (value ± 1.96 SE can leave it)."""
    if own.interval is None:
        return Score(own.value * scale, delta=delta)
    low, high = own.interval.low * scale, own.interval.high * scale
    if clip:
        low, high = max(low, 0.0), min(high, 100.0)
    return Score(own.value * scale, low, high, delta=delta)


def _short(task: str) -> str:
    from vtcbench.tasks.registry import short_name

    return short_name(task)


def _mean(values: list[float] | None) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_value_text(v)}" for k, v in params.items())


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "auto"
    return str(value)


def _natural(value: Any) -> tuple:
    """A sort key where numbers order as numbers and before text (0.4 < 0.5 < 16)."""
    if isinstance(value, dict):
        return tuple((k, _natural(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_natural(v) for v in value)
    if isinstance(value, bool) or value is None:
        return (1, str(value))
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))


def _provenance_value(key: str, value: Any) -> str:
    if key == "git_revision" and isinstance(value, str):
        base, plus, rest = value.partition("+")
        return base[:12] + plus + rest
    return "-" if value is None else str(value)


def _full_total(model: str) -> float | None:
    """N*L of a model alias from its shipped config (no download); None for other models."""
    from vtcbench.families import model_facts
    from vtcbench.models import MODELS, load_config

    if model not in MODELS:
        return None
    facts = model_facts(load_config(model))
    return float(facts.image_tokens * facts.n_layers)
