"""The results store: atomic, resumable run folders that never mix configurations or code."""

from __future__ import annotations

import json

import pytest

from vtcbench.errors import VtcbenchError
from vtcbench.results import RunFolder

IDENTITY = {"model": "tiny", "method": "fastv", "params": {"layer": 2}, "tasks": ["pope"], "limit": None, "seed": 0}
PROVENANCE = {"git_revision": "abc"}


def record(doc_id: int, task: str = "pope") -> dict:
    return {"task": task, "doc_id": doc_id, "request_index": 0, "prediction": "yes"}


def test_new_folder_holds_config_and_resumes_with_finished_samples(tmp_path):
    folder = RunFolder.open(tmp_path, IDENTITY, PROVENANCE)
    assert folder.created and json.loads((folder.path / "config.json").read_text())["identity"] == IDENTITY
    folder.append(record(0))
    folder.append(record(1))
    again = RunFolder.open(tmp_path, IDENTITY, PROVENANCE)
    assert not again.created and again.path == folder.path
    assert set(again.finished) == {("pope", 0, 0), ("pope", 1, 0)}
    assert [p.name for p in tmp_path.iterdir()] == [folder.path.name]  # no staging leftovers


def test_a_different_configuration_gets_its_own_folder(tmp_path):
    first = RunFolder.open(tmp_path, IDENTITY, PROVENANCE)
    second = RunFolder.open(tmp_path, {**IDENTITY, "params": {"layer": 3}}, PROVENANCE)
    assert first.path != second.path


def test_other_code_revision_is_not_resumed_silently(tmp_path):
    RunFolder.open(tmp_path, IDENTITY, PROVENANCE).append(record(0))
    with pytest.raises(VtcbenchError, match="code revision abc, this is def; pass --overwrite"):
        RunFolder.open(tmp_path, IDENTITY, {"git_revision": "def"})
    fresh = RunFolder.open(tmp_path, IDENTITY, {"git_revision": "def"}, overwrite=True)
    assert fresh.created and fresh.finished == {}


def test_a_line_cut_by_a_kill_is_dropped_and_appending_continues_cleanly(tmp_path):
    folder = RunFolder.open(tmp_path, IDENTITY, PROVENANCE)
    folder.append(record(0))
    with open(folder.samples_path, "ab") as handle:
        handle.write(b'{"task": "pope", "doc_id": 1, "predic')  # killed mid-write
    resumed = RunFolder.open(tmp_path, IDENTITY, PROVENANCE)
    assert set(resumed.finished) == {("pope", 0, 0)}
    resumed.append(record(1))
    lines = resumed.samples_path.read_text().splitlines()
    assert [json.loads(line)["doc_id"] for line in lines] == [0, 1]


def test_a_corrupted_line_stops_the_run_and_leaves_the_file_alone(tmp_path):
    folder = RunFolder.open(tmp_path, IDENTITY, PROVENANCE)
    folder.append(record(0))
    with open(folder.samples_path, "ab") as handle:
        handle.write(b"not json\n")
    folder.append(record(2))
    before = folder.samples_path.read_bytes()
    with pytest.raises(VtcbenchError, match="line 2 is corrupted"):
        RunFolder.open(tmp_path, IDENTITY, PROVENANCE)
    assert folder.samples_path.read_bytes() == before


def test_a_failed_run_removes_only_a_folder_it_created_and_left_empty(tmp_path):
    folder = RunFolder.open(tmp_path, IDENTITY, PROVENANCE)
    folder.discard_if_empty()
    assert not folder.path.exists()
    kept = RunFolder.open(tmp_path, IDENTITY, PROVENANCE)
    kept.append(record(0))
    kept.discard_if_empty()
    assert kept.path.exists()


def test_appends_are_written_at_once_and_synced_by_group_commit(tmp_path, monkeypatch):
    """One write per sample (a killed process loses nothing written), but an fsync at most once a
    second and at the end: a per-sample fsync cost 2% of vtc-tiny's throughput."""
    import os

    synced = []
    monkeypatch.setattr(os, "fsync", lambda descriptor: synced.append(descriptor))
    folder = RunFolder.open(tmp_path, IDENTITY, PROVENANCE)
    synced.clear()  # config.json's own fsync
    for doc_id in range(50):
        folder.append(record(doc_id))
    assert len(folder.samples_path.read_bytes().splitlines()) == 50
    assert len(synced) in (1, 2)  # the first append, and one more if a second passed
    folder.sync()
    assert len(synced) <= 3 and not folder._unsynced
    count = len(synced)
    folder.sync()  # nothing new: no fsync
    assert len(synced) == count
