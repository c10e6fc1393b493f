"""`--device-map` / `--max-memory`: a model split by accelerate's dispatch over the CPU and disk
offload (most of the decoder on disk) answers, counts and keeps exactly as the unsplit model,
for vanilla and the in-LLM methods, in `generate`'s path, in `run --batch-size 4` and in the
redundancy sweep's cells."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vtcbench.api import example_image
from vtcbench.cli import app
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
    ],
)
def test_bad_dispatch_options_are_one_line_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(app, ["run", "--limit", "2", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output and result.output.strip().count("\n") == 0, result.output
    assert not (tmp_path / "out").exists()
