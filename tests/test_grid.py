"""`vtcbench grid`: a 2-model x 3-method grid run here, killed halfway (SIGKILL) and resumed to
each cell once; submitit's debug executor for `slurm`'s path; one-line refusals before anything
runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtcbench.cli import app

GRID = """\
results: {results}
models: [vtc-tiny, vtc-tiny-qwen]
tasks: [vtcshapes]
methods:
  - vanilla
  - {{method: fastv, set: {{layer: 1}}}}
  - {{method: pdrop, budget: tokens=32}}
options: {{limit: 4, batch_size: 2}}
"""


def _grid_file(tmp_path: Path, text: str = GRID) -> tuple[Path, Path]:
    results = tmp_path / "results"
    path = tmp_path / "grid.yaml"
    path.write_text(text.format(results=results))
    return path, results


def _done(results: Path) -> list[Path]:
    return sorted(results.glob("*/summary.json"))


def _sample_keys(folder: Path) -> list[tuple]:
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line.strip()]
    return [(r["task"], r["doc_id"], r.get("request_index", 0)) for r in records]


def test_a_local_grid_killed_halfway_resumes_to_each_cell_once(tmp_path):
    path, results = _grid_file(tmp_path)
    command = [sys.executable, "-m", "vtcbench", "grid", str(path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while len(_done(results)) < 2 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the grid and the cell it is running
    first.wait()
    killed_with = len(_done(results))
    assert 2 <= killed_with < 6

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"6 cells, {killed_with} done, {6 - killed_with} to run (local)" in second.stdout
    folders = [p.parent for p in _done(results)]
    assert len(folders) == 6 and len(list(results.glob("vtc-tiny*"))) == 6  # each cell once
    for folder in folders:
        keys = _sample_keys(folder)
        assert len(keys) == len(set(keys)) == 4, folder.name  # resumed, nothing answered twice
    budgeted = [json.loads(p.read_text()) for p in _done(results) if "pdrop" in p.parent.name]
    assert [summary["budget"] for summary in budgeted] == ["tokens=32", "tokens=32"]

    third = subprocess.run([*command, "--status"], env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and third.stdout.count(" done ") == 6

    shutil.rmtree(folders[0])  # a removed run folder is not done, whatever its state file said
    fourth = subprocess.run([*command, "--status"], env=env, capture_output=True, text=True, timeout=300)
    assert fourth.stdout.count(" done ") == 5 and fourth.stdout.count(" pending ") == 1
    fifth = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert fifth.returncode == 0 and "6 cells, 5 done, 1 to run (local)" in fifth.stdout
    assert len(_done(results)) == 6


def test_the_slurm_path_through_submitits_debug_executor(tmp_path):
    pytest.importorskip("submitit")
    text = GRID.replace("models: [vtc-tiny, vtc-tiny-qwen]", "models: [vtc-tiny]").replace("  - {{method: pdrop, budget: tokens=32}}\n", "")
    path, results = _grid_file(tmp_path, text)
    result = CliRunner().invoke(app, ["grid", str(path), "--executor", "debug"])
    assert result.exit_code == 0, result.output
    assert "submitted 2 cell(s) as job array" in result.output
    assert len(_done(results)) == 2
    assert all(json.loads(p.read_text())["status"] == "done" for p in (results / ".grid").glob("*.json"))


def test_dry_run_lists_cells_their_folders_and_what_the_families_leave_out(tmp_path):
    path, results = _grid_file(tmp_path, GRID.replace("  - vanilla\n", "  - vanilla\n  - avgpool\n"))
    result = CliRunner().invoke(app, ["grid", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "left out: vtc-tiny-qwen / avgpool: it works on a fixed grid" in result.output
    assert "grid: 7 cells" in result.output and result.output.count("pending") == 7
    assert "vtc-tiny__pdrop__" in result.output
    assert not results.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("vanilla", "nosuch"), "unknown method 'nosuch'; valid choices:"),
        (("vtc-tiny-qwen", "no-such-model"), "no-such-model"),
        (("[vtcshapes]", "[nosuchtask]"), "nosuchtask"),
        (("layer: 1", "layer: 99"), "grid cell vtc-tiny / fastv: fastv: layer=99 is outside this model's decoder layers"),
        (("tokens=32", "tokens=2"), "grid cell vtc-tiny / pdrop: --budget tokens=2: pdrop"),
        (("batch_size: 2", "batch: 2"), "unknown grid option 'batch'; valid choices:"),
        (("methods:", "method:"), "unknown grid key 'method'; valid choices:"),
        (("tasks: [vtcshapes]", "tasks: [vtcshapes"), "is not valid YAML"),
    ],
)
def test_bad_grid_files_are_refused_in_one_line_before_anything_runs(tmp_path, change, message):
    old, new = change
    path, results = _grid_file(tmp_path, GRID.replace(old, new))
    result = CliRunner().invoke(app, ["grid", str(path)])
    assert result.exit_code == 2, result.output
    error = result.output.strip()
    assert message in error and "\n" not in error, error
    assert not results.exists()


def test_an_unknown_executor_is_refused(tmp_path):
    path, _ = _grid_file(tmp_path)
    result = CliRunner().invoke(app, ["grid", str(path), "--executor", "kubernetes"])
    assert result.exit_code == 2 and "valid choices: debug, local, slurm" in result.output
