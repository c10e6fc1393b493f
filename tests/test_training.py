"""`vtcbench train`: reproducible from a seed, compression-aware, schedules, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from vtcbench import shapes
from vtcbench.cli import app
from vtcbench.families import family_of, model_facts
from vtcbench.methods import get_method
from vtcbench.models import build_local_processor, load_config, load_model, random_model
from vtcbench.schedules import SCHEDULES, stages
from vtcbench.training import (
    AuxiliaryHeads,
    Encoder,
    TrainConfig,
    TrainResult,
    model_card,
    train,
    training_conversations,
    vocabulary,
)

runner = CliRunner()
SMALL = ["--steps", "4", "--batch-size", "4", "--test-per-family", "2"]


def _small(tmp_path, name: str, **kwargs) -> TrainConfig:
    return TrainConfig(out=tmp_path / name, steps=3, batch_size=4, test_per_family=1, log_every=1, **kwargs)


def test_same_seed_gives_the_same_weights_and_another_seed_does_not(tmp_path):
    weights = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(_small(tmp_path, name, seed=seed))
        weights.append(load_model(str(tmp_path / name))[0].state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_the_alignment_loss_is_near_zero_when_image_tokens_are_their_words_embeddings():
    config = load_config("vtc-tiny")
    model = random_model(config, seed=0, attn_implementation="sdpa")
    processor = build_local_processor(config, vocabulary(family_of(config).system_prompt(config)))
    words = model.get_input_embeddings().weight.detach()
    heads = AuxiliaryHeads(model_facts(config).vision_hidden_size, model.get_input_embeddings(), processor.tokenizer)
    batch = Encoder(processor.tokenizer, family_of(config), 64, "")(training_conversations(0, set())(3))
    names = {"colour": [None, *shapes.COLORS, None], "content": [None, *shapes.SHAPES, *shapes.LETTERS]}
    tokens = torch.zeros(3, 64, words.shape[1])
    for kind, labels in (("colour", batch.colour), ("content", batch.content)):
        for (row, cell), label in zip(torch.cartesian_prod(torch.arange(3), torch.arange(64)).tolist(), labels.flatten()):
            if names[kind][label] is not None:
                tokens[row, cell] += 1000 * words[processor.tokenizer.convert_tokens_to_ids(names[kind][label])]
    tower = torch.zeros(3, 64, config.vision_config.hidden_size)  # the classifiers' part: the same constant in all three
    chance = heads.loss(tower, torch.zeros_like(tokens), batch)  # alignment at chance: log 5 + log 12
    aligned = heads.loss(tower, tokens, batch)
    unaligned = heads.loss(tower, torch.randn_like(tokens) * tokens.abs().max(), batch)
    assert aligned < chance - math.log(5 * 12) + 0.05 < unaligned - 1


def test_train_writes_a_loadable_model_its_log_and_a_model_card(tmp_path):
    out = tmp_path / "model"
    result = runner.invoke(app, ["train", *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "vtcshapes held-out accuracy" in result.output
    assert {"model.safetensors", "config.json", "tokenizer.json", "training.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (tmp_path / "model.partial").exists()
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["steps"] == 4 and set(record["accuracy"]) == {"vanilla"}
    assert "What it is not" in (out / "README.md").read_text()
    model, processor = load_model(str(out))
    assert processor.tokenizer.convert_tokens_to_ids("triangle") != processor.tokenizer.unk_token_id
    assert model.config.text_config.num_hidden_layers == 6


@pytest.mark.parametrize("lr, shown", [(TrainConfig.lr, False), (1e-3, True)])
def test_the_model_cards_command_names_a_learning_rate_other_than_the_default(tmp_path, lr, shown):
    """The card's command reproduces the run: vtc-tiny-qwen's 1e-3 is not the default 2e-3."""
    config = TrainConfig(out=tmp_path, model="vtc-tiny-qwen", steps=2, batch_size=16, lr=lr)
    scores = dict.fromkeys((*shapes.FAMILIES, "overall"), 1.0)
    result = TrainResult(out=tmp_path, seconds=60.0, steps=2, stages="", accuracy={"vanilla": scores}, time_ratio=None)
    card = model_card(config, result, n_parameters=1_000)
    assert ("--batch-size 16 --lr 0.001`" in card) is shown and ("--lr" in card) is shown


def test_llavolta_schedule_reports_time_ratio_and_accuracy_with_and_without_compression(tmp_path):
    out = tmp_path / "volta"
    args = ["train", *SMALL, "--method", "llavolta", "--schedule", "llavolta-4stage", "--time-every", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "training step time / vanilla step time" in result.output
    record = json.loads((out / "training.json").read_text())
    assert set(record["accuracy"]) == {"vanilla", "llavolta(layer=2,stride=8)"}
    assert record["time_ratio"] > 0
    assert [entry["method"] for entry in record["log"]] == [
        "llavolta(layer=2,stride=8)", "llavolta(layer=3,stride=8)", "llavolta(layer=3,stride=2)", "vanilla"
    ]


def test_schedules_split_the_steps_into_equal_stages():
    plan = stages("llavolta-4stage", get_method("llavolta"), steps=8, n_layers=6)
    assert [s.first_step for s in plan] == [0, 2, 4, 6]
    assert [s.method.params() for s in plan[:3]] == [
        {"layer": 2, "stride": 8}, {"layer": 3, "stride": 8}, {"layer": 3, "stride": 2}
    ]
    assert plan[3].method.name == "vanilla"
    assert len(stages("llavolta-2stage", get_method("llavolta"), 10, 32)) == 2
    assert stages("llavolta-3stage-deeper", get_method("llavolta"), 9, 32)[1].method.params() == {"layer": 16, "stride": 8}


@pytest.mark.parametrize("method", ["fastv", "pdrop", "avgpool"])
def test_compression_aware_training_runs_each_kind_of_method(tmp_path, method):
    result = train(_small(tmp_path, method, method=get_method(method)))
    assert set(result.accuracy) == {"vanilla", result.log[-1]["method"]}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--schedule", "llavolta-9stage", "--method", "llavolta"], "valid choices: " + ", ".join(SCHEDULES)),
        (["--schedule", "llavolta-4stage", "--method", "fastv"], "pass --method llavolta"),
        (["--model", "llava-1.5-7b"], "valid choices: vtc-tiny"),
        (["--method", "nope"], "unknown method"),
        (["--steps", "-1"], "--steps -1"),
        (["--test-per-family", "500"], "valid: 1..125"),
        (["--device-map", "auto"], "--device-map splits the weights --init loads"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, fragment):
    result = runner.invoke(app, ["train", *args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_a_split_that_offloads_weights_is_refused_before_training(tmp_path):
    """Known only once accelerate has placed the weights (after its loading bar): one error line,
    exit 2, nothing written."""
    result = runner.invoke(app, ["train", *SMALL, "--init", "vtc-tiny", "--device-map", "auto", "--max-memory", "cpu=4MB",
                                 "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and not (tmp_path / "m").exists()
    assert result.output.strip().splitlines()[-1] == (
        "error: --device-map: training needs every weight on a device that computes it; this split offloads some "
        "(cpu, disk); raise --max-memory or use more GPUs"
    )


def test_fine_tuning_a_dispatched_model_trains_its_weights(tmp_path):
    """`train --init --device-map auto`: on this CPU-only machine accelerate puts every part on the
    cpu (no offload), and the fine-tuned weights differ from the initial ones."""
    out = tmp_path / "tuned"
    result = runner.invoke(app, ["train", *SMALL, "--init", "vtc-tiny", "--lr", "1e-3", "--device-map", "auto", "--out", str(out)])
    assert result.exit_code == 0, result.output
    tuned, initial = load_model(str(out))[0], load_model("vtc-tiny")[0]
    changed = [name for name, weight in tuned.state_dict().items() if not torch.equal(weight, initial.state_dict()[name])]
    assert any("language_model" in name for name in changed) and any("vision_tower" in name for name in changed)


def test_an_existing_model_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["train", *SMALL, "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
