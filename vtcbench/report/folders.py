"""Find and read the run folders a report compares (docs/report.md).

A results folder holds run folders (`vtcbench run`, `vtcbench redundancy-sweep`), directly or
one level down (e.g. `results/<study>/<run>`). A folder that cannot be read whole (damaged
`config.json`, no `summary.json` yet, a damaged line in `samples.jsonl`) is listed as skipped
with its reason, so one broken run does not hide the others.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtcbench.errors import VtcbenchError

RUN_FILES = ("config.json", "summary.json", "samples.jsonl")


@dataclass(frozen=True)
class Run:
    """One readable run folder: its identity, provenance, summary and per-request records."""

    name: str  # the folder's path relative to the results folder
    identity: dict[str, Any]
    provenance: dict[str, Any]
    summary: dict[str, Any]
    samples: list[dict[str, Any]] = field(repr=False)

    @property
    def model(self) -> str:
        return str(self.identity.get("model", "?"))

    @property
    def method(self) -> str:
        return str(self.identity.get("method", "?"))

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.identity.get("params") or {})

    @property
    def budget(self) -> str | None:
        """The `--budget` that chose the run's setting, or None."""
        return self.summary.get("budget")

    @property
    def is_sweep(self) -> bool:
        return "curves" in self.summary


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


def load_runs(results: Path, pattern: str | None = None) -> tuple[list[Run], list[Skipped]]:
    """Every run folder under `results` whose name matches the glob `pattern`, read; the unreadable
    ones as `Skipped`. Raises VtcbenchError when there is nothing to report."""
    results = Path(results)
    if not results.is_dir():
        raise VtcbenchError(f"--results {str(results)!r} is not a folder; run `vtcbench run` first, or point --results at its --out")
    folders = find_run_folders(results)
    if not folders:
        raise VtcbenchError(f"--results {str(results)!r} holds no run folders (folders with config.json / summary.json)")
    if pattern is not None:
        folders = [f for f in folders if fnmatch.fnmatch(f.name, pattern) or fnmatch.fnmatch(_relative(f, results), pattern)]
        if not folders:
            raise VtcbenchError(f"--runs {pattern!r} matches no run folder in {results}")
    runs: list[Run] = []
    skipped: list[Skipped] = []
    for folder in folders:
        name = _relative(folder, results)
        try:
            runs.append(read_run(folder, name))
        except _Unreadable as reason:
            skipped.append(Skipped(name, str(reason)))
    return runs, skipped


def find_run_folders(results: Path) -> list[Path]:
    """Run folders directly under `results`, or one level down; `results` itself if it is one.
    Hidden folders (a run's staging folder before its atomic rename) are not runs."""
    if _is_run_folder(results):
        return [results]
    found: list[Path] = []
    for child in sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _is_run_folder(child):
            found.append(child)
        else:
            found.extend(sorted(p for p in child.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_run_folder(p)))
    return found


def _is_run_folder(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def _relative(folder: Path, results: Path) -> str:
    return folder.name if folder == results else folder.relative_to(results).as_posix()


class _Unreadable(Exception):
    """Why a run folder cannot be reported."""


def read_run(folder: Path, name: str) -> Run:
    config = _read_json(folder / "config.json")
    summary_path = folder / "summary.json"
    if not summary_path.exists():
        raise _Unreadable("no summary.json (unfinished or interrupted run)")
    summary = _read_json(summary_path)
    if not isinstance(config.get("identity"), dict):
        raise _Unreadable("config.json has no identity")
    if "tasks" not in summary and "curves" not in summary:
        raise _Unreadable("summary.json has neither tasks nor curves")
    return Run(name, config["identity"], dict(config.get("provenance") or {}), summary, _read_samples(folder / "samples.jsonl"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _Unreadable(f"no {path.name}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise _Unreadable(f"{path.name} is unreadable ({error})") from None
    except json.JSONDecodeError as error:
        raise _Unreadable(f"{path.name} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise _Unreadable(f"{path.name} is not a JSON object")
    return data


def _read_samples(path: Path) -> list[dict[str, Any]]:
    """Per-request records; none for a folder without samples.jsonl (the report then falls back
    to summary.json). A finished run's file is whole, so any damaged line disqualifies it."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise _Unreadable(f"samples.jsonl line {number} is not valid JSON") from None
        if not isinstance(record, dict):
            raise _Unreadable(f"samples.jsonl line {number} is not a JSON object")
        records.append(record)
    return records
