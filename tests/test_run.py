"""`vtcbench run` end to end, offline: lmms-eval's real task code on local datasets in the hub's
schema, a tiny random-weight LLaVA, resumable run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from task_data import write_all
from typer.testing import CliRunner

from vtcbench.cli import app
from vtcbench.lmms_model import VtcbenchLMM

runner = CliRunner()
TASKS = "gqa,textvqa,pope,mme,docvqa"
METRICS = {
    "vtc_local_gqa": "exact_match,none",
    "vtc_local_textvqa_val": "exact_match,none",
    "vtc_local_pope": "pope_accuracy,none",
    "vtc_local_mme": "mme_perception_score,none",
    "vtc_local_docvqa_val": "anls,none",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_all(tmp_path_factory.mktemp("data"), n=6)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))


def run_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--method", "fastv", "--model", "tiny", "--random-weights", "--tasks", TASKS,
            "--data-dir", str(data_dir), "--out", str(out), "--limit", "4", *extra]


def invoke(args: list[str]):
    return runner.invoke(app, args)


def only_folder(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def samples(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    result = invoke(run_args(data_dir, out))
    assert result.exit_code == 0, result.output
    return only_folder(out)


def test_run_writes_lmms_eval_metrics_for_every_task(uninterrupted):
    summary = json.loads((uninterrupted / "summary.json").read_text())
    config = json.loads((uninterrupted / "config.json").read_text())
    assert set(summary["tasks"]) == set(METRICS)
    for task, metric in METRICS.items():
        entry = summary["tasks"][task]
        assert isinstance(entry["metrics"][metric], (int, float)), (task, entry["metrics"])
        assert entry["samples"] == 4
        assert entry["mean_image_tokens_per_layer"] == [64, 64, 32, 32]
        assert entry["tflops_image"] > 0 and entry["prefill_ms_median"] > 0 and entry["samples_per_s"] > 0
    assert config["identity"]["method"] == "fastv" and config["provenance"]["git_revision"]
    records = samples(uninterrupted)
    assert len(records) == 20 and all(r["image_tokens_per_layer"] == [64, 64, 32, 32] for r in records)


def test_run_records_each_documents_metric_values(uninterrupted):
    """Per document, what the task's process_results returned: the per-sample scores a report
    bootstraps. Where the metric is a mean over documents, their mean is lmms-eval's figure."""
    summary = json.loads((uninterrupted / "summary.json").read_text())["tasks"]
    records = samples(uninterrupted)
    assert all("metrics" in r for r in records)  # one request per document in these tasks
    for task in ("vtc_local_gqa", "vtc_local_textvqa_val", "vtc_local_docvqa_val"):
        name = METRICS[task].split(",")[0]
        values = [r["metrics"][name] for r in records if r["task"] == task]
        assert len(values) == 4 and all(isinstance(v, (int, float)) for v in values)
        assert sum(values) / 4 == pytest.approx(summary[task]["metrics"][METRICS[task]])
    pope = [r["metrics"]["pope_accuracy"] for r in records if r["task"] == "vtc_local_pope"]
    assert all(isinstance(v, dict) and "score" in v for v in pope)  # POPE's per-doc record


def test_rerunning_resumes_without_recomputing(uninterrupted, data_dir):
    before = (uninterrupted / "samples.jsonl").read_bytes()
    result = invoke(run_args(data_dir, uninterrupted.parent))
    assert result.exit_code == 0, result.output
    assert (uninterrupted / "samples.jsonl").read_bytes() == before


def test_sigkill_then_rerun_gives_every_sample_once_and_the_same_metrics(uninterrupted, data_dir, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "vtcbench.cli", *run_args(data_dir, out)]
    env = {**os.environ, "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "cache2")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        files = list(out.glob("*/samples.jsonl"))
        if files and len(files[0].read_bytes().splitlines()) >= 5:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    folder = only_folder(out)
    assert 5 <= len(samples(folder)) < 20 and not (folder / "summary.json").exists()
    result = invoke(run_args(data_dir, out))
    assert result.exit_code == 0, result.output
    keys = [(r["task"], r["doc_id"], r["request_index"]) for r in samples(folder)]
    assert len(keys) == len(set(keys)) == 20
    resumed = json.loads((folder / "summary.json").read_text())["tasks"]
    reference = json.loads((uninterrupted / "summary.json").read_text())["tasks"]
    for task in METRICS:
        assert resumed[task]["metrics"] == reference[task]["metrics"]
        assert resumed[task]["mean_image_tokens_per_layer"] == reference[task]["mean_image_tokens_per_layer"]
    predictions = {(r["task"], r["doc_id"]): r["prediction"] for r in samples(folder)}
    assert predictions == {(r["task"], r["doc_id"]): r["prediction"] for r in samples(uninterrupted)}


def test_batch_size_4_gives_the_same_predictions_as_batch_size_1(uninterrupted, data_dir, tmp_path):
    result = invoke(run_args(data_dir, tmp_path, "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    batched = {(r["task"], r["doc_id"]): r["prediction"] for r in samples(only_folder(tmp_path))}
    assert batched == {(r["task"], r["doc_id"]): r["prediction"] for r in samples(uninterrupted)}


def _one_line_exit_2(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert fragment in message and len(message.splitlines()) == 1, message


def test_unknown_task_is_refused(data_dir, tmp_path):
    args = ["run", "--model", "tiny", "--random-weights", "--tasks", "pope,textvqa_vall", "--out", str(tmp_path)]
    _one_line_exit_2(invoke(args), "unknown task 'textvqa_vall'")
    assert not any(tmp_path.iterdir())


def test_missing_local_dataset_is_refused_before_anything_is_written(data_dir, tmp_path):
    partial = tmp_path / "data"
    partial.mkdir()
    (partial / "pope.parquet").write_bytes((data_dir / "pope.parquet").read_bytes())
    result = invoke(["run", "--model", "tiny", "--random-weights", "--tasks", "pope,mme", "--data-dir", str(partial),
                     "--out", str(tmp_path / "out")])
    _one_line_exit_2(result, "mme")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_model_that_fails_to_load_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke(["run", "--model", "llava-1.5-7b", "--tasks", "pope", "--data-dir", str(data_dir), "--out", str(tmp_path)])
    _one_line_exit_2(result, "--random-weights")
    assert not any(tmp_path.iterdir())


def test_corrupted_samples_line_is_refused_and_results_are_untouched(uninterrupted, data_dir):
    path = uninterrupted / "samples.jsonl"
    original = path.read_bytes()
    lines = original.splitlines(keepends=True)
    damaged = b"".join([lines[0], b'{"task": "vtc_local_pope", "doc_id": \n', *lines[1:]])
    path.write_bytes(damaged)
    try:
        result = invoke(run_args(data_dir, uninterrupted.parent))
        _one_line_exit_2(result, "samples.jsonl line 2 is corrupted")
        assert path.read_bytes() == damaged
    finally:
        path.write_bytes(original)


def test_fidelity_summary(data_dir, tmp_path):
    result = invoke(["run", "--method", "fastv", "--model", "tiny", "--random-weights", "--tasks", "pope",
                     "--data-dir", str(data_dir), "--out", str(tmp_path), "--limit", "3", "--fidelity"])
    assert result.exit_code == 0, result.output
    fidelity = json.loads((only_folder(tmp_path) / "summary.json").read_text())["tasks"]["vtc_local_pope"]["fidelity"]
    assert fidelity["samples"] == 3 and 0 <= fidelity["agreement_with_vanilla"] <= 1 and fidelity["first_token_kl_mean"] > 0


def test_data_parallel_processes_merge_into_one_run_folder(uninterrupted, data_dir, tmp_path):
    """Two processes (torchrun, gloo on CPU) share the documents; rank 0 writes the summary."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vtcbench", *run_args(data_dir, out), "--num-processes", "2", "--device", "cpu"]
    env = {**os.environ, "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "cache")}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    folder = only_folder(out)
    keys = [(r["task"], r["doc_id"], r["request_index"]) for r in samples(folder)]
    assert len(keys) == len(set(keys)) == 20
    merged = json.loads((folder / "summary.json").read_text())["tasks"]
    reference = json.loads((uninterrupted / "summary.json").read_text())["tasks"]
    assert {t: merged[t]["metrics"] for t in METRICS} == {t: reference[t]["metrics"] for t in METRICS}
    predictions = {(r["task"], r["doc_id"]): r["prediction"] for r in samples(folder)}
    assert predictions == {(r["task"], r["doc_id"]): r["prediction"] for r in samples(uninterrupted)}


def test_hub_dataset_missing_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = invoke(["run", "--model", "tiny", "--random-weights", "--tasks", "pope", "--out", str(tmp_path / "out")])
    _one_line_exit_2(result, "--data-dir")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_video_task_is_refused_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """lmms-eval's video tasks hand over file paths as visuals. `vtcbench run` answers image tasks
    (the engine compresses Qwen videos, but lmms-eval's video loading is not wired), so it refuses
    at the first request, and the run folder, which holds no finished sample, is removed."""

    class Video:  # a vtcshapes row whose image converts to a video's path, as a video task's visual
        def convert(self, mode: str) -> str:
            return "clip.mp4"

    monkeypatch.setattr(VtcbenchLMM, "_doc", lambda self, request: {"image": Video(), "question": "What happens?"})
    result = invoke(["run", "--model", "tiny-qwen2.5-vl", "--random-weights", "--limit", "2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and "it/s]" not in line]  # (lmms-eval's bars)
    assert len(lines) == 1 and "'vtcshapes' gives str visuals (video or other media)" in lines[0], result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_tasks_lists_short_names_and_opt_ins():
    result = invoke(["tasks"])
    assert result.exit_code == 0
    for fragment in ("gqa", "textvqa_val", "docvqa_val", "mmbench_en_dev", "LLM judge (--allow-judge)"):
        assert fragment in result.stdout


def test_bad_input_is_refused_before_a_data_parallel_relaunch(tmp_path):
    args = ["run", "--model", "tiny", "--random-weights", "--tasks", "popee", "--num-processes", "2", "--out", str(tmp_path)]
    _one_line_exit_2(invoke(args), "unknown task 'popee'")


def test_a_run_leaves_no_temporary_task_folder(data_dir, tmp_path):
    import tempfile

    def leftovers() -> set[str]:
        return {p.name for p in Path(tempfile.gettempdir()).glob("vtcbench-tasks-*")}

    before = leftovers()
    result = invoke(["run", "--model", "tiny", "--random-weights", "--tasks", "pope", "--data-dir", str(data_dir),
                     "--out", str(tmp_path), "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert leftovers() == before
