"""`vtcbench flops` reproduces the papers' numbers (docs/flops.md#reference-numbers) through its JSON output."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vtcbench.cli import app

runner = CliRunner()


def flops_json(*options: str) -> dict:
    result = runner.invoke(app, ["flops", "--format", "json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def three_figures(value: float) -> float:
    return float(f"{value:.3g}")


@pytest.mark.parametrize(
    ("model", "options", "tflops", "source"),
    [
        ("llava-1.5-7b", ["--method", "vanilla"], "3.82", "PDrop T5, ViCo T1"),
        ("llava-1.5-7b", ["--method", "fastv", "--set", "layer=2", "--set", "drop_ratio=0.5"], "2.01", "PDrop T5"),
        ("llava-1.5-7b", ["--method", "pdrop", "--set", "keep_ratio=0.4"], "1.54", "PDrop T4"),
        ("llava-1.5-7b", ["--method", "pdrop", "--set", "keep_ratio=0.5"], "1.78", "PDrop T4"),
        ("llava-1.5-7b", ["--method", "pdrop", "--set", "keep_ratio=0.6"], "2.06", "PDrop T4"),
        ("llava-1.5-7b", ["--method", "vico", "--set", "stages=3"], "2.13", "ViCo T2"),
        ("llava-1.5-7b", ["--method", "vico", "--set", "stages=4"], "1.78", "ViCo T2"),
        ("llava-next-7b", ["--method", "vanilla"], "20.8", "PDrop T1"),
        ("llava-next-7b", ["--method", "pdrop", "--set", "keep_ratio=0.4"], "8.22", "PDrop T4"),
        ("llava-next-7b", ["--method", "pdrop", "--set", "keep_ratio=0.5"], "9.46", "PDrop T4"),
        ("llava-next-7b", ["--method", "pdrop", "--set", "keep_ratio=0.6"], "11.0", "PDrop T4"),
    ],
)
def test_image_token_tflops_match_the_papers(model, options, tflops, source):
    report = flops_json("--model", model, *options)
    assert three_figures(report["tflops_image"]) == float(tflops), source


@pytest.mark.parametrize(
    ("layer", "stride", "total", "cr"),
    [(2, 8, 3312, 5.57), (2, 2, 9792, 1.88), (16, 8, 10368, 1.78), (16, 2, 13824, 1.33)],
)
def test_llavolta_table_5_visual_token_totals_and_compression_ratios(layer, stride, total, cr):
    report = flops_json("--method", "llavolta", "--set", f"layer={layer}", "--set", f"stride={stride}")
    assert report["visual_token_total"] == total
    assert round(report["compression_ratio"], 2) == cr
    assert flops_json("--method", "vanilla")["visual_token_total"] == 18432


def test_pyramiddrop_eq3_saving_for_lambda_half_four_stages():
    """PyramidDrop Eq. 3 models a layer's cost as linear in its tokens: (1 - lambda^S) / (S (1 - lambda))
    of the vanilla cost, so lambda = 0.5 with 4 stages saves 53.1% of the visual-token work."""
    vanilla = flops_json("--method", "vanilla")["visual_token_total"]
    pdrop = flops_json("--method", "pdrop", "--set", "keep_ratio=0.5")["visual_token_total"]
    assert f"{1 - pdrop / vanilla:.1%}" == "53.1%"


def test_json_carries_every_documented_field():
    report = flops_json("--method", "fastv")
    for key in ("model", "method", "params", "image_tokens_per_layer", "visual_token_total", "compression_ratio",
                "tflops_image", "tflops_total", "tflops_vision_encoder", "tflops_method_overhead"):
        assert key in report
    assert report["params"] == {"layer": 2, "drop_ratio": 0.5}
    assert len(report["image_tokens_per_layer"]) == 32
    assert report["tflops_total"] > report["tflops_image"]  # text tokens and longer attention rows
    assert 0 < report["tflops_method_overhead"] < 0.01 * report["tflops_total"]


def test_vision_encoder_is_clip_vit_l_336():
    """CLIP ViT-L/14 at 336 px is about 191 GMACs (24 layers on 577 tokens plus the patch embedding)."""
    assert three_figures(flops_json()["tflops_vision_encoder"]) == 0.191
    assert three_figures(flops_json("--model", "llava-next-7b")["tflops_vision_encoder"]) == 0.955  # 5 crops


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--text-tokens", "-1"], "--text-tokens -1 is out of range"),
        (["--image-tokens", "0"], "--image-tokens 0 is out of range"),
        (["--format", "yaml"], "valid choices: json, table"),
        (["--method", "llavolta", "--image-tokens", "100", "--set", "stride=8"], "stride=8 does not divide the 100"),
    ],
)
def test_bad_flops_input_exits_2(options, fragment):
    result = runner.invoke(app, ["flops", *options])
    assert result.exit_code == 2
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
