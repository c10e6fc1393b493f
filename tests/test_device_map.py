"""`--device-map` / `--max-memory`: a model split by accelerate's dispatch over the CPU and disk
offload (most of the decoder on disk) answers, counts and keeps exactly as the unsplit model,
for vanilla and the in-LLM methods, in `generate`'s path, in `run --batch-size 4` and in the
redundancy sweep's cells."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from vtcbench.api import example_image
from vtcbench.cli import app
from vtcbench.errors import VtcbenchError
from vtcbench.generation import EngineSession, encode
from vtcbench.methods import get_method
from vtcbench.models import load_model

SPLIT = {"device_map": "auto", "max_memory": {"cpu": "4MB"}}  # vtc-tiny is 7 MB: layers 1-5 and the head go to disk
METHODS = {"vanilla": {}, "fastv": {}, "pdrop": {"layers": (1, 3)}, "llavolta": {}}


@pytest.fixture(scope="module")
def models():
    split, processor = load_model("vtc-tiny", **SPLIT)
    whole, _ = load_model("vtc-tiny")
    return split, whole, processor


def test_the_split_puts_most_of_the_decoder_on_disk(models):
    split, _, _ = models
    placed = split.hf_device_map
    assert sum(device == "disk" for device in placed.values()) >= 4 and "cpu" in placed.values()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_split_model_generates_counts_and_keeps_as_the_whole_one(models, name):
    split, whole, processor = models
    method = get_method(name, **METHODS[name])
    results = []
    for model in (split, whole):
        session = EngineSession(model, processor, method)
        prompt = session.method.kind.prompt(method, session.family, "What letter is written in the image?", 1, None,
                                            session.family.system_prompt(model.config))
        generated = session.generate([encode(processor, model, prompt, [example_image()])], max_new_tokens=4,
                                     first_logits=True, record_kept=True)
        results.append(generated)
    split_run, whole_run = results
    assert split_run.new_tokens.tolist() == whole_run.new_tokens.tolist()
    assert split_run.image_tokens_per_layer == whole_run.image_tokens_per_layer
    assert split_run.kept == whole_run.kept
    torch.testing.assert_close(split_run.first_logits, whole_run.first_logits)


def test_run_with_a_device_map_answers_as_without(tmp_path):
    runner = CliRunner()
    outputs = {}
    for label, extra in (("whole", []), ("split", ["--device-map", "auto", "--max-memory", "cpu=4MB"])):
        out = tmp_path / label
        result = runner.invoke(app, ["run", "--method", "fastv", "--limit", "8", "--batch-size", "4", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        (samples,) = out.glob("*/samples.jsonl")
        records = [json.loads(line) for line in samples.read_text().splitlines()]
        outputs[label] = sorted((r["doc_id"], r["prediction"], tuple(r["image_tokens_per_layer"])) for r in records)
    assert outputs["split"] == outputs["whole"] and len(outputs["whole"]) == 8


def test_data_parallel_replicas_of_split_models_answer_as_one_whole_model(tmp_path):
    """`--num-processes 2 --device-map auto`: two processes (torchrun, gloo on CPU), each with its
    own model split over the cpu and disk offload, share the documents of one run folder."""
    outputs = {}
    for label, extra in (("whole", []), ("replicas", ["--num-processes", "2", "--device-map", "auto", "--max-memory", "cpu=4MB"])):
        out = tmp_path / label
        command = [sys.executable, "-m", "vtcbench", "run", "--method", "fastv", "--limit", "8", "--batch-size", "4",
                   "--device", "cpu", "--out", str(out), *extra]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-3000:]
        (samples,) = out.glob("*/samples.jsonl")
        records = [json.loads(line) for line in samples.read_text().splitlines()]
        outputs[label] = sorted((r["doc_id"], r["prediction"], tuple(r["image_tokens_per_layer"])) for r in records)
    assert outputs["replicas"] == outputs["whole"] and len(outputs["whole"]) == 8


@pytest.mark.parametrize(("rank", "gpus"), [(0, [0, 1]), (1, [2, 3])])
def test_each_replica_splits_its_model_over_its_own_block_of_gpus(monkeypatch, rank, gpus):
    """4 GPUs, 2 processes: replica 0 takes GPUs 0-1, replica 1 GPUs 2-3, each at its --max-memory
    limit or what accelerate finds free; cpu and disk limits go to both."""
    import accelerate.utils

    from vtcbench.runner import replica_max_memory

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {0: 100, 1: 101, 2: 102, 3: 103, "cpu": 1000})
    limits = replica_max_memory({1: "70GiB", 2: "60GiB", "disk": "1TB"}, rank, 2)
    expected = {0: 100, 1: "70GiB"} if rank == 0 else {2: "60GiB", 3: 103}
    assert limits == {**expected, "cpu": 500, "disk": "1TB"} and sorted(k for k in limits if isinstance(k, int)) == gpus
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    with pytest.raises(VtcbenchError, match="^--num-processes 2 cannot split this node's 3 GPUs evenly between replicas$"):
        replica_max_memory(None, rank, 2)


def test_profile_of_a_split_model_counts_the_whole_models_operations():
    """`profile --device-map`: the op counter sees the same multiply-accumulates through
    accelerate's offload hooks; on CPU there is no per-device memory to report (an empty map, not 0)."""
    records = {}
    for label, extra in (("whole", []), ("split", ["--device-map", "auto", "--max-memory", "cpu=4MB"])):
        result = CliRunner().invoke(app, ["profile", "--model", "vtc-tiny", "--method", "fastv", "--iterations", "1",
                                          "--new-tokens", "2", "--format", "json", *extra])
        assert result.exit_code == 0, result.output
        records[label] = json.loads(result.stdout.strip().splitlines()[-1])
    assert records["split"]["opcount"] == records["whole"]["opcount"] and records["whole"]["opcount"]["language_model_macs"] > 0
    assert records["split"]["flops"] == records["whole"]["flops"]
    assert records["split"]["memory"]["per_device_max_allocated_bytes"] == {}


def test_a_sweep_with_a_device_map_gives_the_cells_of_the_whole_model(tmp_path):
    runner = CliRunner()
    cells = {}
    for label, extra in (("whole", []), ("split", ["--device-map", "auto", "--max-memory", "cpu=4MB"])):
        out = tmp_path / label
        result = runner.invoke(app, ["redundancy-sweep", "--layers", "1,3", "--ratios", "0.25,0.5", "--limit", "6",
                                     "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        (found,) = out.glob("*/cells.jsonl")
        cells[label] = sorted(found.read_text().splitlines())
    assert cells["split"] == cells["whole"] and len(cells["whole"]) == 5 * 6  # vanilla and 4 cells, 6 samples each


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device-map", "everywhere"], "--device-map 'everywhere' is neither a strategy (auto, balanced, balanced_low_0, sequential) nor a JSON file"),
        (["--device-map", "auto", "--max-memory", "gpu0=70GiB"], "--max-memory 'gpu0=70GiB' is not DEVICE=SIZE"),
        (["--max-memory", "cpu=1GiB"], "--max-memory limits --device-map's dispatch; add --device-map auto"),
        (["--device-map", "auto", "--random-weights"], "--device-map dispatches a checkpoint's weights as they load"),
        (["--device-map", "MAP", "--num-processes", "2"], "--device-map FILE names each module's device for one model"),
    ],
)
def test_bad_dispatch_options_are_one_line_exit_2(tmp_path, args, message):
    (tmp_path / "map.json").write_text(json.dumps({"": "cpu"}))
    args = [str(tmp_path / "map.json") if arg == "MAP" else arg for arg in args]
    result = CliRunner().invoke(app, ["run", "--limit", "2", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output and result.output.strip().count("\n") == 0, result.output
    assert not (tmp_path / "out").exists()
