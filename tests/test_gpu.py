"""The engine's invariants on a CUDA GPU in bfloat16, under sdpa and flash_attention_2 (where
installed): what `benchmarks/gpu_check.sh` runs on a GPU machine. Skipped without CUDA.

bfloat16 keeps 8 bits of mantissa, so logits are compared loosely; the tests rest on what must
hold exactly: the same greedy answers and the same visual-token counts. They use the shipped
vtc-tiny, whose trained answers are far from ties (a random model's near-ties would flip).
`VTCBENCH_TEST_DEVICE=cpu` runs them on the CPU (a check of the tests themselves).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from vtcbench.api import example_image
from vtcbench.engine import compress
from vtcbench.families import family_of
from vtcbench.families.llava import vicuna_v1_prompt
from vtcbench.methods import get_method
from vtcbench.models import load_model

DEVICE = os.environ.get("VTCBENCH_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)"
)
BACKENDS = ["eager", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
METHODS = {  # vtc-tiny: 6 layers, 64 image tokens
    "vanilla": {},
    "fastv": {"layer": 1},
    "pdrop": {"layers": (1, 3, 5)},
    "llavolta": {"layer": 2, "stride": 8},
    "random": {"layer": 0},
    "kmeans": {"layer": 5, "clusters": 16},
    "avgpool": {"kernel": 2},
}
QUESTIONS = [
    "What letter is written in the image?",
    "What color is the triangle?",
    "Is there a circle in the image?",
    "How many green shapes are there?",
]


@pytest.fixture(scope="module")
def models():
    loaded: dict[str, tuple] = {}

    def get(attn: str):
        if attn not in loaded:
            loaded[attn] = load_model("vtc-tiny", dtype="bfloat16", attn_implementation=attn, device=DEVICE)
        return loaded[attn]

    return get


def _answers(model, processor, method, questions: list[str]) -> tuple[list[str], list[int]]:
    """Greedy answers of one left-padded batch, and the visual tokens per layer it applied."""
    processor.tokenizer.padding_side = "left"
    prompts = [vicuna_v1_prompt(q, 1, system=family_of(model.config).system_prompt(model.config)) for q in questions]
    inputs = processor(images=[example_image()] * len(questions), text=prompts, return_tensors="pt", padding=True)
    inputs = inputs.to(DEVICE)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad(), compress(model, method) as engine:
        prepared = engine.prepare(inputs)
        output = model.generate(**prepared, max_new_tokens=3, do_sample=False)
        counts = list(engine.applied_image_tokens_per_layer)
    new = output[:, prepared["input_ids"].shape[1] :]
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new], counts


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_batch_equals_single_and_counts_follow_the_plan_in_bf16(models, name, attn):
    model, processor = models(attn)
    method = get_method(name, **METHODS[name])
    batched, counts = _answers(model, processor, method, QUESTIONS)
    singles = [_answers(model, processor, method, [question])[0][0] for question in QUESTIONS]
    assert batched == singles
    assert counts == method.image_tokens_per_layer(64, 6)


@pytest.mark.parametrize("attn", [b for b in BACKENDS if b != "eager"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_backends_give_eager_answers_in_bf16(models, name, attn):
    method = get_method(name, **METHODS[name])
    assert _answers(*models(attn), method, QUESTIONS) == _answers(*models("eager"), method, QUESTIONS)


@pytest.mark.parametrize("attn", BACKENDS)
def test_keep_all_equals_vanilla_in_bf16(models, attn):
    model, processor = models(attn)
    inputs = processor(images=[example_image()], text=[vicuna_v1_prompt(QUESTIONS[0], 1, system=family_of(model.config).system_prompt(model.config))], return_tensors="pt")
    inputs = inputs.to(DEVICE)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        reference = model(**inputs).logits.float()
        for name, params in {"fastv": {"drop_ratio": 0.0}, "pdrop": {"keep_ratio": 1.0}, "llavolta": {"stride": 1}}.items():
            with compress(model, get_method(name, **params)):
                logits = model(**inputs).logits.float()
            torch.testing.assert_close(logits, reference, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("name", ["vanilla", "fastv", "pdrop", "llavolta"])
def test_a_model_split_over_two_gpus_answers_as_on_one(models, name):
    """`--device-map`: vtc-tiny's decoder split over GPUs 0 and 1 (accelerate's dispatch, the first
    GPU held to 4 MB) gives the answers and visual-token counts of the model on one GPU."""
    split, processor = load_model("vtc-tiny", dtype="bfloat16", attn_implementation="sdpa", device_map="auto",
                                  max_memory={0: "4MB", 1: "1GiB"})
    assert {device for device in split.hf_device_map.values()} == {0, 1}
    whole, _ = models("sdpa")
    method = get_method(name, **METHODS[name])
    assert _answers(split, processor, method, QUESTIONS) == _answers(whole, processor, method, QUESTIONS)
