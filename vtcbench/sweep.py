"""Redundancy sweeps (docs/sweep.md): task accuracy over a layer x retained-share grid, in one pass.

The studies behind PyramidDrop (Fig. 1, Fig. 3: keep a share of the image tokens from layer K
on, ranked by the last instruction token's attention) and LLaVolta (Fig. 1 left: average pooling
at layer K) each evaluate every point separately. Here a cell (K, r) is the `vtcbench run` of an
equivalent method, so its numbers are that run's:

- `attention`: `pdrop` with `layers=K`, `keep_ratio=r` (layer K's own projections, keep int(N r),
  positions compacted); K >= 1, since layer 0's input has no attention to rank by;
- `pool`: `llavolta` with `layer=K`, `stride=1/r` (r must be 1/S for a stride S dividing N);
- `random`: `random` with `layer=K`, `drop_ratio=1-r`, `seed` (keeps round(N r)).

Ratio 1.0 is vanilla at every layer: one cell for the whole sweep. The cells share vanilla's
layers below their K (`sweep_lmm.SweepLMM`), and each is scored by lmms-eval with the task's own
`process_results` and aggregation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vtcbench.errors import VtcbenchError, choices_error
from vtcbench.families import ModelFacts, model_facts
from vtcbench.methods import Method, get_method
from vtcbench.models import load_config
from vtcbench.results import atomic_file, primary_metric, sample_score

CRITERIA = ("attention", "pool", "random")
#: PyramidDrop's layers (Fig. 1: 2, 8, 16, 24 of LLaVA-1.5's 32), scaled to the model's depth
PAPER_LAYERS_OF_32 = (2, 8, 16, 24)
DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 11))


@dataclass(frozen=True)
class Cell:
    """One point of the grid: keep a share `ratio` of the image tokens from `layer` on."""

    layer: int | None  # None: vanilla (ratio 1.0)
    ratio: float

    @property
    def id(self) -> str:
        return "vanilla" if self.layer is None else f"L{self.layer}-r{self.ratio:g}"

    def method(self, criterion: str, seed: int) -> Method:
        """The method whose `vtcbench run` this cell equals."""
        if self.layer is None:
            return get_method("vanilla")
        if criterion == "attention":
            return get_method("pdrop", layers=(self.layer,), keep_ratio=self.ratio)
        if criterion == "pool":
            return get_method("llavolta", layer=self.layer, stride=round(1 / self.ratio))
        return get_method("random", layer=self.layer, drop_ratio=round(1 - self.ratio, 10), seed=seed)


@dataclass
class SweepConfig:
    model: str = "vtc-tiny"
    task: str = "vtcshapes"
    layers: list[int] | None = None  # None: PAPER_LAYERS_OF_32 scaled to the model
    ratios: list[float] | None = None  # None: 0.1..1.0 (pool: the shares its strides allow)
    #: `tokens=N` or `tflops=X` (vtcbench/budgets.py): instead of `ratios`, each layer's share
    #: solved so that its cell costs the budget (an iso-cost curve over the layers)
    budget: str | None = None
    criterion: str = "attention"
    limit: int | None = None
    seed: int = 0
    batch_size: int = 1
    attention_share: bool = False
    out: Path = Path("results")
    data_dir: Path | None = None
    random_weights: bool = False
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str = "cpu"
    device_map: str | dict | None = None  # accelerate's dispatch (`runner.load_for`), as `vtcbench run`
    max_memory: dict | None = None
    overwrite: bool = False
    show_progress: bool = True


@dataclass
class SweepResult:
    folder: Path
    curves: list[dict[str, Any]]
    metric: str
    seconds: float  # wall time of the whole sweep (computing the cells and scoring them)
    #: sweep_s and separate_runs_s (measured over the generation requests this invocation or an
    #: earlier one computed; separate runs estimated from the trunk's time to each branch layer),
    #: flops_ratio_to_separate_runs (analytic decoder prefill)
    cost: dict[str, float]
    attention_share: list[dict[str, Any]] = field(default_factory=list)
    budget: str | None = None  # the budget each layer's share was solved to, if any


# -- the grid ------------------------------------------------------------------------------------------


def default_layers(n_layers: int) -> list[int]:
    """PyramidDrop's 2, 8, 16, 24 of 32 scaled to `n_layers` (at least 1; 1, 2, 3, 4 of 6)."""
    return sorted({min(n_layers - 1, max(1, round(n_layers * k / 32))) for k in PAPER_LAYERS_OF_32})


def pool_ratios(n_image: int) -> list[float]:
    """The shares stride pooling can give: 1/S for every stride S dividing the token count."""
    return [1 / s for s in range(n_image, 0, -1) if n_image % s == 0]


def plan_cells(config: SweepConfig, facts: ModelFacts) -> list[Cell]:
    """The cells of a sweep, every setting checked against the model (before any weights load)."""
    if config.criterion not in CRITERIA:
        raise choices_error("criterion", config.criterion, list(CRITERIA))
    n_layers, n_image = facts.n_layers, facts.image_tokens
    layers = config.layers if config.layers is not None else default_layers(n_layers)
    low = 1 if config.criterion == "attention" else 0
    for layer in layers:
        if not low <= layer < n_layers:
            raise VtcbenchError(
                f"--layers: {layer} is not a layer where a {config.criterion} branch can start; valid: {low}..{n_layers - 1}"
            )
    if len(set(layers)) != len(layers):
        raise VtcbenchError(f"--layers: {','.join(map(str, layers))} repeats a layer")
    if config.budget is not None:
        if config.ratios is not None:
            raise VtcbenchError("--budget solves each layer's retained share; drop --ratios")
        cells = [Cell(None, 1.0)] + [_budget_cell(config, facts, layer) for layer in sorted(layers)]
        return [cell for cell in cells if cell.layer is None or cell.ratio < 1]
    if config.ratios is not None:
        ratios = list(config.ratios)
    elif config.criterion == "pool":
        ratios = pool_ratios(n_image)[-10:]
    else:
        ratios = list(DEFAULT_RATIOS)
    for ratio in ratios:
        if not 0 < ratio <= 1:
            raise VtcbenchError(f"--ratios: {ratio:g} is outside the retained share's range; valid: (0, 1]")
        if config.criterion == "pool" and not _is_pool_ratio(ratio, n_image):
            valid = ", ".join(f"{r:.4g}" for r in pool_ratios(n_image))
            raise VtcbenchError(
                f"--ratios: {ratio:g} is not 1/S for a stride S dividing the {n_image} image tokens; valid: {valid}"
            )
    cells = [Cell(None, 1.0)]
    cells += [Cell(layer, ratio) for layer in sorted(layers) for ratio in sorted(set(ratios)) if ratio < 1]
    for cell in cells:
        cell.method(config.criterion, config.seed).validate_for(n_image, n_layers)
    return cells


def _budget_cell(config: SweepConfig, facts: ModelFacts, layer: int) -> Cell:
    """The cell at `layer` whose method meets the budget (`budgets.solve` on the criterion's knob)."""
    from vtcbench.budgets import parse_budget, solve

    method = Cell(layer, 0.5).method(config.criterion, config.seed)
    knob = method.budget_knobs[0]
    fixed = {key: value for key, value in method.params().items() if key != knob}
    solved = solve(method.name, fixed, parse_budget(config.budget), facts).method
    value = getattr(solved, knob)
    if knob == "stride":
        return Cell(layer, 1 / value)
    return Cell(layer, value if knob == "keep_ratio" else round(1 - value, 10))  # random: drop_ratio


def _is_pool_ratio(ratio: float, n_image: int) -> bool:
    stride = round(1 / ratio)
    return abs(1 / ratio - stride) < 1e-6 and n_image % stride == 0


# -- the run ---------------------------------------------------------------------------------------------


def sweep(config: SweepConfig) -> SweepResult:
    """Run a redundancy sweep; resumable; every input checked before anything loads."""
    from vtcbench.provenance import provenance
    from vtcbench.results import RunFolder
    from vtcbench.runner import evaluate, load_for, load_tasks, task_names
    from vtcbench.sweep_lmm import Branch, SweepLMM
    from vtcbench.tasks import resolve_tasks

    facts = model_facts(load_config(config.model))
    cells = plan_cells(config, facts)
    infos = resolve_tasks([config.task])
    if config.limit is not None and config.limit < 1:
        raise VtcbenchError(f"--limit: {config.limit} is not a positive count")
    with tempfile.TemporaryDirectory(prefix="vtcbench-tasks-") as workdir:
        names, manager = task_names(infos, config.data_dir, Path(workdir))
        model, processor = load_for(config)
        identity = _identity(config, cells, names)
        folder = RunFolder.open(
            config.out, identity, provenance(model, config.device),
            extra={"sweep_config": {**asdict(config), "out": str(config.out), "data_dir": str(config.data_dir)}},
            overwrite=config.overwrite,
        )
        branches = [
            Branch(cell.id, cell.layer, cell.method(config.criterion, config.seed)) for cell in cells if cell.layer is not None
        ]
        lm = SweepLMM(
            model, processor, branches, folder, batch_size=config.batch_size, show_progress=config.show_progress,
            attention_share=config.attention_share,
        )
        started = time.perf_counter()
        try:
            task_objects = load_tasks(names, manager)
            by_cell = {}
            for cell in cells:  # the first evaluation computes every cell; the others read the run folder
                lm.cell = cell.id
                lm.show_progress = config.show_progress and cell.layer is None
                with _quiet_progress_bars(cell.layer is not None):
                    by_cell[cell.id] = evaluate(
                        lm, task_objects, manager, folder, limit=config.limit, seed=config.seed,
                        batch_size=config.batch_size, log_samples=True,
                    )
        except BaseException:
            folder.discard_if_empty()
            raise
        seconds = time.perf_counter() - started
        folder.reload()
        name = names[0]
        metric = primary_metric(by_cell["vanilla"]["results"][name])
        if metric is None:
            raise VtcbenchError(f"{name} reported no numeric metric: {sorted(by_cell['vanilla']['results'][name])}")
        records = [r for r in folder.finished.values() if r["task"] == name]
        curves = [_curve_row(cell, config, facts, by_cell[cell.id]["results"][name], metric, records) for cell in cells]
        shares = _attention_share(records, folder.path) if config.attention_share else []
        _write_outputs(folder.path, cells, config, by_cell, name, metric, records, curves)
        flops_ratio = _flops_ratio(cells, config, facts, records)
        timed = [r for r in records if "sweep_ms" in r]
        cost = {
            "sweep_s": sum(r["sweep_ms"] for r in timed) / 1000,
            "separate_runs_s": sum(r["separate_ms"] for r in timed) / 1000,
            "flops_ratio_to_separate_runs": flops_ratio,
        }
        folder.write_summary({"identity": identity, "metric": metric, "curves": curves, "cost": cost})
    return SweepResult(folder.path, curves, metric, seconds, cost, shares, config.budget)


@contextmanager
def _quiet_progress_bars(quiet: bool) -> Iterator[None]:
    """lmms-eval's own tqdm bars, printed at each cell's scoring, would bury the sweep's: while
    re-scoring, stderr is held back and shown only if the scoring fails."""
    if not quiet:
        yield
        return
    held = io.StringIO()
    try:
        with redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def _identity(config: SweepConfig, cells: list[Cell], names: list[str]) -> dict[str, Any]:
    return {
        "model": config.model,
        "method": f"sweep-{config.criterion}",
        "tasks": names,
        "cells": [cell.id for cell in cells],
        "budget": config.budget,
        "attention_share": config.attention_share,
        "limit": config.limit,
        "seed": config.seed,
        "random_weights": config.random_weights,
        "dtype": config.dtype,
        "attn_implementation": config.attn_implementation,
        "data_dir": str(config.data_dir.resolve()) if config.data_dir else None,
    }


def _stderr(results: dict, metric: str) -> float | None:
    """lmms-eval's standard error of the metric: its bootstrap or, for aggregations it cannot
    bootstrap (vtcshapes'), its CLT estimate over the per-sample scores; None if it has neither."""
    name, _, filt = metric.partition(",")
    for key in (f"{name}_stderr,{filt}", f"{name}_stderr_clt,{filt}"):
        value = results.get(key)
        if isinstance(value, (int, float)) and not math.isnan(value):
            return float(value)
    return None


def _curve_row(cell: Cell, config: SweepConfig, facts: ModelFacts, results: dict, metric: str, records: list[dict]) -> dict:
    from vtcbench.profilers.flops import analytic_flops

    counted = [r["image_tokens_per_layer"][cell.id] for r in records]
    tokens = statistics.fmean(statistics.fmean(counts) for counts in counted) if counted else math.nan
    generated = [r for r in records if "prompt_tokens" in r]
    tflops = math.nan
    if generated:
        image_tokens = round(statistics.fmean(r["image_tokens"] for r in generated))
        text_tokens = max(1, round(statistics.fmean(r["prompt_tokens"] - r["image_tokens"] for r in generated)))
        method = cell.method(config.criterion, config.seed)
        tflops = analytic_flops(method, facts, model=config.model, image_tokens=image_tokens, text_tokens=text_tokens).tflops_total
    return {
        "layer": "" if cell.layer is None else cell.layer,
        "ratio": cell.ratio,
        "criterion": "vanilla" if cell.layer is None else config.criterion,
        "metric_name": metric.split(",")[0],
        "metric": float(results[metric]),
        "stderr": _stderr(results, metric),
        "visual_tokens": tokens,
        "tflops": tflops,
    }


def _flops_ratio(cells: list[Cell], config: SweepConfig, facts: ModelFacts, records: list[dict]) -> float:
    generated = [r for r in records if "prompt_tokens" in r]
    text = round(statistics.fmean(r["prompt_tokens"] - r["image_tokens"] for r in generated)) if generated else 0
    counts = {
        cell: records[0]["image_tokens_per_layer"][cell.id] if records
        else cell.method(config.criterion, config.seed).image_tokens_per_layer(facts.image_tokens, facts.n_layers)
        for cell in cells
    }
    return shared_flops_ratio(counts, text, facts)


def shared_flops_ratio(counts: dict[Cell, list[int]], text_tokens: int, facts: ModelFacts) -> float:
    """Decoder prefill MACs a sweep computes over those of one separate run per cell: a branch
    at layer K skips the K layers it shares with vanilla (full sequence, grouped-query aware).
    The floor any implementation of the sweep can reach, without the vision encoder's saving."""
    from vtcbench.profilers.flops import layer_macs

    separate = shared = 0
    for cell, per_layer_tokens in counts.items():
        per_layer = [layer_macs(n + text_tokens, facts) for n in per_layer_tokens]
        separate += sum(per_layer)
        shared += sum(per_layer[cell.layer or 0 :])
    return shared / separate


# -- outputs ---------------------------------------------------------------------------------------------


def _write_outputs(folder: Path, cells, config, by_cell, name: str, metric: str, records: list[dict], curves) -> None:
    metric_name = metric.split(",")[0]
    predictions: dict[int, list[tuple[int, dict]]] = {}
    for record in records:
        predictions.setdefault(int(record["doc_id"]), []).append((int(record["request_index"]), record["prediction"]))
    lines = []
    for cell in cells:
        for sample in by_cell[cell.id]["samples"][name]:
            doc_id = int(sample["doc_id"])
            answers = [p[cell.id] for _, p in sorted(predictions.get(doc_id, []), key=lambda item: item[0])]
            lines.append(json.dumps({
                "cell": cell.id,
                "layer": cell.layer,
                "ratio": cell.ratio,
                "doc_id": doc_id,
                "prediction": answers[0] if len(answers) == 1 else answers,
                "score": sample_score(sample.get(metric_name)),
            }))
    with atomic_file(folder / "cells.jsonl") as handle:
        handle.write("\n".join(lines) + "\n")
    with atomic_file(folder / "curves.csv", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curves[0]))
        writer.writeheader()
        writer.writerows(curves)
    from vtcbench.tasks import short_name

    kept = {"attention": "top attention", "pool": "average pooling", "random": "random"}[config.criterion]
    plot_curves(curves, folder / "curves.png", title=f"{config.model} on {short_name(name)}: image tokens kept by {kept}")


def plot_curves(curves: list[dict], path: Path, *, title: str) -> None:
    """One line per layer K: metric against the retained share of image tokens, with error
    bars (the task's standard error); vanilla as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vanilla = next(row for row in curves if row["layer"] == "")
    metric_name = vanilla["metric_name"]
    figure, axis = plt.subplots(figsize=(4.8, 3.2), dpi=200)
    layers = sorted({row["layer"] for row in curves if row["layer"] != ""})
    for layer in layers:
        rows = sorted([row for row in curves if row["layer"] == layer] + [vanilla], key=lambda row: row["ratio"])
        axis.errorbar(
            [row["ratio"] for row in rows], [row["metric"] for row in rows],
            yerr=[row["stderr"] or 0.0 for row in rows], marker="o", markersize=3, capsize=2, linewidth=1.2,
            label=f"K = {layer}",
        )
    axis.axhline(vanilla["metric"], linestyle="--", color="black", linewidth=1, label="vanilla")
    axis.set_xlabel("retained share of image tokens from layer K on")
    axis.set_ylabel(f"{metric_name} (± 1 standard error)")
    axis.set_title(title, fontsize=9)
    axis.set_xlim(0, 1.05)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)


def _attention_share(records: list[dict], folder: Path) -> list[dict]:
    """Per layer, the mean share of the vanilla answer's attention per token group, over samples."""
    import torch

    from vtcbench.attention_share import summarise, write_outputs

    shares = torch.tensor([r["attention_share"] for r in records], dtype=torch.float32)
    counts = torch.tensor([r["group_tokens"] for r in records])
    rows = summarise(shares, counts)
    write_outputs(rows, folder)
    return rows
