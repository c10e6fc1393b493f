"""Iso-cost budgets (`--budget`): every method's knob solved to the closest cost, worked examples
from the papers' settings, one-line refusals, and the iso report through the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vtcbench.budgets import Budget, cost, parse_budget, solve
from vtcbench.cli import app
from vtcbench.errors import VtcbenchError
from vtcbench.families import model_facts
from vtcbench.methods import METHODS, get_method
from vtcbench.models import load_config

BUDGETED = sorted(name for name, cls in METHODS.items() if cls.budget_knobs)


@pytest.fixture(scope="module", params=["vtc-tiny", "llava-1.5-7b"])
def facts(request):
    return model_facts(load_config(request.param))


def test_every_training_free_compressing_method_takes_a_budget():
    assert set(BUDGETED) == {
        name for name, cls in METHODS.items() if not cls.needs_weights and not cls.adaptive and name != "vanilla"
    }


@pytest.mark.parametrize("measure", ["tokens", "tflops"])
@pytest.mark.parametrize("name", BUDGETED)
def test_a_reachable_cost_is_solved_exactly_and_others_to_the_closest(facts, name, measure):
    """Every cost a candidate reaches is solved to a setting of exactly that cost; a budget
    between two reachable costs gets the nearer one."""
    params = {"layer": 1} if "layer" in get_method(name).params() else {}
    base = get_method(name, **params)
    reachable = []
    for candidate in base.budget_candidates(facts.image_tokens, facts.n_layers):
        try:
            candidate.validate_for(facts.image_tokens, facts.n_layers)
        except VtcbenchError:
            continue
        reachable.append(cost(candidate, facts, measure))
    reachable = sorted(set(reachable))
    for value in reachable[:: max(1, len(reachable) // 7)]:
        assert solve(name, params, Budget(measure, value), facts).cost == pytest.approx(value, rel=1e-12)
    for low, high in list(zip(reachable, reachable[1:]))[:: max(1, len(reachable) // 5)]:
        between = low + 0.3 * (high - low)
        assert solve(name, params, Budget(measure, between), facts).cost == pytest.approx(low, rel=1e-12)


@pytest.mark.parametrize(
    ("tokens", "dominant", "contextual"), [(64, 54, 10), (128, 108, 20), (192, 162, 30)],
)
def test_visionzip_budgets_give_the_papers_splits(tokens, dominant, contextual):
    """VisionZip's README (54+10) and its paper's 128 and 192 settings (108+20, 162+30)."""
    solved = solve("visionzip", {}, Budget("tokens", tokens), model_facts(load_config("llava-1.5-7b")))
    assert solved.method.params() == {"dominant": dominant, "contextual": contextual}
    assert solved.cost == tokens


def test_worked_examples_on_llava_1_5():
    facts = model_facts(load_config("llava-1.5-7b"))
    fastv = solve("fastv", {}, Budget("tokens", 64), facts)  # (2 x 576 + 30 x 30) / 32 = 64.125
    assert fastv.method.action_count(2, 576, 576, 32) == 30 and fastv.cost == pytest.approx(64.125)
    assert solve("divprune", {}, Budget("tokens", 56), facts).method.kept(576) == 56
    assert solve("dart", {}, Budget("tokens", 64), facts).method.truncation == 24  # 4 + 8 x 3 = 28 kept from layer 2


@pytest.mark.parametrize(
    ("name", "params", "budget", "message"),
    [
        ("vanilla", {}, "tokens=10", "--budget: vanilla has no setting that changes its cost (it keeps every visual token)"),
        ("voco", {}, "tokens=10", "its number of VoCo tokens is the one it was trained with"),
        ("stf", {}, "tokens=10", "its kernel is the one its projector was trained with"),
        ("prumerge_plus", {}, "tokens=10", "it keeps a number of tokens per image set by the image (its CLS-attention outliers)"),
        ("fastv", {}, "tokens=10", "--budget tokens=10: fastv (layer=2) reaches 22..64 tokens on this model; choose a budget in that range"),
        ("fastv", {"drop_ratio": "0.5"}, "tokens=20", "--budget chooses fastv's drop_ratio; drop --set drop_ratio"),
        ("visionzip", {"contextual": "3"}, "tokens=20", "--budget chooses visionzip's dominant, contextual; drop --set contextual"),
    ],
)
def test_budgets_a_method_cannot_meet_are_refused_in_one_line(name, params, budget, message):
    with pytest.raises(VtcbenchError) as error:
        solve(name, params, parse_budget(budget), model_facts(load_config("vtc-tiny")))
    assert str(error.value) == message or message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text", ["tokens", "tokens=", "tokens=-3", "tokens=0", "flops=2", "tokens=abc"])
def test_malformed_budgets_are_refused(text):
    with pytest.raises(VtcbenchError, match=r"^--budget .* is not of the form tokens=N or tflops=X \(a positive number\)$"):
        parse_budget(text)


def test_run_with_budgets_and_the_iso_report(tmp_path):
    runner = CliRunner()
    out = tmp_path / "results"
    assert runner.invoke(app, ["run", "--method", "vanilla", "--limit", "4", "--out", str(out)]).exit_code == 0
    for args in (["--method", "divprune"], ["--method", "fastv", "--set", "layer=1"]):
        result = runner.invoke(app, ["run", *args, "--budget", "tokens=16", "--limit", "4", "--out", str(out)])
        assert result.exit_code == 0, result.output
    refused = runner.invoke(app, ["run", "--method", "fastv", "--budget", "tokens=16", "--limit", "4", "--out", str(tmp_path / "none")])
    assert refused.exit_code == 2 and not (tmp_path / "none").exists()
    assert "fastv (layer=2) reaches 22..64 tokens" in refused.output
    report = runner.invoke(app, ["report", "--results", str(out), "--layout", "iso", "--format", "markdown"])
    assert report.exit_code == 0, report.output
    rows = [line for line in report.output.splitlines() if line.startswith("| tokens=16")]
    assert len(rows) == 2
    assert any("divprune (ratio=0.25) | 16.0 |" in row for row in rows)
    assert any("fastv (layer=1, drop_ratio=0.90625) | 15.7 |" in row for row in rows)
    without = runner.invoke(app, ["report", "--results", str(out), "--layout", "iso", "--methods", "vanilla"])
    assert without.exit_code == 2 and "none of the selected runs was made with --budget" in without.output


def test_the_iso_report_shows_an_adaptive_method_at_the_cost_it_reached(tmp_path):
    """PruMerge+ takes no budget (each image sets its count): the iso table lists it as `adaptive`
    with the visual tokens and TFLOPs its run measured."""
    runner = CliRunner()
    out = tmp_path / "results"
    common = ["--model", "tiny", "--random-weights", "--limit", "4", "--out", str(out)]
    for args in (["--method", "vanilla"], ["--method", "fastv", "--set", "layer=1", "--budget", "tokens=24"],
                 ["--method", "prumerge_plus"]):
        result = runner.invoke(app, ["run", *args, *common])
        assert result.exit_code == 0, result.output
    (folder,) = out.glob("tiny__prumerge_plus__*")
    (entry,) = json.loads((folder / "summary.json").read_text())["tasks"].values()
    tokens = sum(entry["mean_image_tokens_per_layer"]) / len(entry["mean_image_tokens_per_layer"])
    report = runner.invoke(app, ["report", "--results", str(out), "--layout", "iso", "--format", "markdown"])
    assert report.exit_code == 0, report.output
    (row,) = [line for line in report.output.splitlines() if line.startswith("| adaptive")]
    assert f"| prumerge_plus | {tokens:.1f} | {entry['tflops_image']:.3g} |" in row and tokens < 64
