"""`vtcbench profile`: phases, memory, energy, provenance on CPU; the GPU path where a GPU exists."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vtcbench.cli import app
from vtcbench.methods import METHODS
from vtcbench.profilers.latency import Latency, PhaseTimer
from vtcbench.provenance import tf32_use

runner = CliRunner()
TINY = ["--model", "tiny", "--random-weights", "--iterations", "2", "--warmup", "0", "--new-tokens", "3"]


def profile_json(*options: str) -> dict:
    result = runner.invoke(app, ["profile", *TINY, "--format", "json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_latency_statistics_on_a_worked_example():
    latency = Latency.from_samples([float(v) for v in range(10, 0, -1)])  # 1..10, unordered
    assert (latency.median_ms, latency.p10_ms, latency.p90_ms, latency.mean_ms, latency.n) == (5.5, 1.9, 9.1, 5.5, 10)


def test_cpu_timer_measures_phases_in_order():
    timer = PhaseTimer("cpu")
    for _ in range(2):
        with timer.phase("work"):
            sum(range(10000))
    assert len(timer.read()["work"]) == 2
    assert timer.read() == {}  # read-out clears


def test_profile_reports_every_phase_memory_energy_and_provenance():
    record = profile_json("--method", "fastv", "--text-tokens", "16")
    phases = record["latency_ms"]
    for phase in ("vision_encoder", "projector", "method_overhead", "llm_prefill", "ttft", "decode_per_token", "end_to_end"):
        assert phases[phase]["n"] == 2
        assert 0 < phases[phase]["p10_ms"] <= phases[phase]["median_ms"] <= phases[phase]["p90_ms"]
    assert phases["llm_prefill"]["median_ms"] < phases["ttft"]["median_ms"] < phases["end_to_end"]["median_ms"]
    # KV cache after prefill: fastv on the 4-layer tiny model keeps 64, 64, 32, 32 image tokens; 2 kv heads x 16 dims, fp32
    per_token_layer = 2 * 2 * 16 * 4
    assert record["memory"]["kv_cache_bytes"] == per_token_layer * sum(n + 16 for n in (64, 64, 32, 32))
    assert record["memory"]["torch_max_allocated_bytes"] is None  # CPU: unavailable, not 0
    assert record["energy"] == {"joules_per_sample": None, "unavailable_reason": "no NVML energy counter on CPU"}
    provenance = record["provenance"]
    for key in ("device", "driver", "torch", "transformers", "dtype", "attention", "git_revision"):
        assert key in provenance
    assert provenance["attention"] == "sdpa" and provenance["dtype"] == "float32"
    assert provenance["tf32"] is None  # a CPU never rounds float32 to TF32
    assert record["flops"]["image_tokens_per_layer"] == [64, 64, 32, 32]
    flops = record["flops"]
    analytic = flops["tflops_language_model"] * 1e12
    assert record["opcount"]["language_model_macs"] == pytest.approx(analytic, rel=0.01)
    fvcore = record["fvcore"]  # the second counter agrees exactly, or says why it could not trace
    if fvcore["error"] is None:
        assert fvcore["language_model_macs"] == record["opcount"]["language_model_macs"]
    else:
        assert fvcore["language_model_macs"] is None and fvcore["error"].startswith("fvcore could not trace")


def test_vanilla_has_no_method_overhead_phase_time():
    record = profile_json("--method", "vanilla")
    assert record["latency_ms"]["method_overhead"]["median_ms"] == 0


def test_train_reports_step_time_and_ratio_to_vanilla():
    record = profile_json("--method", "llavolta", "--train")
    assert record["train_step_ms"]["median_ms"] > 0
    assert record["train_step_vanilla_ms"]["median_ms"] > 0
    assert record["train_time_ratio_to_vanilla"] == pytest.approx(
        record["train_step_ms"]["median_ms"] / record["train_step_vanilla_ms"]["median_ms"]
    )


def test_reduced_shapes_of_a_real_architecture():
    record = profile_json("--model", "llava-1.5-7b", "--layers", "1", "--image-tokens", "16", "--text-tokens", "4",
                          "--method", "vanilla")
    assert record["shape"]["image_tokens"] == 16
    assert record["flops"]["n_layers"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA events and NVML")
def test_gpu_path_uses_cuda_events_and_nvml():
    record = profile_json("--device", "cuda", "--method", "fastv")
    assert record["memory"]["torch_max_allocated_bytes"] > 0
    assert "NVIDIA" in record["provenance"]["device"] or record["provenance"]["driver"]
    assert record["energy"]["joules_per_sample"] is None or record["energy"]["joules_per_sample"] > 0


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--text-tokens", "-5"], "--text-tokens -5 is out of range"),
        (["--image-tokens", "-1"], "--image-tokens -1 is out of range"),
        (["--new-tokens", "0"], "--new-tokens 0 is out of range"),
        (["--dtype", "float8"], "unknown dtype 'float8'; valid choices: bfloat16, float16, float32"),
        (["--attn", "flash_attention_2"], "flash_attention_2' needs the flash_attn package"),
        (["--image-tokens", "50"], "must be a square"),
        (["--format", "xml"], "valid choices: json, table"),
        (["--method", "fastv", "--set", "layer=9"], "valid range: 1..3"),
    ],
)
def test_bad_profile_input_exits_2_with_one_line(options, fragment):
    result = runner.invoke(app, ["profile", *TINY, *options])
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_train_refuses_a_method_that_cannot_be_trained(monkeypatch):
    """No shipped method is untrainable today; a method that declares `trainable = False` is refused."""
    monkeypatch.setattr(METHODS["kmeans"], "trainable", False)
    result = runner.invoke(app, ["profile", *TINY, "--method", "kmeans", "--set", "clusters=16", "--train"])
    assert result.exit_code == 2
    assert "kmeans cannot be trained" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_real_weights_with_changed_shape_are_refused():
    result = runner.invoke(app, ["profile", "--model", "llava-1.5-7b", "--layers", "2"])
    assert result.exit_code == 2 and "--random-weights" in result.stderr


@pytest.mark.parametrize(("name", "params"), [("fastv", {"layer": 1, "drop_ratio": 0.5}), ("vispruner", {"tokens": 16, "important_ratio": 0.5})])
def test_profile_on_llava_next_uses_its_nominal_image(tiny_next, name, params):
    """LLaVA-NeXT's synthetic image is a pinpoint with the most tiles, with as many placeholders as
    the processor writes for an image of that size (newlines included); the FLOPs' counts are those
    the engine applies (a per-crop selection: its count in each of the 5 crops)."""
    from PIL import Image

    from vtcbench.engine import compress
    from vtcbench.families import family_of
    from vtcbench.methods import get_method
    from vtcbench.profilers.session import Shape, profile, synthetic_inputs

    model, processor = tiny_next
    family, method = family_of(model), get_method(name, **params)
    n = family.synthetic_image_tokens(model.config)
    height, width = family._nominal_image(model.config)
    written = processor(images=[Image.new("RGB", (width, height))], text=["<image>"], return_tensors="pt")["input_ids"]
    assert n == int((written == model.config.image_token_index).sum()) > family.facts(model.config).image_tokens
    record = profile(model, "tiny-next", method, Shape(image_tokens=n, text_tokens=8, new_tokens=2, batch=2), iterations=1, warmup=0)
    with torch.no_grad(), compress(model, method) as engine:
        model(**engine.prepare(synthetic_inputs(model, Shape(image_tokens=n, text_tokens=8, new_tokens=2, batch=1))))
    assert record.flops["image_tokens_per_layer"] == engine.applied_image_tokens_per_layer
    assert record.latency_ms["llm_prefill"].median_ms > 0


def test_provenance_names_where_cuda_float32_may_round_to_tf32():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = False, True  # PyTorch's defaults
        assert tf32_use() == "cudnn"
        matmul.allow_tf32 = True
        assert tf32_use() == "matmul+cudnn"
        matmul.allow_tf32, cudnn.allow_tf32 = False, False
        assert tf32_use() == "off"
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
