"""CLI: listings work, and bad input exits 2 with one line that names the value and the choices."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vtcbench.cli import app

runner = CliRunner()


def test_methods_lists_every_method_with_defaults():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for fragment in ("fastv", "pdrop", "vico", "llavolta", "random", "kmeans", "avgpool", "vanilla", "drop_ratio=0.5", "8,16,24"):
        assert fragment in result.stdout


def test_models_lists_aliases_with_their_facts():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for fragment in ("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "llava-next-7b", "576", "11008"):
        assert fragment in result.stdout


BAD_INPUTS = [
    (["--method", "nosuch"], "unknown method 'nosuch'; valid choices: avgpool, cdpruner, dart, divprune, fastv"),
    (["--model", "nosuch-model"], "nosuch-model"),
    (["--set", "ratio=0.5"], "unknown hyperparameter 'ratio'"),
    (["--set", "drop_ratio=1.5"], "drop_ratio=1.5 is out of range; valid range: [0, 1)"),
    (["--model", "llava-1.5-7b", "--set", "layer=40"], "layer=40 is outside this model's decoder layers; valid range: 1..31"),
    (["--method", "llavolta", "--model", "llava-1.5-7b", "--set", "stride=7"], "stride=7 does not divide the 576 image tokens"),
    (["--method", "pdrop", "--model", "llava-1.5-7b", "--set", "layers=8,40"], "layers=40"),
    (["--method", "avgpool", "--model", "llava-1.5-7b", "--set", "kernel=5"], "valid kernels: 1, 2, 3, 4, 6, 8, 12, 24"),
    (["--set", "layer"], "not of the form key=value"),
    (["--set", "layer=two"], "layer='two' is not a valid int"),
    (["--dtype", "float8", "--random-weights"], "float8"),
    (["--attn", "flex_attention", "--random-weights"], "flex_attention"),
]


@pytest.mark.parametrize(("options", "fragment"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(options, fragment):
    result = runner.invoke(app, ["generate", *options])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert fragment in message
    assert len(message.splitlines()) == 1
    assert "Traceback" not in result.output


def test_missing_weights_offline_say_how_to_get_them(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["generate", "--model", "llava-1.5-7b"])
    assert result.exit_code == 2
    assert "--random-weights" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_generate_answers_with_fastv_on_the_tiny_random_model():
    result = runner.invoke(app, ["generate", "--method", "fastv", "--model", "tiny", "--random-weights", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "answer:" in result.stdout
    assert "64x2, 32x2" in result.stdout  # visual tokens per layer on the 4-layer tiny model
