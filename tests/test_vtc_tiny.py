"""The shipped vtc-tiny: what the README promises about it, checked on the shipped files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vtcbench.cli import app
from vtcbench.families import model_facts
from vtcbench.methods import get_method
from vtcbench.models import MODELS, load_model
from vtcbench.shapes import FAMILIES
from vtcbench.training import evaluate, held_out_split

FOLDER = MODELS["vtc-tiny"].source


@pytest.fixture(scope="module")
def vtc_tiny():
    return load_model("vtc-tiny")


def test_shipped_weights_are_small_and_the_architecture_is_big_enough(vtc_tiny):
    from pathlib import Path

    model, _ = vtc_tiny
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert (Path(FOLDER) / "model.safetensors").stat().st_size <= 20 * 2**20
    facts = model_facts(model)
    assert facts.image_tokens >= 64 and facts.n_layers >= 6
    assert "What it is not" in (Path(FOLDER) / "README.md").read_text()


@pytest.fixture(scope="module")
def vanilla_scores(vtc_tiny):
    model, processor = vtc_tiny
    return evaluate(model, processor, held_out_split(), get_method("vanilla"))


def test_vanilla_accuracy_on_the_held_out_split_is_what_training_recorded(vanilla_scores):
    from pathlib import Path

    recorded = json.loads((Path(FOLDER) / "training.json").read_text())["accuracy"]["vanilla"]
    assert vanilla_scores == pytest.approx(recorded, abs=1e-9)
    assert vanilla_scores["text"] >= 0.9  # it reads the one-token letter: it does look at the image


def test_vanilla_meets_the_shipped_models_bar(vanilla_scores):
    """>= 90% overall, >= 80% per family: the bar the shipped model was trained to."""
    assert vanilla_scores["overall"] >= 0.90
    assert all(vanilla_scores[family] >= 0.80 for family in FAMILIES), vanilla_scores


def test_generate_answers_the_default_question_about_the_default_scene():
    result = CliRunner().invoke(app, ["generate", "--method", "vanilla"])
    assert result.exit_code == 0, result.output
    assert "answer: 'K'" in result.output  # the example scene's letter (the family vtc-tiny reads reliably)
