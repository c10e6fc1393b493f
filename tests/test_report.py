"""`vtcbench report`: layouts against checked-in tables, intervals against an independent
bootstrap, CSV through pandas, and the refusals (empty folder, mixed models, bad options).

The run folders are synthetic, written here: four runs of one model on three tasks (vtcshapes
with its per-family records, gqa with plain numbers, mme whose pair scores do not decompose),
an old folder without per-document scores, a sweep, and three broken folders.
Regenerate the expected tables after a deliberate change with VTCBENCH_REGENERATE=1.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from vtcbench.cli import app

runner = CliRunner()
EXPECTED = Path(__file__).parent / "expected" / "report"
REGENERATE = os.environ.get("VTCBENCH_REGENERATE") == "1"
MODEL = "tiny-model"
N_DOCS = 12
FAMILIES = ("color", "count", "text")
PROVENANCE = {
    "device": "NVIDIA H100 80GB HBM3", "driver": "550.54", "cuda": "12.4", "torch": "2.5.1", "transformers": "5.5.0",
    "dtype": "float16", "attention": "sdpa", "git_revision": "0123456789abcdef0123", "python": "3.11.7",
}


def _correct(method: str, doc: int) -> float:
    """A deterministic pattern of right (1) and wrong (0) answers per method."""
    wrong = {"vanilla": (0,), "fastv": (0, 3, 5, 7, 9), "pdrop-0.5": (0, 5), "pdrop-0.25": (0, 2, 5, 7, 11),
             "llavolta": (1, 4)}[method]
    return 0.0 if doc in wrong else 1.0


def write_run(root: Path, folder: str, method: str, params: dict, key: str, *, tasks=("vtcshapes", "gqa", "mme"),
              per_sample: bool = True, provenance: dict | None = None, model: str = MODEL,
              tokens: list[float] | None = None, tflops: float = 3.82, prefill: float = 100.0) -> Path:
    """A run folder as `vtcbench run` writes it (only the fields the report reads)."""
    path = root / folder
    path.mkdir(parents=True)
    lmms_names = {"vtcshapes": "vtc_local_vtcshapes", "gqa": "gqa", "mme": "mme"}
    identity = {"model": model, "method": method, "params": params, "tasks": [lmms_names[t] for t in tasks],
                "limit": N_DOCS, "seed": 0, "random_weights": False, "dtype": "float16", "attn_implementation": "sdpa",
                "data_dir": None, "fidelity": False}
    (path / "config.json").write_text(json.dumps({"identity": identity, "provenance": provenance or PROVENANCE}))
    tokens = tokens or [576.0] * 4
    samples, summary_tasks = [], {}
    for task in tasks:
        name = lmms_names[task]
        scores = [_correct(key, d) for d in range(N_DOCS)]
        if task == "gqa":
            scores = [_correct(key, (d + 4) % N_DOCS) for d in range(N_DOCS)]
        for doc, score in enumerate(scores):
            record = {"task": name, "doc_id": doc, "request_index": 0, "request_type": "generate_until",
                      "prediction": "x", "image_tokens_per_layer": tokens, "prefill_ms": prefill}
            family = FAMILIES[doc % 3]
            if per_sample:
                if task == "vtcshapes":
                    item = {"question_id": f"q{doc}", "family": family, "score": score}
                    record["metrics"] = {"overall": item, family: item}
                elif task == "gqa":
                    record["metrics"] = {"exact_match": score}
                else:
                    record["metrics"] = {"mme_perception_score": {"question_id": f"q{doc}", "category": "OCR"}}
            samples.append(record)
        mean = sum(scores) / N_DOCS
        clt = math.sqrt(mean * (1 - mean) / (N_DOCS - 1))
        if task == "vtcshapes":
            metrics = {"overall,none": mean, "overall_stderr,none": "N/A", "overall_stderr_clt,none": clt}
            for family in FAMILIES:
                picked = [s for d, s in enumerate(scores) if FAMILIES[d % 3] == family]
                metrics[f"{family},none"] = sum(picked) / len(picked)
        elif task == "gqa":
            metrics = {"exact_match,none": mean, "exact_match_stderr,none": "N/A"}
        else:
            metrics = {"mme_perception_score,none": 1200.0 + 300 * mean, "mme_perception_score_stderr,none": "N/A",
                       "mme_cognition_score,none": 300.0}
        summary_tasks[name] = {"metrics": metrics, "samples": N_DOCS, "mean_image_tokens_per_layer": tokens,
                               "tflops_image": tflops, "tflops_total": tflops * 1.2, "prefill_ms_median": prefill}
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    (path / "summary.json").write_text(json.dumps({"identity": identity, "tasks": summary_tasks}))
    return path


def write_sweep(root: Path) -> None:
    path = root / f"{MODEL}__sweep-attention__5555555555"
    path.mkdir()
    identity = {"model": MODEL, "method": "sweep-attention", "tasks": ["vtc_local_vtcshapes"], "limit": N_DOCS, "seed": 0}
    (path / "config.json").write_text(json.dumps({"identity": identity, "provenance": PROVENANCE}))
    curves = [{"layer": "", "ratio": 1.0, "criterion": "vanilla", "metric_name": "overall", "metric": 11 / 12,
               "stderr": 0.0833, "visual_tokens": 576.0, "tflops": 3.82}]
    for layer, base in ((2, 0.5), (8, 0.75)):
        for ratio in (0.25, 0.5):
            curves.append({"layer": layer, "ratio": ratio, "criterion": "attention", "metric_name": "overall",
                           "metric": base + ratio / 4, "stderr": 0.1, "visual_tokens": 576 * ratio, "tflops": 2.0})
    (path / "summary.json").write_text(json.dumps({"identity": identity, "metric": "overall,none", "curves": curves}))
    (path / "samples.jsonl").write_text("")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    write_run(root, f"{MODEL}__vanilla__0000000000", "vanilla", {}, "vanilla", prefill=120.0)
    write_run(root, f"{MODEL}__fastv__1111111111", "fastv", {"layer": 2, "drop_ratio": 0.5}, "fastv",
              tokens=[576.0, 576.0, 288.0, 288.0], tflops=2.01, prefill=80.0)
    write_run(root, f"{MODEL}__pdrop__2222222222", "pdrop", {"layers": [1, 2, 3], "keep_ratio": 0.5}, "pdrop-0.5",
              tasks=("vtcshapes", "gqa"), tokens=[576.0, 288.0, 144.0, 72.0], tflops=1.78, prefill=75.0)
    write_run(root, f"{MODEL}__pdrop__3333333333", "pdrop", {"layers": [1, 2, 3], "keep_ratio": 0.25}, "pdrop-0.25",
              tasks=("vtcshapes", "gqa"), tokens=[576.0, 144.0, 36.0, 9.0], tflops=1.38, prefill=70.0,
              provenance={**PROVENANCE, "git_revision": "fedcba9876543210fedc"})
    write_run(root, f"{MODEL}__llavolta__4444444444", "llavolta", {"layer": 2, "stride": 8}, "llavolta",
              tasks=("vtcshapes", "gqa"), per_sample=False, tokens=[576.0, 576.0, 72.0, 72.0], tflops=2.2, prefill=85.0)
    write_sweep(root)
    broken = root / f"{MODEL}__kmeans__badconfig"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    partial = write_run(root, f"{MODEL}__vico__partial", "vico", {}, "vanilla")
    (partial / "summary.json").unlink()
    damaged = write_run(root, f"{MODEL}__random__badline", "random", {}, "vanilla")
    with open(damaged / "samples.jsonl", "a") as handle:
        handle.write('{"task": "gqa", "doc_id": 3\n')
    return root


def report(results: Path, *options: str):
    return runner.invoke(app, ["report", "--results", str(results), *options])


LAYOUT_CASES = {
    "efficiency": (),  # auto: several methods
    "inference": ("--layout", "inference"),
    "compressors": ("--layout", "compressors"),
    "ablation": ("--methods", "vanilla,pdrop"),  # auto: one method in several settings
    "sweep": ("--runs", "*sweep*"),  # auto: only sweeps
}


@pytest.mark.parametrize("fmt", ["markdown", "latex"])
@pytest.mark.parametrize("layout", list(LAYOUT_CASES))
def test_layout_matches_the_checked_in_table(results, layout, fmt):
    result = report(results, *LAYOUT_CASES[layout], "--format", fmt)
    assert result.exit_code == 0, result.output
    expected = EXPECTED / f"{layout}.{'md' if fmt == 'markdown' else 'tex'}"
    if REGENERATE:
        expected.parent.mkdir(parents=True, exist_ok=True)
        expected.write_text(result.stdout)
    assert result.stdout == expected.read_text()


def test_auto_layout_picks_the_papers_table(results):
    for options, layout in (((), "efficiency"), (("--methods", "vanilla,pdrop"), "ablation"), (("--runs", "*sweep*"), "sweep")):
        data = json.loads(report(results, *options, "--format", "json").stdout)
        assert data["layout"] == layout


def _json(results: Path, *options: str) -> dict:
    result = report(results, *options, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _row(data: dict, run: str, kind: str = "run") -> dict:
    return next(r for r in data["tables"][0]["rows"] if r["run"].split("__")[1:] == run.split("__")[1:] and r["row"] == kind)


def _bootstrap_loop(values: np.ndarray, seed: int, resamples: int = 10_000) -> tuple[float, float]:
    """The percentile bootstrap written out: one resample of the documents per iteration."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        means.append(values[rng.integers(0, len(values), size=len(values))].mean())
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


@pytest.mark.parametrize("seed", [0, 7])
def test_intervals_equal_an_independent_bootstrap(results, seed):
    data = _json(results, "--seed", str(seed))
    fastv = _row(data, f"{MODEL}__fastv__1111111111")
    own = np.array([_correct("fastv", d) for d in range(N_DOCS)])
    vanilla = np.array([_correct("vanilla", d) for d in range(N_DOCS)])
    low, high = _bootstrap_loop(own, seed)
    assert fastv["vtcshapes"] == pytest.approx(100 * own.mean())
    assert (fastv["vtcshapes_low"], fastv["vtcshapes_high"]) == pytest.approx((100 * low, 100 * high))
    low, high = _bootstrap_loop(own - vanilla, seed)
    assert fastv["vtcshapes_delta"] == pytest.approx(100 * (own - vanilla).mean())
    assert (fastv["vtcshapes_delta_low"], fastv["vtcshapes_delta_high"]) == pytest.approx((100 * low, 100 * high))
    shifted = np.array([_correct("fastv", (d + 4) % N_DOCS) for d in range(N_DOCS)])
    assert (fastv["gqa_low"], fastv["gqa_high"]) == pytest.approx(tuple(100 * v for v in _bootstrap_loop(shifted, seed)))


def test_a_difference_whose_interval_excludes_zero_is_marked(results):
    data = _json(results)
    fastv = _row(data, f"{MODEL}__fastv__1111111111")
    assert fastv["vtcshapes_delta_high"] < 0  # fastv is wrong on 4 documents vanilla answers
    markdown = report(results).stdout
    line = next(line for line in markdown.splitlines() if line.startswith("| fastv"))
    assert "Δ -33.3 [" in line and "]*" in line


def test_fallbacks_to_lmms_eval_stderr_or_none_are_footnoted(results):
    data = _json(results)
    old = _row(data, f"{MODEL}__llavolta__4444444444")
    mean = sum(_correct("llavolta", d) for d in range(N_DOCS)) / N_DOCS
    clt = math.sqrt(mean * (1 - mean) / (N_DOCS - 1))
    assert old["vtcshapes_low"] == pytest.approx(100 * (mean - 1.96 * clt), rel=1e-4)
    assert old["vtcshapes_high"] == 100.0  # mean + 1.96 SE, clipped to the fraction's range
    assert old["gqa_low"] is None and old["vtcshapes_delta_low"] is None  # no stderr; no paired scores
    assert old["vtcshapes_delta"] == pytest.approx(100 * (mean - 11 / 12))
    vanilla = _row(data, f"{MODEL}__vanilla__0000000000")
    assert vanilla["mme"] == pytest.approx(1200 + 300 * 11 / 12) and vanilla.get("mme_low") is None
    notes = " ".join(data["tables"][0]["footnotes"])
    assert "llavolta (layer=2, stride=8) on vtcshapes (older folder without per-document scores; CLT SE)" in notes
    assert "vanilla on mme (not a mean of per-document scores)" in notes
    assert "MME's score divided by 2000" in notes
    assert vanilla["average"] == pytest.approx((100 * 11 / 12 + 100 * 11 / 12 + 100 * (1200 + 300 * 11 / 12) / 2000) / 3)


def test_missing_cells_are_dashes_not_zeros(results):
    markdown = report(results).stdout
    line = next(line for line in markdown.splitlines() if line.startswith("| pdrop (layers=1,2,3, keep_ratio=0.5)"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-2:] == ["-", "-"]  # no mme, so no average


def test_provenance_differences_are_flagged(results):
    notes = " ".join(_json(results)["tables"][0]["footnotes"])
    assert "Compared runs differ in git revision: 0123456789ab (" in notes
    assert "fedcba987654 (pdrop (layers=1,2,3, keep_ratio=0.25))" in notes


def test_a_difference_in_tf32_use_is_flagged(tmp_path):
    """(Runs that record no TF32 use, as on a CPU, leave it out: the checked-in tables show no TF32.)"""
    write_run(tmp_path, f"{MODEL}__vanilla__0000000000", "vanilla", {}, "vanilla", provenance={**PROVENANCE, "tf32": "cudnn"})
    write_run(tmp_path, f"{MODEL}__fastv__1111111111", "fastv", {"layer": 2, "drop_ratio": 0.5}, "fastv",
              provenance={**PROVENANCE, "tf32": "off"})
    notes = " ".join(_json(tmp_path)["tables"][0]["footnotes"])
    assert "Compared runs differ in TF32: off (fastv (layer=2, drop_ratio=0.5)); cudnn (vanilla)" in notes
    notes = " ".join(_json(tmp_path, "--methods", "vanilla")["tables"][0]["footnotes"])
    assert "Runs: device NVIDIA H100 80GB HBM3, dtype float16, TF32 cudnn, attention sdpa" in notes


def test_csv_round_trips_through_pandas(results):
    for options in ((), ("--layout", "inference"), ("--layout", "sweep")):
        # pandas' default float parser may be off by one unit in the last place (pandas 2.2);
        # "round_trip" reads the shortest repr the CSV holds back exactly
        frame = pd.read_csv(io.StringIO(report(results, *options, "--format", "csv").stdout), float_precision="round_trip")
        rows = [row for table in _json(results, *options)["tables"] for row in table["rows"]]
        assert len(frame) == len(rows)
        for index, row in enumerate(rows):
            for key, value in row.items():
                got = frame[key].iloc[index]
                if value is None:
                    assert pd.isna(got), (key, got)
                elif isinstance(value, float):
                    assert got == value, key
                else:
                    assert str(got) == str(value), key


def test_html_is_one_self_contained_page(results):
    page = report(results, "--format", "html").stdout
    assert page.startswith("<!DOCTYPE html>") and page.count("<html") == 1 and "<style>" in page
    for external in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert external not in page
    assert "Skipped run folders" in page and "<table>" in page


def test_broken_folders_are_skipped_with_their_reason(results):
    result = report(results)
    assert result.exit_code == 0
    data = _json(results)
    assert {s["folder"]: s["reason"] for s in data["skipped"]} == {
        f"{MODEL}__kmeans__badconfig": "config.json is not valid JSON (Expecting property name enclosed in double quotes: "
                                       "line 1 column 2 (char 1))",
        f"{MODEL}__random__badline": f"samples.jsonl line {3 * N_DOCS + 1} is not valid JSON",
        f"{MODEL}__vico__partial": "no summary.json (unfinished or interrupted run)",
    }
    assert f"- {MODEL}__vico__partial: no summary.json" in result.stdout


def test_run_folders_one_level_down_are_found(results, tmp_path):
    shutil.copytree(results / f"{MODEL}__vanilla__0000000000", tmp_path / "study" / "a")
    shutil.copytree(results / f"{MODEL}__fastv__1111111111", tmp_path / "study" / "b")
    rows = _json(tmp_path)["tables"][0]["rows"]
    assert [r["run"] for r in rows] == ["study/a", "study/b"]


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_no_run_folders_exit_2_with_one_line(tmp_path, make):
    target = tmp_path / "results"
    if make == "empty":
        target.mkdir()
    result = report(target)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "results" in result.stderr


def test_mixed_models_are_refused_without_allow_mixed(results, tmp_path):
    shutil.copytree(results / f"{MODEL}__vanilla__0000000000", tmp_path / "a")
    write_run(tmp_path, "other__fastv__9", "fastv", {"layer": 2}, "fastv", model="other-model")
    result = report(tmp_path)
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "other-model" in message and MODEL in message and "--allow-mixed" in message
    allowed = report(tmp_path, "--allow-mixed")
    assert allowed.exit_code == 0 and "| other-model: fastv (layer=2) |" in allowed.stdout


BAD_OPTIONS = [
    (("--format", "pdf"), "unknown format 'pdf'; valid choices: csv, html, json, latex, markdown"),
    (("--layout", "grid"), "unknown layout 'grid'; valid choices: ablation, auto, compressors, efficiency"),
    (("--methods", "nosuch"), "unknown method 'nosuch'; valid choices: fastv, llavolta, pdrop"),
    (("--tasks", "nosuch"), "unknown task 'nosuch'; valid choices: gqa, mme, vtcshapes"),
    (("--sort", "nosuch"), "unknown --sort column 'nosuch'; valid choices: average, gqa, method, mme, prefill_ms"),
    (("--delta-vs", "nosuch", "--layout", "inference"), "--delta-vs 'nosuch' has no run here"),
    (("--runs", "nomatch*"), "--runs 'nomatch*' matches no run folder"),
    (("--layout", "ablation"), "--layout ablation compares one method's settings"),
]


@pytest.mark.parametrize(("options", "fragment"), BAD_OPTIONS)
def test_bad_options_exit_2_with_one_line_naming_the_choices(results, options, fragment):
    result = report(results, *options)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert fragment in message and len(message.splitlines()) == 1


def test_tasks_and_sort_select_and_order(results):
    data = _json(results, "--tasks", "vtc_local_vtcshapes", "--sort", "vtcshapes")
    table = data["tables"][0]
    assert [c["key"] for c in table["columns"]][-1] == "vtcshapes"
    values = [r["vtcshapes"] for r in table["rows"]]
    assert values == sorted(values, reverse=True)
    cheapest = [r["tflops"] for r in _json(results, "--sort", "TFLOPs")["tables"][0]["rows"]]
    assert cheapest == sorted(cheapest)


def test_inference_layout_has_difference_rows_against_fastv(results):
    rows = _json(results, "--layout", "inference")["tables"][0]["rows"]
    assert [(r["run"].split("__")[1], r["row"]) for r in rows] == [
        ("vanilla", "run"), ("fastv", "run"), ("llavolta", "run"), ("llavolta", "delta"), ("pdrop", "run"),
        ("pdrop", "delta"), ("pdrop", "run"), ("pdrop", "delta"),
    ]
    delta = rows[5]
    pdrop = np.array([_correct("pdrop-0.25", d) for d in range(N_DOCS)])
    fastv = np.array([_correct("fastv", d) for d in range(N_DOCS)])
    assert delta["vtcshapes"] == pytest.approx(100 * (pdrop - fastv).mean())


def test_metrics_option_gives_a_column_per_named_metric(results):
    """vtcshapes' families as columns, each bootstrapped over its own documents; no average."""
    data = _json(results, "--tasks", "vtcshapes", "--metrics", f"{FAMILIES[0]},overall")
    keys = [column["key"] for column in data["tables"][0]["columns"]]
    assert f"vtcshapes {FAMILIES[0]}" in keys and "vtcshapes overall" in keys and "average" not in keys
    fastv = _row(data, f"{MODEL}__fastv__1111111111")
    family = np.array([_correct("fastv", d) for d in range(N_DOCS) if d % 3 == 0])
    assert fastv[f"vtcshapes {FAMILIES[0]}"] == pytest.approx(100 * family.mean())
    low, high = _bootstrap_loop(family, 0)
    assert (fastv[f"vtcshapes {FAMILIES[0]}_low"], fastv[f"vtcshapes {FAMILIES[0]}_high"]) == pytest.approx((100 * low, 100 * high))


def test_mme_pair_scores_bootstrap_lmms_evals_own_aggregation():
    """MME's score is not a mean over documents: its interval resamples image pairs and reruns
    lmms-eval's aggregation (a pair drawn twice counts as two pairs)."""
    from lmms_eval.tasks.mme.utils import mme_aggregate_results

    from vtcbench.report.stats import AGGREGATE, estimate, paired_difference

    rng = np.random.default_rng(3)
    categories = ["OCR", "color", "count"]

    def records(correct: float) -> list[dict]:
        out = []
        for pair in range(30):
            for half in range(2):
                doc = 2 * pair + half
                value = {"question_id": f"img{pair}.png", "category": categories[pair % 3],
                         "score": float(rng.random() < correct)}
                out.append({"task": "vtc_local_mme", "doc_id": doc, "request_index": 0,
                            "metrics": {"mme_perception_score": value}})
        return out

    own, reference = records(0.6), records(0.8)
    values = [r["metrics"]["mme_perception_score"] for r in own]
    total = mme_aggregate_results(values)
    result = estimate({"mme_perception_score,none": total}, own, "vtc_local_mme", "mme_perception_score,none",
                      resamples=200, seed=5)
    assert result.source == AGGREGATE and result.value == total
    draws, pick = [], np.random.default_rng(5)
    for _ in range(200):
        chosen = pick.integers(0, 30, size=30)
        resampled = [{**values[2 * p + h], "question_id": (values[2 * p + h]["question_id"], k)}
                     for k, p in enumerate(chosen) for h in range(2)]
        draws.append(mme_aggregate_results(resampled))
    assert (result.interval.low, result.interval.high) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])))
    theirs = estimate({"mme_perception_score,none": mme_aggregate_results([r["metrics"]["mme_perception_score"] for r in reference])},
                      reference, "vtc_local_mme", "mme_perception_score,none", resamples=200, seed=5)
    difference = paired_difference(result, theirs, resamples=200, seed=5)
    assert difference.documents == 60 and difference.interval.low <= difference.value <= difference.interval.high
