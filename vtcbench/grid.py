"""`vtcbench grid GRID.yaml`: a grid of `vtcbench run` cells (models x methods x budgets, on
tasks), each its own resumable run folder under one results folder, run one after another on
this machine (`local`) or submitted as one submitit job array (`slurm`; `debug` is submitit's
in-process executor, for trying a grid file without a cluster).

A grid file:

    results: results/grid        # where the run folders go (default: results)
    models: [vtc-tiny, vtc-tiny-qwen]
    tasks: [vtcshapes]
    methods:
      - vanilla
      - fastv                    # its defaults
      - {method: pdrop, set: {keep_ratio: 0.3}}
      - {method: dart, budget: tokens=16, set: {layer: 1}}
    options: {limit: 50, batch_size: 8}   # any `vtcbench run` option, by its name

Every cell is checked as `vtcbench run` checks it (method, settings, budget, tasks) before
anything runs or is submitted; a cell whose model's family cannot run its method is left out
and listed with the reason. A cell is done when its run folder holds a summary: rerunning the
command skips those and resumes the others (the run folders are resumable). Each cell's log and
state are kept in `<results>/.grid/`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtcbench.errors import VtcbenchError, choices_error

EXECUTORS = ("local", "slurm", "debug")
GRID_KEYS = ("results", "models", "methods", "tasks", "options")
METHOD_KEYS = ("method", "set", "budget")
#: `vtcbench run` options a grid may set, with their types
OPTIONS: dict[str, type] = {
    "limit": int, "batch_size": int, "seed": int, "dtype": str, "attn": str, "device": str, "data_dir": str,
    "random_weights": bool, "allow_judge": bool, "allow_submission": bool, "skip_bad_documents": bool, "fidelity": bool,
}


@dataclass(frozen=True)
class Cell:
    """One `vtcbench run` of the grid."""

    model: str
    method: str
    params: dict[str, Any]  # the method's settings (a budget's already solved)
    budget: str | None
    argv: tuple[str, ...]  # the `vtcbench run` arguments
    folder: str  # the run folder's name under the results folder

    def label(self) -> str:
        settings = ", ".join(f"{key}={value}" for key, value in self.params.items())
        return f"{self.model} / {self.method}" + (f" ({settings})" if settings else "") + (f" at {self.budget}" if self.budget else "")


@dataclass
class Grid:
    results: Path
    cells: list[Cell]
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (cell, why)

    @property
    def state_dir(self) -> Path:
        return self.results / ".grid"

    def status(self, cell: Cell) -> str:
        """done (a summary), failed / running (the cell's state file), or pending (also a cell
        whose state says done but whose run folder has since been removed: it runs again)."""
        if (self.results / cell.folder / "summary.json").is_file():
            return "done"
        state = self.state_dir / f"{cell.folder}.json"
        if state.is_file() and (status := json.loads(state.read_text())["status"]) != "done":
            return status
        return "pending"

    def log(self, cell: Cell) -> Path:
        return self.state_dir / f"{cell.folder}.log"


def load_grid(path: Path) -> Grid:
    """Read and check a grid file; every cell is checked as `vtcbench run` would check it."""
    import yaml

    if not path.is_file():
        raise VtcbenchError(f"grid file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise VtcbenchError(f"grid file {str(path)!r} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise VtcbenchError(f"grid file {str(path)!r} must be a mapping of {', '.join(GRID_KEYS)}")
    for key in data:
        if key not in GRID_KEYS:
            raise choices_error("grid key", key, GRID_KEYS)
    models, tasks = _names(data, "models"), _names(data, "tasks")
    options = data.get("options") or {}
    for key, value in options.items():
        if key not in OPTIONS:
            raise choices_error("grid option", key, list(OPTIONS))
        if not isinstance(value, OPTIONS[key]):
            raise VtcbenchError(f"grid option {key}: {value!r} is not a {OPTIONS[key].__name__}")
    entries = [_method_entry(entry) for entry in data.get("methods") or []]
    if not entries:
        raise VtcbenchError("grid file: `methods` lists no method")
    grid = Grid(results=Path(data.get("results", "results")), cells=[])
    for model in models:
        for method, sets, budget in entries:
            cell, why = _cell(grid.results, model, method, sets, budget, tasks, options)
            if cell is None:
                grid.left_out.append((f"{model} / {method}", why))
            elif cell.folder not in {c.folder for c in grid.cells}:
                grid.cells.append(cell)
    return grid


def _names(data: dict, key: str) -> list[str]:
    value = data.get(key)
    if isinstance(value, str):
        value = [value]
    if not value or not all(isinstance(v, str) for v in value):
        raise VtcbenchError(f"grid file: `{key}` must list at least one name")
    return value


def _method_entry(entry: Any) -> tuple[str, dict[str, str], str | None]:
    if isinstance(entry, str):
        return entry, {}, None
    if not isinstance(entry, dict) or "method" not in entry:
        raise VtcbenchError(f"grid file: a method entry must be a name or a mapping with `method`; got {entry!r}")
    for key in entry:
        if key not in METHOD_KEYS:
            raise choices_error("grid method key", key, METHOD_KEYS)
    sets = {str(k): ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in (entry.get("set") or {}).items()}
    return str(entry["method"]), sets, entry.get("budget")


def _cell(results: Path, model: str, method: str, sets: dict[str, str], budget: str | None, tasks: list[str],
          options: dict[str, Any]) -> tuple[Cell | None, str]:
    """The cell, checked as `vtcbench run` checks it; (None, why) where the family refuses the method."""
    from vtcbench.budgets import parse_budget, solve
    from vtcbench.families import family_of, model_facts
    from vtcbench.methods import get_method, method_class
    from vtcbench.models import load_config
    from vtcbench.runner import RunConfig, run_folder_name

    config = load_config(model)
    reason = family_of(config).refusal(method_class(method))
    if reason is not None:
        return None, reason
    where = f"grid cell {model} / {method}"
    try:
        if budget is not None:
            params = solve(method, sets, parse_budget(str(budget)), model_facts(config)).method.params()
        else:
            params = get_method(method, **sets).params()
        run_config = RunConfig(
            model=model, method=method, params=params, tasks=tasks, out=results, budget=budget,
            limit=options.get("limit"), seed=options.get("seed", 0), batch_size=options.get("batch_size", 1),
            data_dir=Path(options["data_dir"]) if "data_dir" in options else None,
            random_weights=options.get("random_weights", False), attn_implementation=options.get("attn", "sdpa"),
            fidelity=options.get("fidelity", False), allow_judge=options.get("allow_judge", False),
            allow_submission=options.get("allow_submission", False),
        )
        folder = run_folder_name(run_config)  # checks the run as `vtcbench run` does
    except VtcbenchError as error:
        raise VtcbenchError(f"{where}: {error}") from None
    argv = ["run", "--model", model, "--method", method, "--tasks", ",".join(tasks), "--out", str(results)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    if budget is not None:
        argv += ["--budget", str(budget)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if OPTIONS[key] is bool:
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return Cell(model, method, params, budget, tuple(argv), folder), ""


def run_cell(argv: list[str], log: str, state: str) -> int:
    """Run one cell as `vtcbench run` in a process of its own, its output in `log`; record its
    state (running, then done or failed with the exit code). What a submitit job runs."""
    state_path = Path(state)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({"status": "running", "log": log}))
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "vtcbench", *argv], stdout=out, stderr=subprocess.STDOUT)
    state_path.write_text(json.dumps({"status": "done" if code == 0 else "failed", "log": log, "returncode": code}))
    return code


def cell_job(grid: Grid, cell: Cell) -> tuple[list[str], str, str]:
    grid.state_dir.mkdir(parents=True, exist_ok=True)
    return list(cell.argv), str(grid.log(cell)), str(grid.state_dir / f"{cell.folder}.json")


def run_local(grid: Grid, todo: list[Cell], report) -> None:
    """One cell after another, in this machine's processes."""
    for number, cell in enumerate(todo, 1):
        report(f"[{number}/{len(todo)}] {cell.label()}")
        code = run_cell(*cell_job(grid, cell))
        if code != 0:
            report(f"  failed (exit {code}); log: {grid.log(cell)}")


def submit(grid: Grid, todo: list[Cell], executor: str, parameters: dict[str, Any], report) -> None:
    """One submitit job array (`slurm`), or submitit's in-process debug executor (`debug`)."""
    try:
        import submitit
    except ImportError:
        raise VtcbenchError("--executor slurm needs submitit: pip install 'vtcbench[cluster]'") from None
    folder = grid.state_dir / "submitit"
    runner = submitit.AutoExecutor(folder=str(folder), cluster="debug" if executor == "debug" else "slurm")
    runner.update_parameters(name="vtcbench-grid", **{k: v for k, v in parameters.items() if v is not None})
    argvs, logs, states = zip(*(cell_job(grid, cell) for cell in todo))
    submitted = runner.map_array(run_cell, argvs, logs, states)
    report(f"submitted {len(submitted)} cell(s) as job array {submitted[0].job_id.split('_')[0]}; "
           f"follow with `vtcbench grid FILE --status`")
    if executor == "debug":
        for job in submitted:
            job.result()

