"""Batches whose prompts carry different numbers of image tokens (LLaVA-NeXT's AnyRes): every
in-LLM method computes, per sample, exactly what it computes for that sample alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_next, left_pad, pixels, prompt_ids
from PIL import Image

from vtcbench.engine import compress
from vtcbench.errors import VtcbenchError
from vtcbench.methods import get_method

# 4 image sizes -> 268, 272, 136 and 336 image tokens on the tiny LLaVA-NeXT; prompts of different lengths too
SIZES = [(80, 60), (60, 80), (56, 56), (120, 120)]
QUESTIONS = ["What is it?", "Describe the colours you can see in this picture, please.", "Why?", "Count the squares in it."]
N_LAYERS = 4
# every in-LLM method at its first legal action layer and at a later one (the tiny model has 4
# layers), and keep-all boundaries at the last layer
CASES = {
    "fastv-last-keep-all": ("fastv", {"layer": 3, "drop_ratio": 0.0}),
    "pdrop-keep-all": ("pdrop", {"layers": (1, 3), "keep_ratio": 1.0}),
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
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(values)


def _prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def _generate(model, inputs: dict, method, new_tokens: int = 3):
    """Exactly `new_tokens` greedy tokens (EOS suppressed until then, so rows never stop early),
    every step's raw logits and the engine's per-sample counts."""
    with torch.no_grad(), compress(model, method) as engine:
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
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


@pytest.mark.parametrize(("name", "params"), [("fastv", {"layer": 1, "drop_ratio": 0.5}), ("vispruner", {"tokens": 16, "important_ratio": 0.5})])
def test_run_batches_llava_next_images_of_different_sizes_together(tiny_next, tmp_path, name, params):
    """`vtcbench run`'s grouping: NeXT requests with images of 4 sizes go in one batch, and each
    answer and per-layer count is the one the request gets alone (an in-LLM method, and a
    selection per crop whose count is its 16 per crop)."""
    from lmms_eval.api.instance import Instance

    from vtcbench.lmms_model import VtcbenchLMM
    from vtcbench.results import RunFolder

    docs = [{"image": _image(size, seed), "question": q} for seed, (size, q) in enumerate(zip(SIZES, QUESTIONS))]
    requests = [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], {"max_new_tokens": 3, "until": ["\n\n"]}, lambda d: [d["image"]], doc_id, "toy", "test"),
            idx=0,
            metadata={"task": "toy", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
    ]
    runs = {}
    for batch_size in (1, 4):
        folder = RunFolder.open(tmp_path / str(batch_size), {"model": "tiny-next", "method": name, "batch": batch_size}, {"git_revision": "x"})
        lmm = VtcbenchLMM(*tiny_next, get_method(name, **params), folder, batch_size=batch_size, show_progress=False)
        lmm.task_dict = {"toy": {"test": docs}}
        runs[batch_size] = (lmm.generate_until(requests), sorted(lmm.run.finished.values(), key=lambda r: r["doc_id"]))
    (alone, alone_records), (batched, records) = runs[1], runs[4]
    assert batched == alone
    assert [r["batch_size"] for r in records] == [4] * len(SIZES)
    assert len({r["image_tokens"] for r in records}) == len(SIZES)
    for record, single in zip(records, alone_records):
        assert record["image_tokens_per_layer"] == single["image_tokens_per_layer"]
        if name == "fastv":
            assert record["image_tokens_per_layer"] == get_method(name, **params).image_tokens_per_layer(record["image_tokens"], N_LAYERS)
        else:  # 16 per crop, 3 or 5 crops
            assert record["image_tokens_per_layer"][0] in (48, 80) and len(set(record["image_tokens_per_layer"])) == 1
    if name == "vispruner":  # the run costs the counts its engine applied (each image its own crops), not 16 x 5
        from vtcbench.families import model_facts
        from vtcbench.profilers.flops import analytic_flops
        from vtcbench.runner import summarize

        (entry,) = summarize({"results": {}}, lmm.run, lmm.method, tiny_next[0], ["toy"])["tasks"].values()
        applied = [sum(r["image_tokens_per_layer"][i] for r in records) / len(records) for i in range(N_LAYERS)]
        assert entry["mean_image_tokens_per_layer"] == pytest.approx(applied) and applied[0] < 80
        expected = analytic_flops(lmm.method, model_facts(tiny_next[0]), model="x", image_tokens_per_layer=applied)
        assert entry["tflops_image"] == pytest.approx(expected.tflops_image)


@pytest.mark.parametrize("case", ["fastv-first", "pdrop", "llavolta", "random-first"])
def test_unpadded_batch_with_different_counts(tiny_next, case):
    """Prompts of equal length whose image-token counts differ: nothing is padded, so sdpa gets no
    mask from the model, and the engine must build one to hide the filler slots after an action."""
    model, processor = tiny_next
    images = [_image(SIZES[0], 0), _image(SIZES[1], 1)]  # 268 and 272 image tokens
    length = lambda image, text: processor(images=[image], text=[text], return_tensors="pt")["input_ids"].shape[1]  # noqa: E731
    texts = [_prompt("Is it " + "red, " * k + "or blue?") for k in range(8)]
    target = length(images[1], texts[0])
    texts = [next(t for t in texts if length(images[0], t) == target), texts[0]]
    batch = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    assert bool(batch["attention_mask"].all())
    name, params = CASES[case]
    method = get_method(name, **params)
    tokens, logits, counts = _generate(model, batch, method)
    for row, (image, text) in enumerate(zip(images, texts)):
        alone_tokens, alone_logits, alone_counts = _generate(model, dict(processor(images=[image], text=[text], return_tensors="pt")), method)
        assert tokens[row].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-5, rtol=1e-5)
        assert counts[row] == alone_counts[0]
    assert counts[0] != counts[1]


def test_a_batch_mixing_prompts_with_and_without_images_is_refused(tiny):
    """A text-only prompt has no N0 for the method to plan on; vanilla runs such a batch."""
    model = tiny("sdpa")
    with_image = prompt_ids(model, 2, 3, seed=0)
    text_only = with_image[:, with_image[0] != model.config.image_token_index]
    ids, mask = left_pad([with_image, text_only], model.config.pad_token_id or 0)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(0)}
    with torch.no_grad():
        with compress(model, get_method("vanilla")) as engine:
            model(**inputs)
        assert engine.applied_image_tokens_per_sample == [[64] * N_LAYERS, [0] * N_LAYERS]
        with compress(model, get_method("fastv")), pytest.raises(VtcbenchError, match=r"fastv needs image tokens in every prompt.*\[64, 0\]"):
            model(**inputs)
