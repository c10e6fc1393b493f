"""Every method at the edges of its legal settings (first and last layer it accepts, keeping one
token, none, or all): `generate` answers with the planned visual tokens per layer, and
`run --batch-size 4` gives the per-sample run's predictions, under eager and sdpa attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtcbench.cli import _format_counts, app
from vtcbench.methods import get_method, parse_set_options

runner = CliRunner()
N_LAYERS, N_IMAGE = 6, 64  # vtc-tiny

BOUNDARIES: dict[str, tuple[str, list[str]]] = {
    "fastv-first-layer": ("fastv", ["layer=1"]),  # ranks with layer 0's attention
    "fastv-last-layer-keeps-one": ("fastv", ["layer=5", "drop_ratio=0.99"]),
    "pdrop-first-layer": ("pdrop", ["layers=1"]),
    "pdrop-last-layer": ("pdrop", ["layers=5"]),
    "pdrop-keeps-none": ("pdrop", ["layers=1,2", "keep_ratio=0.01"]),
    "vico-every-layer": ("vico", ["stages=6"]),
    "llavolta-first-layer": ("llavolta", ["layer=0"]),
    "llavolta-last-layer-one-token": ("llavolta", ["layer=5", "stride=64"]),
    "random-first-layer": ("random", ["layer=0"]),
    "random-last-layer-keeps-one": ("random", ["layer=5", "drop_ratio=0.99"]),
    "kmeans-first-layer-one-cluster": ("kmeans", ["layer=0", "clusters=1"]),
    "kmeans-last-layer-keeps-all": ("kmeans", ["layer=5", "clusters=64"]),
    "avgpool-one-token": ("avgpool", ["kernel=8"]),
}


def _planned(name: str, settings: list[str]) -> list[int]:
    return get_method(name, **parse_set_options(settings)).image_tokens_per_layer(N_IMAGE, N_LAYERS)


def _options(name: str, settings: list[str], attn: str) -> list[str]:
    return ["--method", name, *[arg for setting in settings for arg in ("--set", setting)], "--attn", attn]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(BOUNDARIES))
def test_generate_answers_at_the_boundary(case, attn):
    name, settings = BOUNDARIES[case]
    result = runner.invoke(app, ["generate", *_options(name, settings, attn), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "answer: '" in result.stdout
    assert f"({N_LAYERS} layers): {_format_counts(_planned(name, settings))}" in result.stdout


def _records(out: Path) -> dict:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    lines = (folder / "samples.jsonl").read_text().splitlines()
    return {(r["doc_id"], r["request_index"]): r for r in map(json.loads, lines)}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(BOUNDARIES))
def test_run_batch_4_equals_the_per_sample_run_at_the_boundary(case, attn, tmp_path):
    name, settings = BOUNDARIES[case]
    runs = {}
    for batch in ("1", "4"):
        out = tmp_path / f"batch{batch}"
        result = runner.invoke(app, ["run", *_options(name, settings, attn), "--limit", "8", "--batch-size", batch, "--out", str(out)])
        assert result.exit_code == 0, result.output
        runs[batch] = _records(out)
    assert len(runs["1"]) == 8
    assert {k: r["prediction"] for k, r in runs["4"].items()} == {k: r["prediction"] for k, r in runs["1"].items()}
    assert all(r["batch_size"] == 4 for r in runs["4"].values())
    planned = _planned(name, settings)
    assert all(r["image_tokens_per_layer"] == planned for run in runs.values() for r in run.values())
