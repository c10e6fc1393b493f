"""The attention-share recorder (LLaVolta Fig. 1 right) against eager attention weights."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from conftest import left_pad, pixels, prompt_ids

from vtcbench.attention_share import (
    GROUPS,
    INSTRUCTION,
    OUTPUT,
    POSITIONS,
    AttentionShareRecorder,
    group_sums,
    summarise,
    token_groups,
    write_outputs,
)
from vtcbench.errors import VtcbenchError
from vtcbench.families import decoder_layers
from vtcbench.transformers_seam import cache_layer_keys, returned_cache

SHARPEN = 8.0  # q_proj and k_proj scaled by this: random weights otherwise attend almost uniformly


@pytest.fixture(scope="module")
def sharp(tiny):
    """sharp(attn) -> a copy of the tiny model whose attention is far from uniform, so that a
    wrong RoPE, scaling or mask shows in the shares (the same weights under every backend)."""
    models: dict[str, torch.nn.Module] = {}

    def get(attn: str):
        if attn not in models:
            model = copy.deepcopy(tiny(attn))
            with torch.no_grad():
                for layer in decoder_layers(model):
                    layer.self_attn.q_proj.weight.mul_(SHARPEN)
                    layer.self_attn.k_proj.weight.mul_(SHARPEN)
            models[attn] = model
        return models[attn]

    return get


def _batch(model) -> dict:
    """Two left-padded prompts of different lengths, each with an image."""
    prompts = [prompt_ids(model, 3, 4, seed=0), prompt_ids(model, 6, 9, seed=1)]
    ids, mask = left_pad(prompts, model.config.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat([pixels(0), pixels(1)])}


def _record(model, inputs: dict, new_tokens: int = 2, **kwargs):
    groups = token_groups(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_index)
    with AttentionShareRecorder(model, groups) as recorder:
        sequences = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **kwargs)
    return recorder, groups, sequences


@torch.no_grad()
def _eager_shares(eager, inputs: dict, groups: torch.Tensor, first_token: torch.Tensor) -> torch.Tensor:
    """[batch, 2, layers, groups] from eager's attention weights, uncached: the last row of the
    prompt, and the last row of the prompt followed by the first generated token."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extended = {
        "input_ids": torch.cat([ids, first_token[:, None]], dim=1),
        "attention_mask": torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1),
        "pixel_values": inputs["pixel_values"],
    }
    extended_groups = torch.cat([groups, torch.full_like(groups[:, :1], OUTPUT)], dim=1)
    rows = []
    for batch, key_groups in ((inputs, groups), (extended, extended_groups)):
        attentions = eager(**batch, use_cache=False, output_attentions=True).attentions
        rows.append(torch.stack([group_sums(layer[:, :, -1].mean(dim=1), key_groups) for layer in attentions], dim=1))
    return torch.stack(rows, dim=1)


def test_token_groups_split_the_prompt_at_the_first_image_token():
    image, pad = 9, 0
    ids = torch.tensor([[pad, pad, 1, 5, 6, image, image, 7, image, 8], [1, 5, 6, 5, image, image, image, 7, 7, 8]])
    mask = (ids != pad).long()
    expected = [[-1, -1, 1, 1, 1, 0, 0, 2, 0, 2], [1, 1, 1, 1, 0, 0, 0, 2, 2, 2]]
    assert token_groups(ids, mask, image).tolist() == expected
    assert token_groups(torch.tensor([[1, 5, 6]]), None, image).tolist() == [[1, 1, 1]]  # no image: all system
    assert GROUPS[INSTRUCTION] == "instruction" and GROUPS[OUTPUT] == "output"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shares_sum_to_one_and_equal_eager_attention_weights(sharp, attn):
    model = sharp(attn)
    inputs = _batch(model)
    recorder, groups, sequences = _record(model, inputs)
    shares = recorder.shares
    n_layers = len(decoder_layers(model))
    assert shares.shape == (2, 2, n_layers, len(GROUPS))
    torch.testing.assert_close(shares.sum(dim=-1), torch.ones(2, 2, n_layers), atol=1e-5, rtol=0)
    assert bool((shares[:, 0, :, OUTPUT] == 0).all())
    first_token = sequences[:, inputs["input_ids"].shape[1]]
    expected = _eager_shares(sharp("eager"), inputs, groups, first_token)
    torch.testing.assert_close(shares, expected, atol=1e-5, rtol=0)
    # the comparison means something: attention is far from spread evenly over the tokens
    even = recorder.counts[:, :3] / recorder.counts[:, :3].sum(dim=1, keepdim=True)
    assert float((shares[:, 0, :, :3] - even[:, None]).abs().max()) > 0.05
    # the two prompts' groups: 64 image tokens, BOS + 3 / 6 text tokens, 4 / 9 after the image
    assert recorder.counts.tolist() == [[64, 4, 4, 1], [64, 7, 9, 1]]
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(model))


def test_uncached_generation_records_the_same_rows(sharp):
    model = sharp("sdpa")
    inputs = _batch(model)
    cached, _, _ = _record(model, inputs)
    uncached, _, _ = _record(model, inputs, use_cache=False)
    torch.testing.assert_close(uncached.shares, cached.shares, atol=1e-5, rtol=0)


def test_first_generated_row_is_nan_when_generation_stops_after_one_token(sharp):
    model = sharp("sdpa")
    recorder, _, _ = _record(model, _batch(model), new_tokens=1)
    assert not bool(recorder.shares[:, 0].isnan().any())
    assert bool(recorder.shares[:, 1].isnan().all())


def test_groups_of_another_prompt_are_refused(sharp):
    model = sharp("sdpa")
    inputs = _batch(model)
    groups = token_groups(inputs["input_ids"][:, 3:], inputs["attention_mask"][:, 3:], model.config.image_token_index)
    with pytest.raises(VtcbenchError, match="prompt"), AttentionShareRecorder(model, groups):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(model))
    right_padded = torch.tensor([[1, 1, 2, -1]])
    with pytest.raises(VtcbenchError, match="left-pad"):
        AttentionShareRecorder(model, right_padded)


def test_summary_csv_and_png_are_written(sharp, tmp_path):
    model = sharp("sdpa")
    recorder, _, _ = _record(model, _batch(model))
    rows = summarise(recorder.shares, recorder.counts)
    n_layers = len(decoder_layers(model))
    csv_path, png_path = write_outputs(rows, tmp_path / "figure")
    with csv_path.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == n_layers * 2 * len(GROUPS)
    assert set(table[0]) == {"layer", "position", "group", "share", "share_per_token"}
    shares, counts = recorder.shares.double(), recorder.counts.double()
    for row in table:
        layer, p, g = int(row["layer"]), POSITIONS.index(row["position"]), GROUPS.index(row["group"])
        assert float(row["share"]) == pytest.approx(float(shares[:, p, layer, g].mean()), abs=1e-6)
        assert float(row["share_per_token"]) == pytest.approx(float((shares[:, p, layer, g] / counts[:, g]).mean()), abs=1e-6)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in csv_path.parent.iterdir()) == ["attention_share.csv", "attention_share.png"]


def test_cache_layer_keys_reads_a_layers_rotated_prompt_keys(sharp):
    from transformers.cache_utils import DynamicCache

    model = sharp("sdpa")
    inputs = _batch(model)
    with torch.no_grad():
        cache = returned_cache(model(**inputs, use_cache=True))
    config = model.config.text_config
    keys = cache_layer_keys(cache, 1)
    head_dim = config.hidden_size // config.num_attention_heads
    assert keys.shape == (2, config.num_key_value_heads, inputs["input_ids"].shape[1], head_dim)
    assert keys is cache.layers[1].keys or torch.equal(keys, cache.layers[1].keys)
    assert cache_layer_keys(cache, len(cache.layers)) is None
    assert cache_layer_keys(DynamicCache(), 0) is None
