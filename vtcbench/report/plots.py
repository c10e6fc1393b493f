"""Figures of a report (docs/report.md, "Plots"): accuracy against cost, and retention pictures.

- `efficiency_plots`: per model and task, the task's headline metric (`--plot-metric`, else
  `overall`, else the task's primary metric) against the compute on image tokens (`tflops_image`, the papers' convention) and against the median prefill time, one point
  per run with the 95% interval the tables print (stats.py, through context.Context), and the
  Pareto front (higher metric at lower cost) as a step line, its points ringed (PyramidDrop
  Fig. 4).
- `retention_picture`: PyramidDrop Fig. 5: one sample's image with the image tokens kept at each
  stage, the dropped patches greyed out, one panel per distinct kept set.

Figures are drawn on matplotlib's Agg canvas without pyplot (no global figure registry, nothing
left open) and returned as PNG bytes (`model.Figure`), sized for a paper: 6.5 inches wide at
200 dpi (1300 pixels) for the efficiency plots, at most 7 inches for the retention pictures.
"""

from __future__ import annotations

import io
import math
import struct
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vtcbench.errors import choices_error
from vtcbench.report.context import (
    Context,
    ReportOptions,
    TaskColumn,
    params_text,
    score_cell,
    short_task,
)
from vtcbench.report.folders import Run, load_runs
from vtcbench.report.model import Figure
from vtcbench.results import atomic_file, primary_metric

DPI = 200
EFFICIENCY_WIDTH = 6.5  # inches: a two-column paper's full width
EFFICIENCY_HEIGHT = 3.0  # inches, without the legend below the panels
LEGEND_ROW = 0.2  # inches per legend row
RETENTION_MAX_WIDTH = 7.0
RETENTION_PANEL = 1.7  # inches per panel side at most
RETENTION_COLUMNS = 4  # panels per row
DROPPED_RGBA = (0.55, 0.55, 0.55, 0.82)  # the grey laid over a dropped patch
#: translucent tints told apart by neighbouring merged groups (tab10's blue, orange, green, purple)
MERGED_RGBA = ((0.12, 0.47, 0.71, 0.45), (1.0, 0.5, 0.05, 0.45), (0.17, 0.63, 0.17, 0.45), (0.58, 0.4, 0.74, 0.45))
GRID_RGBA = (0.5, 0.5, 0.5, 0.45)  # the patch boundaries
GRID_LINES_UP_TO = 32  # patches per side up to which their boundaries are drawn
LOG_SPAN = 10.0  # a cost axis is logarithmic when its largest value exceeds this times its smallest
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_FLOPS_UNITS = (("TFLOPs", 1.0), ("GFLOPs", 1e3), ("MFLOPs", 1e6), ("kFLOPs", 1e9))


# -- the Pareto front ---------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, metric) points that no other point dominates, cheapest first.

    A point dominates another when it costs no more and scores no less, and is strictly better
    in one of the two. Equal points do not dominate each other: both are on the front. Among
    points of equal cost only the best scoring are; among points of equal metric only the
    cheapest. Points with a non-finite coordinate are never on it."""
    finite = [i for i, (c, m) in enumerate(points) if math.isfinite(c) and math.isfinite(m)]
    front = []
    for i in finite:
        cost, metric = points[i]
        dominated = any(
            points[j][0] <= cost and points[j][1] >= metric and (points[j][0] < cost or points[j][1] > metric)
            for j in finite if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


# -- efficiency plots ---------------------------------------------------------------------------------


def efficiency_plots(
    source: Sequence[Run] | ReportOptions, options: ReportOptions | None = None, *, pool: Sequence[Run] | None = None
) -> list[Figure]:
    """Per model and task, one figure with two panels: the task's headline metric
    (`_plotted_columns`) against the compute on image tokens (`tflops_image`, log scale when it spans more than 10x) and against
    the median prefill time (`prefill_ms_median`); a point per run with its 95% interval (the
    same intervals as the tables), the Pareto front as a step line with its points ringed.

    `source`: run folders (`folders.Run`), or a `ReportOptions` (read from its `results` with its
    `runs` / `methods` / `tasks` selection). `pool`: the runs the reference is looked up in
    (default: `source`). Sweep folders are left out (their own curves.png plots them). A
    `plot_metric` that no task column shows raises VtcbenchError (one line, the valid choices)."""
    if isinstance(source, ReportOptions):
        options, (runs, pool) = source, _selected(source)
    else:
        runs = list(source)
        options = options or ReportOptions()
    runs = [run for run in runs if not run.is_sweep]
    pool = [run for run in (pool if pool is not None else runs) if not run.is_sweep]
    contexts = {}
    for model in sorted({run.model for run in runs}):
        rows = [run for run in runs if run.model == model]
        contexts[model] = Context(rows, [run for run in pool if run.model == model] or rows, options,
                                  options.reference or "vanilla")
    shown = {column.metric.partition(",")[0] for context in contexts.values() for column in context.tasks}
    if options.plot_metric is not None and options.plot_metric not in shown:
        raise choices_error("plot metric", options.plot_metric, sorted(shown))
    figures = []
    for model, context in contexts.items():
        styles = {run.name: (_COLOURS[i % len(_COLOURS)], _MARKERS[i % len(_MARKERS)]) for i, run in enumerate(context.rows)}
        for task in _plotted_columns(context, options.plot_metric):
            figure = _efficiency_figure(context, model, task, styles)
            if figure is not None:
                figures.append(figure)
    return figures


def _plotted_columns(context: Context, plot_metric: str | None) -> list[TaskColumn]:
    """One column per task, the headline a reader expects rather than whichever `--metrics` listed
    first: `plot_metric` where the task shows it, else `overall`, else the task's primary metric
    (lmms-eval's first), else its first column."""
    by_task: dict[str, list[TaskColumn]] = {}
    for column in context.tasks:
        by_task.setdefault(column.short, []).append(column)
    chosen = []
    for short, columns in by_task.items():
        source = next(run for run in context.rows if context.task_name(run, short))
        primary = primary_metric(source.summary["tasks"][context.task_name(source, short)]["metrics"])
        names = {column.metric.partition(",")[0]: column for column in columns}
        wanted = (plot_metric, "overall", (primary or "").partition(",")[0])
        chosen.append(next((names[name] for name in wanted if name in names), columns[0]))
    return chosen


def _efficiency_figure(context: Context, model: str, task: TaskColumn, styles: dict[str, tuple[str, str]]) -> Figure | None:
    scale = 100.0 if task.percent else 1.0
    metric_name = task.metric.partition(",")[0]
    points = []  # (run, label, value, low, high, tflops, prefill)
    for run in context.rows:
        own = context.estimate(run, task.short, task.metric)
        if own is None:
            continue
        score = score_cell(own, scale, None, clip=task.percent)
        entry = run.summary["tasks"][context.task_name(run, task.short)]
        points.append((run, context.label(run), score.value, score.low, score.high,
                       _positive(entry.get("tflops_image")), _positive(entry.get("prefill_ms_median"))))
    if not points:
        return None
    tflops = [p[5] for p in points if p[5] is not None]
    unit, factor = _flops_unit(max(tflops) if tflops else 1.0)
    panels = (
        (f"Compute on image tokens ({unit})", 5, factor, f"{task.short} vs. compute"),
        ("Prefill time, median per sample (ms)", 6, 1.0, f"{task.short} vs. prefill time"),
    )
    labels = [_wrap(p[1]) for p in points]
    columns = 3 if max(len(line) for label in labels for line in label.split("\n")) <= 30 else 2
    legend_rows = math.ceil((len(points) + 1) / columns) + sum(label.count("\n") for label in labels) // columns
    figure, canvas = _new_figure(EFFICIENCY_WIDTH, EFFICIENCY_HEIGHT + LEGEND_ROW * legend_rows)
    axes = figure.subplots(1, 2, sharey=True)
    named = metric_name if metric_name.startswith(task.short) else f"{task.short} {metric_name}"
    y_label = f"{named} (%)" if task.percent else f"{named} (score)"
    missing = []
    for ax, (x_label, column, x_scale, title) in zip(axes, panels):
        shown = [(p, p[column] * x_scale) for p in points if p[column] is not None]
        missing += [f"{p[1]} has no {'TFLOPs' if column == 5 else 'prefill time'}" for p in points if p[column] is None]
        for (run, label, value, low, high, *_), x in shown:
            colour, marker = styles[run.name]
            error = None if low is None or high is None else [[max(value - low, 0.0)], [max(high - value, 0.0)]]
            ax.errorbar([x], [value], yerr=error, color=colour, marker=marker, markersize=4.5, linestyle="none",
                        elinewidth=0.9, capsize=2, label=_wrap(label), zorder=3)
        front = [shown[i] for i in pareto_front([(x, p[2]) for p, x in shown])]
        if front:
            xs, ys = [x for _, x in front], [p[2] for p, _ in front]
            ax.step(xs, ys, where="post", color="#444444", linewidth=1.0, linestyle="--", zorder=2)
            ax.scatter(xs, ys, s=95, facecolors="none", edgecolors="#222222", linewidths=0.9, zorder=4)
        values = [x for _, x in shown]
        if values and min(values) > 0 and max(values) > LOG_SPAN * min(values):
            _log_axis(ax)
        ax.margins(x=0.12, y=0.08)
        ax.set_xlabel(x_label, fontsize=8)
        ax.set_title(title, fontsize=8.5)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
    axes[0].set_ylabel(y_label, fontsize=8)
    axes[1].tick_params(labelleft=True)
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = [label for label in labels if label in handles]
    if any(len(pareto_front([(p[c], p[2]) for p in points if p[c] is not None])) for c in (5, 6)):
        from matplotlib.lines import Line2D

        handles["Pareto front"] = Line2D([], [], color="#444444", linewidth=1.0, linestyle="--", marker="o", markersize=7,
                                         markerfacecolor="none", markeredgecolor="#222222", markeredgewidth=0.9)
        order.append("Pareto front")
    figure.legend([handles[label] for label in order], order, loc="outside lower center", ncols=columns, fontsize=7,
                  frameon=False, handletextpad=0.4, columnspacing=1.4)
    documents = _documents(context, points, task)
    figure.suptitle(f"{task.short}: {metric_name} against cost, {model}{documents}", fontsize=9.5)
    png = _png(figure, canvas)
    methods = ", ".join(p[1] for p in points)
    alt = (f"Two scatter plots for {model} on {task.short}: {metric_name}{' in %' if task.percent else ''} against "
           f"compute on image tokens in {unit} (left) and against median prefill time in ms (right), one point with "
           f"a 95% interval per run ({methods}), the Pareto front as a dashed step line.")
    caption = (f"{task.short} ({model}): {metric_name}{' (%)' if task.percent else ''} against the decoder's "
               f"multiply-accumulates on image tokens ({unit}; tflops_image, the papers' convention) and against the "
               "median prefill time (ms). Bars: the 95% intervals of the tables, where they have one. Dashed step "
               "line and ringed points: the Pareto front (the runs no other run matches or beats at no higher cost).")
    if missing:
        caption += " Not plotted: " + "; ".join(sorted(set(missing))) + "."
    return Figure(f"efficiency__{_slug(model)}__{_slug(task.short)}.png", png, alt, caption,
                  tuple(p[3] for p in panels), *_png_size(png))


def _documents(context: Context, points: list, task: TaskColumn) -> str:
    counts = {len(e.scores) for p in points if (e := context.estimate(p[0], task.short, task.metric)) and e.scores}
    return f", {counts.pop()} documents" if len(counts) == 1 else ""


def _log_axis(ax: Any) -> None:
    """A logarithmic x axis labelled with plain numbers at 1, 2, 5 x 10^k (no 2x10^1 clutter)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _flops_unit(largest_tflops: float) -> tuple[str, float]:
    """The unit whose numbers are at least 1 (vtc-tiny's costs are MFLOPs, LLaVA's TFLOPs)."""
    for unit, factor in _FLOPS_UNITS:
        if largest_tflops * factor >= 1:
            return unit, factor
    return _FLOPS_UNITS[-1]


def _positive(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def _wrap(label: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(label, width, break_long_words=False, break_on_hyphens=False)) or label


# -- retention pictures -------------------------------------------------------------------------------


def retention_picture(
    image: Any, kept: Mapping[Any, Sequence[int]], grid: Sequence[int], *, title: str | None = None,
    name: str = "retention.png", merged: Mapping[Any, Sequence[Sequence[int]]] | None = None,
) -> Figure:
    """PyramidDrop Fig. 5: the image with the image tokens kept at each stage, one panel per
    distinct kept set in layer order ("layer K: n tokens"), the dropped patches greyed out.

    `image`: a PIL image, a path, or None (then a plain background). It is center-cropped to a
    square as CLIP's processor does (resize the short side, crop the middle), the crop divided
    into the `grid` (rows, cols) of patches whose tokens are numbered in raster order. `kept`:
    {layer: sorted indices of the kept tokens}, as `vtcbench run --keep-indices` records them;
    a layer whose set equals the previous one's adds no panel. `merged`: {layer: per new token,
    the indices it merged} where a method pooled or clustered tokens (llavolta, kmeans): that
    panel tints each merged group in its own colour instead of greying anything out, since
    nothing was dropped. The returned Figure's `panels` are the panels' titles. Raises
    ValueError on indices outside the grid."""
    rows, cols = (int(v) for v in grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"image_grid {list(grid)} is not a grid")
    stages = _stages(kept, rows * cols)
    pixels = _square(image)
    count = len(stages)
    ncols = min(count, RETENTION_COLUMNS)
    nrows = math.ceil(count / ncols)
    side = min(RETENTION_PANEL, (RETENTION_MAX_WIDTH - 0.2) / ncols)
    width = ncols * side + 0.2
    title_lines = textwrap.wrap(title, int(width * 13)) if title else []  # about 13 characters an inch at 8.5 pt
    height = nrows * (side + 0.24) + 0.2 * len(title_lines) + 0.08
    figure, canvas = _new_figure(width, height)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    titles = []
    extent = (0, cols, rows, 0)
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= count:
            continue
        layer, indices = stages[index]
        if pixels is not None:
            ax.imshow(pixels, extent=extent, interpolation="lanczos")
        else:
            ax.imshow([[[0.97, 0.97, 0.97]]], extent=extent)
        groups = (merged or {}).get(str(layer), (merged or {}).get(layer))
        overlay = [[DROPPED_RGBA] * cols for _ in range(rows)]
        if groups:
            for number, members in enumerate(groups):
                for token in members:
                    if 0 <= token < rows * cols:
                        overlay[token // cols][token % cols] = MERGED_RGBA[number % len(MERGED_RGBA)]
        else:
            for token in indices:
                overlay[token // cols][token % cols] = (0.0, 0.0, 0.0, 0.0)
        ax.imshow(overlay, extent=extent, interpolation="nearest")
        if max(rows, cols) <= GRID_LINES_UP_TO:  # the patches, one token each
            ax.vlines(range(1, cols), 0, rows, colors=GRID_RGBA, linewidths=0.3)
            ax.hlines(range(1, rows), 0, cols, colors=GRID_RGBA, linewidths=0.3)
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        ax.set_aspect("equal")
        text = f"layer {layer}: {len(indices)} token{'s' if len(indices) != 1 else ''}{' (merged)' if groups else ''}"
        ax.set_title(text, fontsize=8, pad=3)
        titles.append(text)
    if title_lines:
        figure.suptitle("\n".join(title_lines), fontsize=8.5)
    png = _png(figure, canvas)
    alt = ((title + ": " if title else "") + f"the image in {count} panel(s), the {rows}x{cols} patches whose tokens "
           "were dropped greyed out: " + "; ".join(titles) + ".")
    caption = ((title + ". " if title else "") + "Image tokens kept at each stage (PyramidDrop Fig. 5): "
               f"{rows}x{cols} patches of the center-cropped image, dropped ones greyed out; one panel per layer where "
               "the kept set changes; where tokens were merged (pooling, clustering), each merged group in its own tint.")
    return Figure(name, png, alt, caption, tuple(titles), *_png_size(png))


def _stages(kept: Mapping[Any, Sequence[int]], tokens: int) -> list[tuple[int, list[int]]]:
    if not isinstance(kept, Mapping) or not kept:
        raise ValueError("kept_image_tokens is empty or not an object")
    stages: list[tuple[int, list[int]]] = []
    for key in sorted(kept, key=lambda k: int(k)):
        indices = kept[key]
        if not isinstance(indices, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise ValueError(f"kept_image_tokens[{key!r}] is not a list of integers")
        bad = [i for i in indices if not 0 <= i < tokens]
        if bad:
            raise ValueError(f"kept_image_tokens[{key!r}] holds {bad[0]}, outside the {tokens} tokens of image_grid")
        indices = sorted(set(indices))
        if not stages or stages[-1][1] != indices:
            stages.append((int(key), indices))
    return stages


def _square(image: Any) -> Any:
    """The image center-cropped to a square as CLIP's processor does, as an RGB array; None for no image."""
    if image is None:
        return None
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side > 672:  # more pixels than a 1.7-inch panel at 200 dpi shows
        image = image.resize((672, 672), Image.Resampling.LANCZOS)
    return np.asarray(image)


def retention_pictures(runs: Sequence[Run], results: Path) -> tuple[list[Figure], list[str]]:
    """A retention picture for the first sample of each run that recorded its kept image tokens
    (`vtcbench run --keep-indices N`); and a note per run whose record could not be drawn."""
    figures, notes = [], []
    for run in runs:
        record = next((r for r in run.samples if "kept_image_tokens" in r), None)
        if record is None:
            continue
        folder = _folder(Path(results), run)
        task = str(record.get("task", "?"))
        doc = record.get("doc_id", "?")
        params = params_text(run.params)
        title = f"{run.method}{f' ({params})' if params else ''} on {short_task(task)}, document {doc}"
        name = f"retention__{_slug(run.name)}__{_slug(short_task(task))}__{_slug(str(doc))}.png"
        image: Path | None = None
        relative = record.get("retention_image")
        if isinstance(relative, str) and relative:
            candidate = folder / relative
            if candidate.resolve().is_relative_to(folder.resolve()) and candidate.is_file():
                image = candidate
        if image is None:
            notes.append(f"{run.name}: retention image {relative!r} not found; drawn on a plain background")
        try:
            figures.append(retention_picture(image, record["kept_image_tokens"], record.get("image_grid") or (), title=title,
                                             name=name, merged=record.get("merged_image_tokens")))
        except (ValueError, TypeError, OSError) as error:
            notes.append(f"{run.name}: no retention picture ({error})")
    return figures, notes


def _folder(results: Path, run: Run) -> Path:
    """The run's folder: `results/<name>`, or `results` itself when it is the run folder."""
    folder = results / run.name
    return folder if folder.is_dir() else results


# -- everything a report draws, and writing it --------------------------------------------------------


def report_figures(runs: Sequence[Run], pool: Sequence[Run], options: ReportOptions) -> tuple[list[Figure], list[str]]:
    """The efficiency plots of the selected runs, then their retention pictures; notes on what
    could not be drawn."""
    plain = [run for run in runs if not run.is_sweep]
    figures = efficiency_plots(plain, options, pool=pool)
    retention, notes = retention_pictures(plain, options.results)
    return figures + retention, notes


def write_figures(figures: Sequence[Figure], folder: Path) -> list[Path]:
    """Each figure as `folder/<name>`, written beside and renamed over (never half a file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for figure in figures:
        target = folder / figure.name
        with atomic_file(target, "wb") as handle:
            handle.write(figure.png)
        paths.append(target)
    return paths


def _selected(options: ReportOptions) -> tuple[list[Run], list[Run]]:
    runs, _ = load_runs(options.results, options.runs)
    shown = [run for run in runs if not options.methods or run.method in options.methods]
    return shown, runs


# -- matplotlib without pyplot ------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MatplotlibFigure

    figure = MatplotlibFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    return figure, FigureCanvasAgg(figure)


def _png(figure: Any, canvas: Any) -> bytes:
    """The figure as PNG bytes at DPI (its size in pixels: inches x DPI); the figure is cleared."""
    buffer = io.BytesIO()
    canvas.print_png(buffer, metadata={"Software": None})
    figure.clear()
    return buffer.getvalue()


def _png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png[16:24])


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.") or "x"
