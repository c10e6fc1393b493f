"""The shipped vtc-tiny and vtc-tiny-qwen: what the README promises about them, checked on the
shipped files."""

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

SHIPPED = {"vtc-tiny": "LlavaForConditionalGeneration", "vtc-tiny-qwen": "Qwen2_5_VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=list(SHIPPED))
def vtc_tiny(request):
    return request.param, load_model(request.param)


def test_shipped_weights_are_small_and_the_architecture_is_big_enough(vtc_tiny):
    from pathlib import Path

    alias, (model, _) = vtc_tiny
    folder = Path(MODELS[alias].source)
    assert type(model).__name__ == SHIPPED[alias]
    assert (folder / "model.safetensors").stat().st_size <= 20 * 2**20
    facts = model_facts(model)
    assert facts.image_tokens == 64 and facts.n_layers >= 6  # equal budgets across the two families
    assert "What it is not" in (folder / "README.md").read_text()


@pytest.fixture(scope="module")
def vanilla_scores(vtc_tiny):
    alias, (model, processor) = vtc_tiny
    return alias, evaluate(model, processor, held_out_split(), get_method("vanilla"))


def test_vanilla_accuracy_on_the_held_out_split_is_what_training_recorded(vanilla_scores):
    from pathlib import Path

    import torch

    alias, vanilla_scores = vanilla_scores
    training = json.loads((Path(MODELS[alias].source) / "training.json").read_text())
    recorded = training["accuracy"]["vanilla"]
    # exactly under the torch that trained it; another release's CPU kernels may flip a borderline
    # answer: at most 2 of a family's 125 questions
    tolerance = 1e-9 if training["torch"] == torch.__version__ else 2 / 125
    assert vanilla_scores == pytest.approx(recorded, abs=tolerance)
    assert vanilla_scores["text"] >= 0.9  # it reads the one-token letter: it does look at the image


def test_vanilla_meets_the_shipped_models_bar(vanilla_scores):
    """>= 90% overall, >= 80% per family: the bar the shipped models are trained to."""
    alias, vanilla_scores = vanilla_scores
    assert vanilla_scores["overall"] >= 0.90
    assert all(vanilla_scores[family] >= 0.80 for family in FAMILIES), vanilla_scores


def test_generate_answers_the_default_question_about_the_default_scene():
    result = CliRunner().invoke(app, ["generate", "--method", "vanilla"])
    assert result.exit_code == 0, result.output
    assert "answer: 'K'" in result.output  # the example scene's letter (the family vtc-tiny reads reliably)


@pytest.mark.parametrize("alias", list(SHIPPED))
def test_each_shipped_model_was_trained_in_at_most_30_minutes_on_2_threads(alias):
    from pathlib import Path

    recorded = json.loads((Path(MODELS[alias].source) / "training.json").read_text())
    assert recorded["seconds"] <= 30 * 60 and recorded["threads"] == 2


def test_vtc_tiny_qwen_runs_fastv_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["run", "--model", "vtc-tiny-qwen", "--method", "fastv", "--limit", "8", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("vtc-tiny-qwen")]
    summary = json.loads((folder / "summary.json").read_text())
    (entry,) = summary["tasks"].values()
    tokens = entry["mean_image_tokens_per_layer"]
    assert entry["samples"] == 8 and tokens[:2] == [64, 64] and all(t == 32 for t in tokens[2:])  # FastV: half after layer 2
