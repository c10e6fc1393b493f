"""Run folders (docs/architecture.md#runs-and-the-results-store): `config.json`, `samples.jsonl`, `summary.json`.

- One folder per (model, method, hyperparameters, tasks, limit, seed): its name carries a hash
  of that identity, so a different configuration never lands in an existing folder.
- `samples.jsonl` grows one complete line per finished sample, written with a single `write`
  on an append-only descriptor, so a killed process loses at most the line being written.
  Lines reach the disk by group commit: an fsync at most once a second and when the run ends
  (a per-sample fsync cost 2% of a small model's throughput), so a machine crash loses at most
  the last second of samples. Rerunning the same command resumes: finished samples are read
  back, not recomputed.
- A folder written by other code (another git revision) is never resumed silently: the run
  stops with a message unless `--overwrite` is given.
- Nothing half-written: a new folder appears (atomically renamed) only with its `config.json`;
  `summary.json` is replaced atomically; a run that fails before its first sample removes the
  folder it created.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vtcbench.errors import VtcbenchError

SampleKey = tuple[str, int, int]  # (task, doc_id, request index within the doc)
SYNC_INTERVAL_S = 1.0  # group commit: the longest a written sample waits for its fsync


def run_identity(config: dict[str, Any]) -> str:
    """A short stable hash of what determines the results (not timing knobs like batch size)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def folder_name(identity: dict[str, Any]) -> str:
    """A run folder's name: model, method and the identity's hash."""
    return _slug(f"{identity['model']}__{identity['method']}__{run_identity(identity)}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def sample_key(record: dict) -> SampleKey:
    return (record["task"], int(record["doc_id"]), int(record.get("request_index", 0)))


@dataclass
class RunFolder:
    path: Path
    identity: dict[str, Any]
    created: bool = False
    finished: dict[SampleKey, dict] = field(default_factory=dict)
    _last_sync: float = field(default=float("-inf"), repr=False)
    _unsynced: bool = field(default=False, repr=False)

    @property
    def samples_path(self) -> Path:
        return self.path / "samples.jsonl"

    @classmethod
    def open(
        cls, out_dir: Path, identity: dict[str, Any], provenance: dict[str, Any], *, extra: dict | None = None,
        overwrite: bool = False,
    ) -> RunFolder:
        """Create the run folder for `identity`, or resume it; refuse to mix code revisions."""
        name = folder_name(identity)
        path = Path(out_dir) / name
        config = {"identity": identity, "provenance": provenance, **(extra or {})}
        if path.exists() and overwrite:
            shutil.rmtree(path)
        if path.exists():
            folder = cls(path=path, identity=identity)
            folder._check_resumable(provenance)
            folder.finished = folder._read_samples()
            return folder
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=path.parent))
        _write_json(staging / "config.json", config)
        try:
            os.replace(staging, path)
        except OSError:  # another process (a data-parallel rank) created it first: join it
            shutil.rmtree(staging, ignore_errors=True)
            return cls.open(out_dir, identity, provenance, extra=extra)
        return cls(path=path, identity=identity, created=True)

    def reload(self) -> None:
        """Re-read every finished sample (data-parallel ranks append to the same file)."""
        self.finished = self._read_samples()

    def _check_resumable(self, provenance: dict[str, Any]) -> None:
        config_path = self.path / "config.json"
        try:
            stored = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise VtcbenchError(f"{config_path} is unreadable ({error}); pass --overwrite to start this run again")
        if stored.get("identity") != self.identity:
            raise VtcbenchError(f"{self.path} holds a different configuration; pass --overwrite or choose another --out")
        old, new = stored.get("provenance", {}).get("git_revision"), provenance.get("git_revision")
        if old != new:
            raise VtcbenchError(
                f"{self.path} was written by code revision {old}, this is {new}; "
                "pass --overwrite to recompute, or --out for a separate folder"
            )

    def _read_samples(self) -> dict[SampleKey, dict]:
        """Finished samples. A final line cut short by a kill is dropped; damage elsewhere stops the run."""
        if not self.samples_path.exists():
            return {}
        raw = self.samples_path.read_bytes()
        lines = raw.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        finished: dict[SampleKey, dict] = {}
        for number, line in enumerate(complete, start=1):
            try:
                record = json.loads(line)
                key = sample_key(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise VtcbenchError(
                    f"{self.samples_path} line {number} is corrupted; fix or delete that line, or pass --overwrite"
                ) from None
            finished[key] = record
        if tail:  # an interrupted write: no newline yet; cut it so the next append starts cleanly
            with open(self.samples_path, "r+b") as handle:
                handle.truncate(len(raw) - len(tail))
        return finished

    def append(self, record: dict) -> None:
        """Add one finished sample: one write of one complete line; fsync if a second has passed."""
        line = (json.dumps(record, default=str) + "\n").encode()
        descriptor = os.open(self.samples_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
            self._unsynced = True
            if time.monotonic() - self._last_sync >= SYNC_INTERVAL_S:
                self._fsync(descriptor)
        finally:
            os.close(descriptor)
        self.finished[sample_key(record)] = record

    def sync(self) -> None:
        """Flush every appended sample to the disk (the end of a run, or of a batch of work)."""
        if self._unsynced:
            descriptor = os.open(self.samples_path, os.O_WRONLY)
            try:
                self._fsync(descriptor)
            finally:
                os.close(descriptor)

    def _fsync(self, descriptor: int) -> None:
        os.fsync(descriptor)
        self._last_sync, self._unsynced = time.monotonic(), False

    def add_sample_metrics(self, metrics: dict[tuple[str, int], dict]) -> None:
        """Write each document's metric values (what the task's `process_results` returned, by
        metric name) into the record of its first request (request_index 0) as `metrics`.

        The values exist only once lmms-eval has scored every response, after the last append;
        samples.jsonl is then rewritten once, atomically (a new file renamed over the old), so a
        reader sees it whole, without or with the metrics.
        """
        self.sync()
        for record in self.finished.values():
            key = (record["task"], int(record["doc_id"]))
            if int(record.get("request_index", 0)) == 0 and key in metrics:
                record["metrics"] = metrics[key]
        with atomic_file(self.samples_path) as stream:
            stream.writelines(json.dumps(record, default=_plain) + "\n" for record in self.finished.values())

    def save_image(self, relative: Path, image) -> None:
        """A PIL image at `relative` in the folder, as PNG (never half a file)."""
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target, "wb") as stream:
            image.save(stream, format="PNG")

    def write_summary(self, summary: dict) -> Path:
        self.sync()
        target = self.path / "summary.json"
        _write_json(target, summary)
        return target

    def discard_if_empty(self) -> None:
        """After a failure: remove a folder this run created if it holds no finished sample."""
        if self.created and not self.samples_path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def primary_metric(metrics: dict[str, Any]) -> str | None:
    """A task's first numeric metric in lmms-eval's results (which keep the YAML's order), e.g.
    `overall,none`; None if it reported none."""
    return next((k for k, v in metrics.items() if "_stderr" not in k and isinstance(v, (int, float))
                 and not isinstance(v, bool)), None)


def sample_score(value: Any) -> float | None:
    """A document's value of a metric (from `metrics` in samples.jsonl) as a number: itself, or
    the `score` of a record (vtcshapes', POPE's, MME's); None when it has none."""
    if isinstance(value, dict):
        value = value.get("score")
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


@contextmanager
def atomic_file(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`with atomic_file(path) as handle:` writes a temporary file beside `path`, fsyncs it and
    renames it over `path` on success (readers see the old file or the new one, never half); on
    an error the temporary file is removed and `path` is left as it was."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    """JSON for what metric code returns beyond JSON's types (NumPy scalars and arrays)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as stream:
        json.dump(data, stream, indent=2, default=str)
