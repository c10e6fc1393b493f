"""Which image tokens a method keeps, recorded for retention pictures (`vtcbench run --keep-indices`)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import left_pad, pixels, prompt_ids
from PIL import Image

from vtcbench.engine import compress
from vtcbench.methods import get_method
from vtcbench.runner import RunConfig, run


def _kept(model, method, input_ids, attention_mask, pixel_values, merged: bool = False) -> dict:
    with compress(model, method) as engine:
        engine.record_kept = True
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    return engine.merged_image_tokens if merged else engine.kept_image_tokens


@pytest.mark.parametrize(
    "name, params",
    [
        ("pdrop", {"layers": (1, 3), "keep_ratio": 0.5}), ("llavolta", {"layer": 0, "stride": 8}), ("fastv", {"layer": 1}),
        ("kmeans", {"layer": 2, "clusters": 8}),
    ],
)
def test_kept_ranks_are_the_same_alone_and_in_a_padded_batch(tiny, name, params):
    model = tiny("sdpa")
    method = get_method(name, **params)
    prompts = [prompt_ids(model, 3, 5, seed=1), prompt_ids(model, 6, 9, seed=2)]
    images = torch.cat([pixels(1), pixels(2)])
    ids, mask = left_pad(prompts, model.config.pad_token_id)
    batched = _kept(model, method, ids, mask, images)
    for row, prompt in enumerate(prompts):
        alone = _kept(model, method, prompt, torch.ones_like(prompt), images[row : row + 1])
        assert {layer: kept[row] for layer, kept in batched.items()} == {layer: kept[0] for layer, kept in alone.items()}
    counts = method.image_tokens_per_layer(64, 4)
    for layer, kept in batched.items():
        assert all(len(row) == counts[layer] and row == sorted(set(row)) for row in kept)
        assert all(0 <= i < 64 for row in kept for i in row)
    merged = _kept(model, method, ids, mask, images, merged=True)
    if name == "llavolta":  # pooled groups appear as their first token, and as the tokens they merged
        assert batched[0][0] == list(range(0, 64, 8))
        assert merged[0][0] == [list(range(k, k + 8)) for k in range(0, 64, 8)]
    if name == "kmeans":  # each cluster's members; the anchor is its first member
        groups = merged[2][1]
        assert sorted(i for g in groups for i in g) == list(range(64)) and [g[0] for g in groups] == batched[2][1]
    if name in ("pdrop", "fastv"):
        assert merged == {}
    if name == "pdrop":  # each stage keeps a subset of the previous one
        assert set(batched[3][0]) < set(batched[1][0]) < set(batched[0][0])


@pytest.mark.parametrize("method, params", [("pdrop", {}), ("llavolta", {"layer": 0})])
def test_run_records_the_first_documents_kept_tokens_and_images(tmp_path, method, params):
    """The grid is the original one also when layer 0 itself pools (its entry is then the pooled set)."""
    folder = run(RunConfig(model="vtc-tiny", method=method, params=params, tasks=["vtcshapes"], limit=3, keep_indices=2,
                           out=tmp_path, show_progress=False)).folder
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    recorded = [r for r in records if "kept_image_tokens" in r]
    assert [r["doc_id"] for r in recorded] == [0, 1]
    for record in recorded:
        kept = record["kept_image_tokens"]
        assert [len(kept[layer]) for layer in kept] == [record["image_tokens_per_layer"][int(layer)] for layer in kept]
        assert record["image_grid"] == [8, 8]
        with Image.open(folder / record["retention_image"]) as image:
            assert image.format == "PNG" and image.size == (112, 112)
