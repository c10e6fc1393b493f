"""What the tables (tables.py) and the figures (plots.py) share: the report's options, and the
rows of a table with everything their cells are computed from (`Context`: each task's estimate
and interval, the differences from the reference run, the cost columns, the footnotes).

In its own module so that both import it at top level and neither imports the other: the figures
draw the same intervals the tables print.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtcbench.errors import choices_error
from vtcbench.report.aggregation import AGGREGATION_RESAMPLES
from vtcbench.report.folders import Run
from vtcbench.report.model import Cell, Score
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

MME_FULL_SCORE = 2000  # LLaVolta and PyramidDrop average MME's score divided by 2000
#: provenance fields whose difference between compared runs can move their numbers
PROVENANCE_FIELDS = (("device", "device"), ("dtype", "dtype"), ("tf32", "TF32"), ("attention", "attention"),
                     ("transformers", "transformers"), ("git_revision", "git revision"))
SETTING_FIELDS = ("limit", "seed", "random_weights")


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
                                                       natural_key(run.params), run.name))
        self.mixed = len({run.model for run in self.rows}) > 1
        self.tasks = self._task_columns()

    # runs and tasks

    def _task_columns(self) -> list[TaskColumn]:
        order: list[str] = []
        for run in self.rows:
            order += [s for s in (short_task(t) for t in run.summary.get("tasks", {})) if s not in order]
        wanted = [short_task(t) for t in self.options.tasks]
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
        return next((name for name in run.summary.get("tasks", {}) if short_task(name) == short), None)

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
        params = params_text(run.params)
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
            cells[task.key] = score_cell(own, scale, delta, clip=task.percent)
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
        skipped = [
            f"{self.label(run)} on {task.key}: {count}" for run in self.rows for task in self.tasks
            if (count := len(run.summary.get("tasks", {}).get(self.task_name(run, task.short), {}).get("skipped") or []))
        ]
        if skipped:
            notes.append("Documents left out by --skip-bad-documents (each with its cause in the run's summary.json): "
                         + "; ".join(skipped) + ".")
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
            elif (value := next(iter(groups))) != "-":  # (a field no run records, e.g. TF32 on a CPU, says nothing)
                common.append(f"{title} {value}")
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


# -- helpers ----------------------------------------------------------------------------------------


def score_cell(own: Estimate, scale: float, delta: Score | None, *, clip: bool) -> Score:
    """A run's cell; a fraction's interval clipped to [0, 100]% (value ± 1.96 SE can leave it)."""
    if own.interval is None:
        return Score(own.value * scale, delta=delta)
    low, high = own.interval.low * scale, own.interval.high * scale
    if clip:
        low, high = max(low, 0.0), min(high, 100.0)
    return Score(own.value * scale, low, high, delta=delta)


def short_task(task: str) -> str:
    from vtcbench.tasks.registry import short_name

    return short_name(task)


def _mean(values: list[float] | None) -> float | None:
    return math.fsum(values) / len(values) if values else None


def params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={value_text(v)}" for k, v in params.items())


def value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "auto"
    return str(value)


def natural_key(value: Any) -> tuple:
    """A sort key where numbers order as numbers and before text (0.4 < 0.5 < 16)."""
    if isinstance(value, dict):
        return tuple((k, natural_key(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(natural_key(v) for v in value)
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
