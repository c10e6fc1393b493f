"""Batches whose prompts carry different numbers of image tokens (LLaVA-NeXT's AnyRes): every
in-LLM method computes, per sample, exactly what it computes for that sample alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny_next
from vtcbench.engine import compress
from vtcbench.methods import get_method

# 4 image sizes -> 268, 272, 136 and 336 image tokens on the tiny LLaVA-NeXT; prompts of different lengths too
SIZES = [(80, 60), (60, 80), (56, 56), (120, 120)]
QUESTIONS = ["What is it?", "Describe the colours you can see in this picture, please.", "Why?", "Count the squares in it."]
N_LAYERS = 4
# every in-LLM method at its first legal action layer and at a later one (the tiny model has 4 layers)
CASES = {
    "fastv-first": ("fastv", {"layer": 1, "drop_ratio": 0.5}),
    "fastv": ("fastv", {"layer": 2, "drop_ratio": 0.7}),
    "pdrop-first": ("pdrop", {"layers": (1,), "keep_ratio": 0.5}),
    "pdrop": ("pdrop", {"layers": (1, 3), "keep_ratio": 0.3}),
    "vico": ("vico", {"stages": 4, "keep_ratio": 0.5}),
    "llavolta-first": ("llavolta", {"layer": 0, "stride": 4}),
    "llavolta": ("llavolta", {"layer": 2, "stride": 2}),
    "random-first": ("random", {"layer": 0, "drop_ratio": 0.5}),
    "random": ("random", {"layer": 2, "drop_ratio": 0.3}),
    "kmeans-first": ("kmeans", {"layer": 0, "clusters": 8, "iters": 3}),
    "kmeans": ("kmeans", {"layer": 2, "clusters": 16, "iters": 3}),
}


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def next_model(request):
    return build_tiny_next(request.param)


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def _generate(model, inputs: dict, method, new_tokens: int = 3):
    with torch.no_grad(), compress(model, method) as engine:
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences[:, -new_tokens:], torch.stack(out.logits, dim=1), engine.applied_image_tokens_per_sample


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixed_batch_equals_each_prompt_alone(next_model, case):
    model, processor = next_model
    name, params = CASES[case]
    method = get_method(name, **params)
    images = [_image(size, seed) for seed, size in enumerate(SIZES)]
    texts = [_prompt(q) for q in QUESTIONS]
    batch = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    n_image = (batch["input_ids"] == model.config.image_token_index).sum(dim=1).tolist()
    assert len(set(n_image)) == len(SIZES)  # really 4 different image-token counts
    tokens, logits, counts = _generate(model, batch, method)
    for row, (image, text) in enumerate(zip(images, texts)):
        alone = dict(processor(images=[image], text=[text], return_tensors="pt"))
        alone_tokens, alone_logits, alone_counts = _generate(model, alone, method)
        assert tokens[row].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(logits[row, 0], alone_logits[0, 0], atol=1e-5, rtol=1e-5)  # the prefill's last token
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-4, rtol=1e-4)  # and the decode steps
        assert counts[row] == alone_counts[0] == method.image_tokens_per_layer(n_image[row], N_LAYERS)
    if name != "kmeans":  # (k-means keeps `clusters` of every sample)
        assert len({tuple(c) for c in counts}) > 1  # the samples really keep different numbers
