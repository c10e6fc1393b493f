"""VisionZip, VisPruner, DivPrune, DART, SparseVLM+, PruMerge+ and CDPruner against oracles written from their official algorithms, at their
defaults and at their boundary settings, on the tiny LLaVA (and DART on the tiny Qwen2.5-VL).

The oracles share nothing with `vtcbench/methods/`: VisionZip's reads transformers' eager
attention weights and hidden states and follows `dvlab-research/VisionZip`
`visionzip/clip_encoder.py` line by line, VisPruner's `Theia-4869/VisPruner` `llava_arch.py`;
DivPrune's reruns the greedy max-min from scratch at
every step (the behaviour of `vbdi/divprune` `llava_arch.py`, written from the paper); DART's
reads the keys from the KV cache a plain forward returns and follows `ZichenWen1/DART`
`modeling_llama_self.py` (`get_retained_image_token`) line by line, Python sets included.
"""

from __future__ import annotations

import pytest
import torch
from conftest import pixels, prompt_ids
from oracles import OraclePlan, mrope_oracle_greedy, oracle_greedy, prompt_embeddings
from PIL import Image

from vtcbench.engine import compress
from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of
from vtcbench.methods import get_method
from vtcbench.models import load_model
from vtcbench.transformers_seam import returned_cache

N_BEFORE, N_AFTER = 5, 7  # text around the 64 image tokens of the tiny LLaVA


def _inputs(model, seed: int = 0) -> dict:
    ids = prompt_ids(model, N_BEFORE, N_AFTER, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels(seed)}


def _shortened(model, inputs: dict, n_image: int) -> dict:
    """The prompt with `n_image` image placeholders, as a pre-LLM method's prompt is."""
    ids = inputs["input_ids"]
    is_image = ids[0] == model.config.image_token_index
    first, count = int(is_image.nonzero()[0]), int(is_image.sum())
    ids = torch.cat([ids[:, :first], ids[:, first : first + n_image], ids[:, first + count :]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _engine_logits(model, method, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the prompt under the engine, what the projector handed the LLM)."""
    seen = {}
    projector = family_of(model).projector(model)
    with torch.no_grad(), compress(model, method) as engine:
        handle = projector.register_forward_hook(lambda module, args, output: seen.update(tokens=output))
        try:
            logits = model(**engine.prepare(inputs)).logits
        finally:
            handle.remove()
    return logits, seen["tokens"]


def _logits_with_image_tokens(model, inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """A plain forward of the shortened prompt with `tokens` [1, k, d] as its image tokens."""
    ids = inputs["input_ids"]
    is_image = ids == model.config.image_token_index
    embeds = model.get_input_embeddings()(ids).masked_scatter(is_image[..., None], tokens.to(torch.float32))
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits


# -- VisionZip -------------------------------------------------------------------------------------


def visionzip_oracle(model, pixel_values: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """`CLIPVisionTower_VisionZip.forward` (visionzip/clip_encoder.py), with `dominant_num =
    dominant - 1` as `visionzip()` sets it and the key metric of `utils.py` (k_proj of layer -2,
    mean over heads), on transformers' eager attention weights and hidden states: (the selected
    tokens [crops, T, C], `all_indices` [crops, dominant] CLS's and the dominant tokens' indices)."""
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        attn_weights = out.attentions[-2]
        hidden_states = out.hidden_states[-2]
        layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
        bsz, length, _ = keys.shape
        metric = keys.view(bsz, length, layer.self_attn.num_heads, -1).transpose(1, 2).mean(1)
        dominant_num, contextual_num = dominant - 1, contextual
        cls_idx = 0
        cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1 :]
        cls_attention_sum = cls_attention.sum(dim=1)
        topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
        all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
        mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
        if contextual_num == 0:  # the official code divides by it; vtcbench merges nothing
            return dominant_tokens, all_indices
        metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
        hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
            hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
        metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
        step = max(1, metric_normalized.shape[1] // contextual_num)
        target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
        target_tokens = metric_normalized[:, target_indices, :]
        tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices), :]
        similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
        assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype)
        assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
        counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
        hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1]), target_indices), :]
        aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
        target_hidden = hidden_states_filtered[:, target_indices, :]
        contextual_tokens = target_hidden + aggregated_hidden
        return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices


VISIONZIP_CASES = {  # 64 patches + CLS on the tiny LLaVA
    "scaled default": {"dominant": 12, "contextual": 4},
    "official 54+10": {"dominant": 54, "contextual": 10},
    "CLS only": {"dominant": 1, "contextual": 0},
    "most dominant": {"dominant": 64, "contextual": 0},
    "most contextual": {"dominant": 1, "contextual": 63},
    "one contextual": {"dominant": 3, "contextual": 1},
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(VISIONZIP_CASES))
def test_visionzip_equals_the_official_selection(tiny, case, attn):
    params = VISIONZIP_CASES[case]
    model = tiny(attn)
    method = get_method("visionzip", **params)
    inputs = _inputs(model, seed=1)
    logits, tokens = _engine_logits(model, method, inputs)
    with torch.no_grad():
        expected = model.model.multi_modal_projector(visionzip_oracle(tiny("eager"), inputs["pixel_values"], **params)[0])
    torch.testing.assert_close(tokens, expected, atol=1e-6, rtol=1e-6)
    short = _shortened(model, inputs, method.pre_llm_tokens(64))
    torch.testing.assert_close(logits, _logits_with_image_tokens(model, short, expected), atol=1e-5, rtol=1e-5)


# -- VisPruner ------------------------------------------------------------------------------------


def vispruner_oracle(model, pixel_values: torch.Tensor, visual_token_num: int, important_ratio: float) -> torch.Tensor:
    """`encode_images` of Theia-4869/VisPruner (llava/model/llava_arch.py) and its `feature_select`
    (clip_encoder.py), on transformers' eager attention weights: (the patch features [crops, N, C],
    `index_masks` [crops, N] of the kept ones)."""
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    image_features = out.hidden_states[-2][:, 1:]
    image_attentions = out.attentions[-2][:, :, 0, 1:]
    B, N, C = image_features.shape  # noqa: N806
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    image_attentions = image_attentions.mean(dim=1)
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]  # noqa: N806
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2]
        ], dim=-1)
    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected_indices = important_indices
    index_masks = torch.zeros(B, N, dtype=torch.bool)
    index_masks.scatter_(1, selected_indices, True)
    return image_features, index_masks


VISPRUNER_CASES = {  # (tokens, important_ratio) on the tiny LLaVA's 64 patches
    "scaled default": (16, 0.5),
    "three quarters important": (32, 0.75),
    "few diverse": (24, 0.5),
    "all diverse": (8, 0.0),
    "important only": (16, 1.0),
    "one token": (1, 1.0),
    "every token": (64, 1.0),
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(VISPRUNER_CASES))
def test_vispruner_equals_the_official_selection(tiny, case, attn):
    tokens, ratio = VISPRUNER_CASES[case]
    model = tiny(attn)
    method = get_method("vispruner", tokens=tokens, important_ratio=ratio)
    inputs = _inputs(model, seed=4)
    logits, projected = _engine_logits(model, method, inputs)
    with torch.no_grad():
        features, masks = vispruner_oracle(tiny("eager"), inputs["pixel_values"], tokens, ratio)
        expected = model.model.multi_modal_projector(features[masks][None])
    torch.testing.assert_close(projected, expected, atol=1e-6, rtol=1e-6)
    short = _shortened(model, inputs, tokens)
    torch.testing.assert_close(logits, _logits_with_image_tokens(model, short, expected), atol=1e-5, rtol=1e-5)


# -- the per-crop selections on LLaVA-NeXT (VisionZip, VisPruner, CDPruner) ---------------------------


def official_anyres_layout(image_feature, index_mask, rows: int, cols: int, side: int) -> torch.Tensor:
    """`prepare_inputs_labels_for_multimodal` of Theia-4869/VisPruner and CDPruner (llava_arch.py)
    for one image, `mm_patch_merge_type` 'spatial_unpad' with its `_unpad` stripped as they strip
    it: the base crop's kept tokens, then the tiles' on the whole tile grid, no unpadding, no newline."""
    base_image_feature, base_index_mask = image_feature[0], index_mask[0]
    image_feature, index_mask = image_feature[1:], index_mask[1:]
    image_feature = image_feature.view(rows, cols, side, side, -1)
    index_mask = index_mask.view(rows, cols, side, side)
    image_feature = image_feature.permute(0, 2, 1, 3, 4).contiguous()
    image_feature = image_feature.flatten(0, 3)
    index_mask = index_mask.permute(0, 2, 1, 3).contiguous()
    index_mask = index_mask.flatten(0, 3)
    image_feature = image_feature[index_mask]
    base_image_feature = base_image_feature[base_index_mask]
    return torch.cat((base_image_feature, image_feature), dim=0)


def official_restore_image_features_sorted(image_feature, cur_keep_idx, width: int, height: int, side: int):
    """`restore_image_features_sorted` of dvlab-research/VisionZip (llava_arch.py) line by line,
    its 576 and 24 as the crop's patches and side: the tiles' kept patches on the whole tile
    grid, then every tile's CLS, then every tile's contextual tokens."""
    num_img, total_patches, feature_dim = image_feature.shape
    num_keep = cur_keep_idx.shape[1]
    num_extra = total_patches - num_keep
    cur_keep_idx_sorted, _ = cur_keep_idx.sort(dim=1)
    cur_keep_idx_sorted_restore = cur_keep_idx_sorted[:, 1:] - 1
    restored_features = torch.zeros((num_img, side * side, feature_dim), dtype=image_feature.dtype)
    mask = torch.zeros(num_img, side * side, dtype=torch.bool)
    mask.scatter_(1, cur_keep_idx_sorted_restore, True)
    kept_features = image_feature[:, 1:num_keep, :]
    restored_features[mask] = kept_features.reshape(-1, feature_dim)
    assert width * height == restored_features.shape[0], "width * height must equal num_img"
    restored_features = restored_features.view(height, width, side, side, feature_dim)
    restored_features = restored_features.permute(0, 2, 1, 3, 4).contiguous()
    restored_features = restored_features.view(height, side, width * side, feature_dim)
    restored_features = restored_features.view(height * side, width * side, feature_dim)
    grid_with_newline = restored_features
    mask = mask.view(height, width, side, side)
    mask = mask.permute(0, 2, 1, 3).contiguous()
    mask = mask.view(height * side, width * side)
    image_feature_select = grid_with_newline[mask]
    raw_img_feature_merge = image_feature[:, -num_extra:,].reshape(-1, feature_dim)
    cls_img_feature_merge = image_feature[:, 0,]
    return torch.cat([image_feature_select, cls_img_feature_merge, raw_img_feature_merge])


def _next_prompt(processor, seed: int, size=(80, 60), text: str = "What color is it?") -> dict:
    image = Image.fromarray((torch.rand(size[1], size[0], 3, generator=torch.Generator().manual_seed(seed)) * 255).byte().numpy())
    return dict(processor(images=[image], text=[f"USER: <image>\n{text} ASSISTANT:"], return_tensors="pt"))


def _next_crops(model, inputs: dict) -> tuple[torch.Tensor, int, int, int]:
    """(the image's crops' pixels, tile rows, tile columns, patches per crop side), as the model cuts them."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    size, pinpoints = model.config.vision_config.image_size, model.config.image_grid_pinpoints
    image_size = inputs["image_sizes"][0]
    crops = image_size_to_num_patches(image_size, pinpoints, size)
    rows, cols = get_anyres_image_grid_shape(image_size, pinpoints, size)
    return inputs["pixel_values"][0, :crops], rows, cols, size // model.config.vision_config.patch_size


def _logits_with_image_run(model, inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """A plain forward of the prompt with its one image's run of placeholders shortened to
    `tokens` [k, d] and filled with them (the official prompt), consecutive positions."""
    ids = inputs["input_ids"][0]
    is_image = ids == model.config.image_token_index
    keep = ~is_image | (is_image.cumsum(0) <= len(tokens))
    embeds = model.get_input_embeddings()(ids[keep][None])
    embeds = embeds.masked_scatter(is_image[keep][None, :, None], tokens.to(embeds.dtype))
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long)).logits


def _next_engine(model, method, inputs: dict, question: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad(), compress(model, method) as engine:
        engine.questions = None if question is None else [question]
        logits = model(**engine.prepare(inputs)).logits
    return logits, engine.crop_tokens


@pytest.mark.parametrize("case", ["scaled default", "few diverse", "all diverse", "one token"])
def test_vispruner_on_llava_next_lays_out_each_crops_selection_as_the_official_code(case):
    from conftest import build_tiny_next

    tokens, ratio = VISPRUNER_CASES[case]
    model, processor = build_tiny_next("eager")
    inputs = _next_prompt(processor, seed=3)
    logits, (kept,) = _next_engine(model, get_method("vispruner", tokens=tokens, important_ratio=ratio), inputs)
    pixel_values, rows, cols, side = _next_crops(model, inputs)
    features, masks = vispruner_oracle(model, pixel_values, tokens, ratio)
    with torch.no_grad():
        expected = official_anyres_layout(model.model.multi_modal_projector(features), masks, rows, cols, side)
    assert rows * cols > 1 and len(expected) == tokens * (1 + rows * cols)
    torch.testing.assert_close(kept, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits, _logits_with_image_run(model, inputs, expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dominant", "contextual"), [(12, 4), (3, 1), (2, 30)])  # (contextual=0 divides by zero there)
def test_visionzip_on_llava_next_restores_each_crops_selection_as_the_official_code(dominant, contextual):
    from conftest import build_tiny_next

    params = {"dominant": dominant, "contextual": contextual}
    model, processor = build_tiny_next("eager")
    inputs = _next_prompt(processor, seed=5, size=(60, 90))
    logits, (kept,) = _next_engine(model, get_method("visionzip", **params), inputs)
    pixel_values, rows, cols, side = _next_crops(model, inputs)
    selected, keep_idx = visionzip_oracle(model, pixel_values, **params)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(selected)
    # `prepare_inputs_labels_for_multimodal_visionzip`: its `get_anyres_image_grid_shape` answers (width, height)
    expected = torch.cat([projected[0], official_restore_image_features_sorted(projected[1:], keep_idx[1:], cols, rows, side)])
    assert len(expected) == (params["dominant"] + params["contextual"]) * (1 + rows * cols)
    torch.testing.assert_close(kept, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits, _logits_with_image_run(model, inputs, expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 12])
def test_cdpruner_on_llava_next_normalises_over_the_crops_and_lays_them_out_as_the_official_code(tokens):
    from conftest import TINY_CLIP, build_tiny_next

    model, processor = build_tiny_next("eager")
    text = "how many circles are there ?"
    inputs = _next_prompt(processor, seed=9, text=text)
    logits, (kept,) = _next_engine(model, get_method("cdpruner", tokens=tokens, clip=TINY_CLIP), inputs, question=text)
    pixel_values, rows, cols, side = _next_crops(model, inputs)
    projected, masks = cdpruner_oracle(model, TINY_CLIP, pixel_values, text, tokens)
    expected = official_anyres_layout(projected, masks, rows, cols, side)
    torch.testing.assert_close(kept, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits, _logits_with_image_run(model, inputs, expected), atol=1e-5, rtol=1e-5)


def test_per_crop_selections_on_llava_next_batch_mixed_sizes_as_alone_and_refuse_too_many_tokens(tiny_next):
    """Images of different crop grids in one left-padded batch: each row as its prompt alone,
    counts `tokens` x crops; more tokens than the unpadded prompt holds is refused in one line."""
    model, processor = tiny_next
    method = get_method("vispruner", tokens=16, important_ratio=0.5)
    sizes = [(80, 60), (40, 100), (100, 40)]
    images = [Image.fromarray((torch.rand(h, w, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy())
              for i, (w, h) in enumerate(sizes)]
    texts = ["USER: <image>\nWhat color is it? ASSISTANT:", "USER: <image>\nHow many? ASSISTANT:", "USER: <image>\nWhy? ASSISTANT:"]
    processor.tokenizer.padding_side = "left"
    batch = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    with torch.no_grad(), compress(model, method) as engine:
        out = model.generate(**engine.prepare(batch), max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        counts = engine.applied_image_tokens_per_sample
    crops = [1 + r * c for r, c in family_of(model).crop_grids(model.config, batch["image_sizes"])]
    assert [c[0] for c in counts] == [16 * n for n in crops] and len(set(crops)) > 1
    for row, (image, text) in enumerate(zip(images, texts)):
        alone = dict(processor(images=[image], text=[text], return_tensors="pt"))
        with torch.no_grad(), compress(model, method) as engine:
            single = model.generate(**engine.prepare(alone), max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        assert out.sequences[row, -3:].tolist() == single.sequences[0, -3:].tolist()
        torch.testing.assert_close(out.logits[0][row], single.logits[0][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(VtcbenchError, match="^the per-crop selection keeps 320 tokens of images whose prompt holds [^\n]+$"):
        with torch.no_grad(), compress(model, get_method("vispruner", tokens=64, important_ratio=1.0)) as engine:
            model(**engine.prepare(_next_prompt(processor, seed=1)))


# -- DivPrune --------------------------------------------------------------------------------------


def divprune_oracle(features: torch.Tensor, k: int) -> list[int]:
    """The greedy max-min subset of one image's tokens [n, d] (cosine distance), every step from
    scratch: first the token whose nearest other is farthest, then the unchosen token farthest
    from its nearest chosen one; returned in token order."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    chosen: list[int] = []
    for step in range(k):
        if step == 0:
            scores = distance.topk(2, dim=0, largest=False).values[1]
        else:
            scores = distance[chosen].min(dim=0).values
            scores[chosen] = float("-inf")  # (the official code would take a chosen token again among equal ones)
        chosen.append(int(scores.argmax()))
    return sorted(chosen)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("ratio", [0.098, 0.25, 1 / 64, 1.0])
def test_divprune_equals_the_greedy_max_min_subset(tiny, ratio, attn):
    """On LLaVA-1.5 the official path: the projected tokens the greedy max-min keeps, spliced into
    a prompt shortened to them (the engine keeps them at the language model's input instead)."""
    model = tiny(attn)
    method = get_method("divprune", ratio=ratio)
    k = method.kept(64)
    inputs = _inputs(model, seed=2)
    with torch.no_grad(), compress(model, method) as engine:
        engine.record_kept = True
        logits = model(**engine.prepare(inputs)).logits
    with torch.no_grad():
        features = model.model.multi_modal_projector(prompt_embeddings_features(model, inputs["pixel_values"]))[0]
    kept = divprune_oracle(features, k)
    assert engine.kept_image_tokens[0] == [kept]
    short = _shortened(model, inputs, k)
    expected = _logits_with_image_tokens(model, short, features[kept][None])
    torch.testing.assert_close(logits[:, -short["input_ids"].shape[1] :], expected, atol=1e-5, rtol=1e-5)


def _divprune_expected(model, inputs: dict, image_token: int, k: int, images: int = 1):
    """(kept ranks, logits of the prompt shortened to them): each image's greedy max-min subset
    of the image tokens the model itself hands its language model (LLaVA-NeXT: the base crop,
    then the unpadded tiles with a newline per row), compact positions."""
    from oracles import language_model_inputs

    embeds = language_model_inputs(model, inputs)["inputs_embeds"]
    is_image = (inputs["input_ids"] == image_token)[0]
    features = embeds[0, is_image]
    n = len(features) // images
    kept = [start + i for start in range(0, len(features), n) for i in divprune_oracle(features[start : start + n], k)]
    drop = is_image.nonzero().flatten()[[i for i in range(len(features)) if i not in kept]]
    keep = ~torch.isin(torch.arange(embeds.shape[1]), drop)
    with torch.no_grad():
        return kept, model(inputs_embeds=embeds[:, keep], attention_mask=torch.ones(1, int(keep.sum()))).logits


@pytest.mark.parametrize("ratio", [0.05, 0.3, 1.0])
def test_divprune_on_llava_next_selects_over_each_images_packed_sequence(tiny_next, ratio):
    """The official LLaVA-NeXT path: the greedy max-min over an image's whole packed sequence
    (newline tokens included), the prompt shortened to the kept tokens."""
    from PIL import Image

    model, processor = tiny_next
    image = Image.fromarray((torch.rand(60, 80, 3, generator=torch.Generator().manual_seed(7)) * 255).byte().numpy())
    inputs = dict(processor(images=[image], text=["USER: <image>\nWhat color is it? ASSISTANT:"], return_tensors="pt"))
    image_token = model.config.image_token_index
    n = int((inputs["input_ids"] == image_token).sum())
    method = get_method("divprune", ratio=ratio)
    kept, expected = _divprune_expected(model, inputs, image_token, method.kept(n))
    with torch.no_grad(), compress(model, method) as engine:
        engine.record_kept = True
        logits = model(**inputs).logits
    assert n > 64 and engine.kept_image_tokens[0] == [kept]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_divprune_on_llava_next_selects_each_image_of_a_prompt_alone(tiny_next):
    """Two images in one prompt: each keeps its own subset; placeholders that touch (the two
    images' tokens cannot be told apart) are refused in one line."""
    from PIL import Image

    model, processor = tiny_next
    images = [Image.new("RGB", (80, 60), (200, 30, 60)), Image.new("RGB", (80, 60), (20, 130, 60))]
    images[1].paste((250, 250, 250), (10, 10, 40, 30))
    inputs = dict(processor(images=images, text=["USER: <image> then <image> What differs? ASSISTANT:"], return_tensors="pt"))
    image_token = model.config.image_token_index
    n = int((inputs["input_ids"] == image_token).sum()) // 2
    method = get_method("divprune", ratio=0.25)
    kept, expected = _divprune_expected(model, inputs, image_token, method.kept(n), images=2)
    with torch.no_grad(), compress(model, method) as engine:
        engine.record_kept = True
        logits = model(**inputs).logits
    assert engine.kept_image_tokens[0] == [kept] and len(kept) == 2 * method.kept(n)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    touching = dict(processor(images=images, text=["USER: <image><image> What differs? ASSISTANT:"], return_tensors="pt"))
    for run in (lambda: model(**touching), lambda: model.generate(**touching, max_new_tokens=1)):  # (generate may encode first)
        with pytest.raises(VtcbenchError, match="^divprune selects per image, and two images' placeholders touch [^\n]+$"):
            with torch.no_grad(), compress(model, method):
                run()


def test_divprune_on_qwen2_5_vl_keeps_the_subset_with_its_3d_positions():
    """No official Qwen port: the greedy max-min over the image's merged tokens at the language
    model's input, the kept tokens keeping their 3-D ids (greedy decode, run by hand)."""
    model, inputs, image_token = _tiny_qwen_prompt(seed=6)
    n = int((inputs["input_ids"] == image_token).sum())
    method = get_method("divprune", ratio=0.4)
    kept, _ = _divprune_expected(model, inputs, image_token, method.kept(n))
    plan = OraclePlan("pdrop", {0: len(kept)}, "compact", fixed={0: torch.tensor(kept)})
    tokens, logits = mrope_oracle_greedy(model, inputs, image_token, plan, new_tokens=3)
    with torch.no_grad(), compress(model, method) as engine:
        engine.record_kept = True
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert engine.kept_image_tokens[0] == [kept] and out.sequences[0, -3:].tolist() == tokens
    torch.testing.assert_close(torch.stack(out.logits, dim=1)[0], torch.stack(logits), atol=1e-4, rtol=1e-4)


def prompt_embeddings_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projector's input for one image: CLIP layer -2 without CLS (LLaVA's default)."""
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def test_divprune_counts_follow_the_official_rounding():
    """int(round(ratio * N)): 56 of LLaVA-1.5's 576 at the official 0.098 (Python rounds half to even)."""
    method = get_method("divprune")
    assert method.kept(576) == 56
    assert method.image_tokens_per_layer(576, 32) == [56] * 32
    assert get_method("divprune", ratio=0.5 / 64 * 3).kept(64) == 2  # 1.5 -> 2
    assert get_method("divprune", ratio=0.5 / 64 * 5).kept(64) == 2  # 2.5 -> 2


# -- DART ------------------------------------------------------------------------------------------


def dart_official(last_layer_state, any_states, image_token_start_index, image_token_length, pivot_image_token,
                  pivot_text_token, max_num_trunction) -> torch.Tensor:
    """`DART.get_retained_image_token` (modeling_llama_self.py), batch of one, as written there."""
    import math

    TOKEN_TOPK = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))  # noqa: N806
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    k_states_image_token = any_states[0][image_token_start_index:image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length:, :]
    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)  # noqa: N806
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)  # noqa: N806
    image_indices = (k_states_image_token_L1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (k_states_query_token_L1_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(TOKEN_TOPK).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return torch.tensor(sorted(indices_set)) - image_token_start_index


def dart_kept(model, inputs: dict, image_token_id: int, layer: int, pivots: tuple[int, int], truncation: int) -> torch.Tensor:
    """DART's kept image tokens (ranks) from a plain forward: the keys layer K-1 caches (after
    RoPE, repeated for grouped-query heads as the official code's `repeat_kv` leaves them) and
    layer K's input through the final norm."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True, output_hidden_states=True)
    keys = returned_cache(out).layers[layer - 1].keys
    n_heads = model.config.get_text_config().num_attention_heads
    keys = keys.repeat_interleave(n_heads // keys.shape[1], dim=1)
    norm = family_of(model).language_model(model).norm
    is_image = (inputs["input_ids"][0] == image_token_id).nonzero().flatten()
    start, length = int(is_image[0]), len(is_image)
    with torch.no_grad():
        return dart_official(norm(out.hidden_states[layer]), keys, start, length, *pivots, truncation)


DART_CASES = {  # (layer, pivot image, pivot text, truncation) on the 4-layer tiny LLaVA, 64 image tokens
    "scaled default": (2, 2, 1, 24),
    "official pivots": (2, 4, 4, 56),
    "first layer": (1, 4, 4, 24),
    "last layer": (3, 4, 4, 24),
    "pivots only": (2, 4, 4, 0),
    "one pivot each": (2, 1, 1, 62),
}


@pytest.mark.parametrize("case", sorted(DART_CASES))
def test_dart_equals_the_official_selection_and_an_oracle_of_the_kept_tokens(tiny, case):
    layer, pivot_image, pivot_text, truncation = DART_CASES[case]
    model = tiny("eager")
    inputs = _inputs(model, seed=3)
    image_token = model.config.image_token_index
    kept = dart_kept(model, inputs, image_token, layer, (pivot_image, pivot_text), truncation)
    method = get_method("dart", layer=layer, pivot_image_tokens=pivot_image, pivot_text_tokens=pivot_text, truncation=truncation)
    assert len(kept) == method.action_count(layer, 64, 64, 4)
    with torch.no_grad(), compress(model, method) as engine:
        engine.record_kept = True
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert engine.kept_image_tokens[layer] == [kept.tolist()]
    plan = OraclePlan("dart", {layer: len(kept)}, "keep", fixed={layer: kept})
    tokens, logits = oracle_greedy(model, inputs["input_ids"], inputs["pixel_values"], plan, 4)
    assert out.sequences[0, -4:].tolist() == tokens
    torch.testing.assert_close(torch.stack(out.logits, dim=1)[0], torch.stack(logits), atol=1e-4, rtol=1e-4)


def test_dart_visits_pivots_in_python_set_order():
    """The official loop's order is CPython's set order, not the score or index order; with it a
    contested token goes to the pivot visited first (here 640 before 37, as the docstring says)."""
    assert list(set([400, 37, 250, 600] + [640, 612, 615, 700])) == [640, 612, 37, 615, 400, 600, 250, 700]


def _tiny_qwen_prompt(seed: int) -> tuple:
    """(the eager tiny Qwen2.5-VL, one prompt's inputs with a 112x84 random image, its image token id)."""
    model, processor = load_model("tiny-qwen2.5-vl", random_weights=True, attn_implementation="eager")
    family = family_of(model)
    image = Image.fromarray((torch.rand(112, 84, 3, generator=torch.Generator().manual_seed(seed)) * 255).byte().numpy())
    text = family.prompt("how many are there in the picture , please ?", 1, system=family.system_prompt(model.config))
    return model, dict(processor(images=[image], text=[text], return_tensors="pt")), family.image_token_id(model.config)


@pytest.mark.parametrize("layer", [1, 2])
def test_dart_on_qwen2_5_vl_equals_the_official_selection_on_m_rope(layer):
    """On M-RoPE the keys are those the cache holds (rotated by the three position rows) and the
    kept tokens keep their 3-D ids, as the official Qwen2.5-VL port does."""
    model, inputs, image_token = _tiny_qwen_prompt(seed=4)
    kept = dart_kept(model, inputs, image_token, layer, (2, 2), 8)
    method = get_method("dart", layer=layer, pivot_image_tokens=2, pivot_text_tokens=2, truncation=8)
    with torch.no_grad(), compress(model, method) as engine:
        engine.record_kept = True
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert engine.kept_image_tokens[layer] == [kept.tolist()]
    plan = OraclePlan("dart", {layer: len(kept)}, "keep", fixed={layer: kept})
    tokens, logits = mrope_oracle_greedy(model, inputs, image_token, plan, 3)
    assert out.sequences[0, -3:].tolist() == tokens
    torch.testing.assert_close(torch.stack(out.logits, dim=1)[0], torch.stack(logits), atol=1e-4, rtol=1e-4)


# -- SparseVLM+ -------------------------------------------------------------------------------------

SPARSEVLM_COUNTS = {192: (300, 200, 118), 64: (66, 34, 20)}  # Gumpest/SparseVLMs score.py, V2_0


@torch.no_grad()
def sparsevlm_oracle_logits(model, embeds, is_image, tokens: int, raters, fixed: dict, positions=None, rope=None) -> torch.Tensor:
    """The v2.0 layer loop of `modelling_sparse_llama.py` on one unpadded prompt: at each pruning
    layer the layer's own eager attention, divided by the RoPE of all-ones q and k (`rope_weights`),
    `select_attn_head_by_sum` and `attn_postprocess_topk`; the layer's output pruned, positions
    kept. `fixed` (pruning layer -> kept image ranks) is filled at the first call and reused.
    On M-RoPE, `positions` are the rows the model hands its text model and `rope` the model's own
    rotation (LLaMA's `apply_rotary_pos_emb` otherwise)."""
    import math

    from oracles import _causal_mask
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rope = rope or apply_rotary_pos_emb
    lm = model.model.language_model
    n_layers, n0 = len(lm.layers), int(is_image.sum())
    pruning_loc = [round(layer * n_layers / 32) for layer in (2, 6, 15)]
    sparse_token_list = [round(count * n0 / 576) for count in SPARSEVLM_COUNTS[tokens]]
    positions = torch.arange(embeds.shape[1])[None] if positions is None else positions
    rows = positions.shape[0]
    hidden, image = embeds, is_image.clone()
    for layer_idx, decoder_layer in enumerate(lm.layers):
        mask = _causal_mask(hidden.shape[1], hidden.dtype)
        pe = lm.rotary_emb(hidden, positions[-3:, None] if rows > 1 else positions)
        layer_positions = positions[:1] if rows in (1, 4) else None
        out = decoder_layer(hidden, attention_mask=mask, position_embeddings=pe, position_ids=layer_positions)
        out = out[0] if isinstance(out, tuple) else out
        if layer_idx in pruning_loc and layer_idx + 1 < n_layers:
            v_token_start = int(image.nonzero()[0])
            v_token_num = int(image.sum())
            text_token_start = v_token_start + v_token_num
            if layer_idx not in fixed:
                attn = decoder_layer.self_attn
                _, attn_logits = attn(hidden_states=decoder_layer.input_layernorm(hidden), position_embeddings=pe, attention_mask=mask)
                bs, seq = hidden.shape[:2]
                num_heads, head_dim = attn_logits.shape[1], attn.head_dim
                query_states = hidden.new_ones(bs, seq, num_heads, head_dim).transpose(1, 2)
                key_states = hidden.new_ones(bs, seq, num_heads, head_dim).transpose(1, 2)
                query_states, key_states = rope(query_states, key_states, *pe)
                rope_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(head_dim)
                attn_logits = attn_logits / rope_weights
                cur_text_token_idx = raters + text_token_start
                each_head = attn_logits[0][:, cur_text_token_idx, v_token_start:text_token_start]
                heads = each_head.sum((1, 2)).topk(max(1, round(14 * num_heads / 32)))[1]
                attn_logits = attn_logits[:, heads].mean(1)
                relation = attn_logits[:, cur_text_token_idx, v_token_start: v_token_start + v_token_num].mean(1)
                count = min(sparse_token_list[pruning_loc.index(layer_idx)], v_token_num - 1)
                fixed[layer_idx] = relation[0].topk(count).indices.sort().values
            keep = ~image
            keep[image.nonzero().flatten()[fixed[layer_idx]]] = True
            out, positions, image = out[:, keep], positions[:, keep], image[keep]
        hidden = out
    return model.lm_head(lm.norm(hidden))[0]


def sparsevlm_raters(embeds, is_image) -> torch.Tensor:
    """`modelling_sparse_llama.py`'s text raters, on the decoder's input embeddings."""
    v_token_start = int(is_image.nonzero()[0])
    text_token_start = v_token_start + int(is_image.sum())
    v_t = embeds[:, v_token_start:text_token_start, :]
    t_t = embeds[:, text_token_start:, :]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
    return torch.where(m_v_t > m_v_t.mean())[1]


@pytest.mark.parametrize("tokens", [192, 64])
def test_sparsevlm_equals_the_official_v2_layer_loop(tiny, tokens):
    model = tiny("eager")
    inputs = _inputs(model, seed=6)
    method = get_method("sparsevlm", tokens=tokens)
    with torch.no_grad(), compress(model, method) as engine:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        counts = engine.applied_image_tokens_per_layer
    assert counts == method.image_tokens_per_layer(64, 4)
    embeds = prompt_embeddings(model, inputs["input_ids"], inputs["pixel_values"])
    is_image = (inputs["input_ids"] == model.config.image_token_index)[0]
    raters, fixed, tokens_out, logits = sparsevlm_raters(embeds, is_image), {}, [], []
    for _ in range(4):
        step = sparsevlm_oracle_logits(model, embeds, is_image, tokens, raters, fixed)[-1]
        tokens_out.append(int(step.argmax()))
        logits.append(step)
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[tokens_out[-1]]]))], dim=1)
        is_image = torch.cat([is_image, torch.zeros(1, dtype=torch.bool)])
    assert out.sequences[0, -4:].tolist() == tokens_out
    torch.testing.assert_close(torch.stack(out.logits, dim=1)[0], torch.stack(logits), atol=1e-4, rtol=1e-4)


def test_sparsevlm_on_qwen2_5_vl_equals_the_v2_layer_loop_on_m_rope():
    """SparseVLM has no official Qwen port: on M-RoPE the same loop, the gravity correction taken
    with the model's own rotation of all-ones q and k, the kept tokens keeping their 3-D ids."""
    from oracles import language_model_inputs
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    model, inputs, image_token = _tiny_qwen_prompt(seed=5)
    method = get_method("sparsevlm", tokens=192)
    with torch.no_grad(), compress(model, method) as engine:
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        counts = engine.applied_image_tokens_per_layer
    is_image = (inputs["input_ids"] == image_token)[0]
    assert counts == method.image_tokens_per_layer(int(is_image.sum()), len(model.model.language_model.layers))
    if hasattr(modeling_qwen2_5_vl, "apply_multimodal_rotary_pos_emb"):  # transformers < 5.7: sections applied here
        section = model.config.text_config.rope_parameters["mrope_section"]

        def rope(q, k, cos, sin):
            return modeling_qwen2_5_vl.apply_multimodal_rotary_pos_emb(q, k, cos, sin, section)
    else:  # the rotary embedding interleaves the sections into its tables
        rope = modeling_qwen2_5_vl.apply_rotary_pos_emb
    captured = language_model_inputs(model, inputs)
    embeds, positions = captured["inputs_embeds"], captured["position_ids"][:, 0]
    raters, fixed, tokens_out, logits = sparsevlm_raters(embeds, is_image), {}, [], []
    for _ in range(3):
        step = sparsevlm_oracle_logits(model, embeds, is_image, 192, raters, fixed, positions, rope)[-1]
        tokens_out.append(int(step.argmax()))
        logits.append(step)
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[tokens_out[-1]]]))], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        is_image = torch.cat([is_image, torch.zeros(1, dtype=torch.bool)])
    assert len(fixed) == 3 and out.sequences[0, -3:].tolist() == tokens_out
    torch.testing.assert_close(torch.stack(out.logits, dim=1)[0], torch.stack(logits), atol=1e-4, rtol=1e-4)


# -- PruMerge+ -------------------------------------------------------------------------------------


def prumerge_plus_oracle(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """`CLIPVisionTower.token_prune_merge_advanced_plus(images, if_adaptive=True)` of
    42Shawn/LLaVA-PruMerge (clip_encoder.py) line by line, batch of one, with its `layers[23]`
    as the tower's last layer and its 575 / 576 as N - 1 / N; returns [1, kept + 1, C]."""
    import numpy as np
    import torch.nn.functional as F

    outputs = {}
    tower = model.model.vision_tower
    last = getattr(tower, "vision_model", tower).encoder.layers[-1]
    hook_handle_k = last.self_attn.k_proj.register_forward_hook(lambda m, i, o: outputs.update(desired_k=o))
    hook_handle_q = last.self_attn.q_proj.register_forward_hook(lambda m, i, o: outputs.update(desired_q=o))
    with torch.no_grad():
        image_forward_outs = tower(pixel_values, output_hidden_states=True)
    hook_handle_k.remove()
    hook_handle_q.remove()
    image_features = image_forward_outs.hidden_states[-2][:, 1:]
    B, N, C = image_features.shape  # noqa: N806
    desired_layer_k, desired_layer_q = outputs["desired_k"], outputs["desired_q"]
    attn = (desired_layer_q @ desired_layer_k.transpose(-2, -1)) * C ** -0.5
    attn = F.softmax(attn, dim=-1)
    cls_attn = attn[:, 0, 1:]
    attn_np = cls_attn.to(dtype=torch.float32).cpu().numpy().flatten()
    Q1, Q3 = np.percentile(attn_np, 25), np.percentile(attn_np, 75)  # noqa: N806
    reduction_ratio = len(np.where(attn_np > Q3 + 1.5 * (Q3 - Q1))[0]) / len(attn_np)
    reduction_ratio = reduction_ratio or 1 / N  # no outlier: vtcbench's rule where the official code divides by zero
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    step_length = int(1 / reduction_ratio)
    arithmetic_sequence = torch.arange(0, N - 1, int(step_length / 3))
    original_tensor_1d = idx.flatten()
    filtered_sequence = torch.tensor([x for x in arithmetic_sequence if x not in original_tensor_1d])
    idx = torch.cat((idx, filtered_sequence.unsqueeze(0)), dim=1)
    index = idx.unsqueeze(-1).expand(-1, -1, C)
    Key_wo_cls = desired_layer_k[:, 1:]  # noqa: N806
    x_others = torch.gather(image_features, dim=1, index=index)
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(Key_wo_cls, dim=1, index=index)  # noqa: N806
    a = torch.arange(N).unsqueeze(0).expand(B, -1)
    compl = torch.sort(torch.scatter(a, -1, idx, 0), dim=-1).values[:, idx.shape[1]:]  # complement_idx
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))  # noqa: N806
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
    Key_others_norm = F.normalize(Key_others, p=2, dim=-1)  # noqa: N806
    non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)  # noqa: N806
    B, left_tokens, C = x_others.size()  # noqa: N806
    updated_x_others = torch.zeros_like(x_others)
    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b, i, :].unsqueeze(0).unsqueeze(0)
            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)  # noqa: N806
            after_i_Key = Key_others_norm[b, i + 1:, :].unsqueeze(0)  # noqa: N806
            rest_x_others = torch.cat([x_others[b, :i, :].unsqueeze(0), x_others[b, i + 1:, :].unsqueeze(0), non_topk[b, :, :].unsqueeze(0)], dim=1)
            rest_x_others_attn = torch.cat([x_others_attn[b, :i].unsqueeze(0), x_others_attn[b, i + 1:].unsqueeze(0), non_topk_attn[b, :].unsqueeze(0)], dim=1)
            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b, :, :].unsqueeze(0)], dim=1)  # noqa: N806
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))
            _, cluster_indices = torch.topk(cos_sim_matrix, k=int(32), dim=2, largest=True)
            cluster_tokens = rest_x_others[:, cluster_indices.squeeze(), :]
            weights = rest_x_others_attn[:, cluster_indices.squeeze()].unsqueeze(-1)
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1)
            updated_x_others[b, i, :] = x_others[b, i, :] + weighted_avg
    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    return torch.cat([updated_x_others, extra_one_token], dim=1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("seed", [0, 3, 5])
def test_prumerge_plus_equals_the_official_selection(tiny, seed, attn):
    model = tiny(attn)
    inputs = _inputs(model, seed=seed)
    logits, projected = _engine_logits(model, get_method("prumerge_plus"), inputs)
    with torch.no_grad():
        expected = model.model.multi_modal_projector(prumerge_plus_oracle(tiny("eager"), inputs["pixel_values"]))
    kept = expected.shape[1]
    torch.testing.assert_close(projected[:, :kept], expected, atol=1e-5, rtol=1e-5)
    assert not projected[:, kept:].any()  # the rest of the image's run is padding, dropped at layer 0
    short = _shortened(model, inputs, kept)
    torch.testing.assert_close(logits, _logits_with_image_tokens(model, short, expected), atol=1e-5, rtol=1e-5)


def test_prumerge_plus_counts_differ_per_image_and_a_batch_keeps_what_each_keeps_alone(tiny):
    """Two images with different outlier counts, left-padded in one batch: each row's answer and
    logits are its own, and the engine applies each row's own count."""
    from conftest import left_pad

    model = tiny("sdpa")
    method = get_method("prumerge_plus")
    kept = {}
    for seed in range(10):  # two images whose outliers differ in number
        with torch.no_grad(), compress(model, method) as engine:
            model(**_inputs(model, seed=seed))
        kept.setdefault(int(engine.tower_kept.sum()), seed)
        if len(kept) == 2:
            break
    singles = [_inputs(model, seed=seed) for seed in kept.values()]
    alone = []
    for inputs in singles:
        with torch.no_grad(), compress(model, method) as engine:
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        alone.append((out.sequences[0, -4:].tolist(), torch.stack(out.logits, dim=1)[0], engine.applied_image_tokens_per_layer))
    assert alone[0][2][0] != alone[1][2][0]  # the two images keep different numbers of tokens
    ids, mask = left_pad([inputs["input_ids"] for inputs in singles], model.config.pad_token_id or 0)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat([inputs["pixel_values"] for inputs in singles])}
    with torch.no_grad(), compress(model, method) as engine:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for row, (tokens, logits, counts) in enumerate(alone):
        assert out.sequences[row, -4:].tolist() == tokens
        torch.testing.assert_close(torch.stack(out.logits, dim=1)[row], logits, atol=1e-4, rtol=1e-4)
        assert engine.applied_image_tokens_per_sample[row] == counts


def test_prumerge_plus_outliers_follow_numpys_percentiles():
    """Q1 = 2.75, Q3 = 6.25 (linear), IQR 3.5: only 100 lies above 11.5, so 1 of 9."""
    from vtcbench.methods.prumerge_plus import outlier_ratio

    assert outlier_ratio(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 100])[None]) == 1 / 9
    assert outlier_ratio(torch.full((1, 16), 0.25)) == 0  # a flat row: none (the method then keeps its top patch)


def test_prumerge_plus_keeps_no_extra_token_when_it_keeps_every_patch():
    """13 of 64 patches are outliers (int(1 / 0.203) = 4, a sampling stride of int(4 / 3) = 1) and
    the last patch is among them: every patch is kept, each merged with its neighbours, and the
    official all-zeros extra token is left out (64 tokens for 64 placeholders)."""
    method = get_method("prumerge_plus")
    n, width = 64, 8
    features = torch.randn(n, width, generator=torch.Generator().manual_seed(2))
    keys = torch.nn.functional.normalize(torch.randn(n, width, generator=torch.Generator().manual_seed(3)), dim=-1)
    attention = torch.full((n,), 0.01)
    attention[torch.arange(51, 64)] = torch.linspace(0.5, 1.0, 13)
    merged = method._select(features, attention, keys)
    assert merged.shape == (n, width)
    first = int(attention.argmax())  # the first kept token: the most attended patch, merged with its 32 nearest others
    nearest = (keys[first] @ keys.T).index_fill(0, torch.tensor([first]), float("-inf")).topk(32).indices
    assert torch.equal(merged[0], features[first] + (features[nearest] * attention[nearest, None]).sum(0))


def test_prumerge_plus_refuses_a_tower_read_at_its_last_layer_before_loading():
    """vtc-tiny as `vtcbench train` builds it reads its tower's last layer: there is no next layer
    to take the attention from (the shipped one has it, from `vtcbench train-clip`)."""
    from vtcbench.methods import check_before_loading
    from vtcbench.models import load_config
    from vtcbench.training import TrainConfig, trained_config

    with pytest.raises(VtcbenchError, match="^prumerge_plus reads the queries and keys of the tower layer after [^\n]+$"):
        check_before_loading(get_method("prumerge_plus"), trained_config(TrainConfig(out="unused")))
    check_before_loading(get_method("prumerge_plus"), load_config("llava-1.5-7b"))  # layer 23 after -2
    check_before_loading(get_method("prumerge_plus"), load_config("vtc-tiny"))  # layer 4 after -2


def test_prumerge_plus_keeps_its_top_patch_when_no_patch_is_an_outlier():
    """A flat CLS row: the official code divides by zero; here the most attended patch stands
    alone as the outlier, then the samples at stride int(int(N)/3), then the extra token."""
    method = get_method("prumerge_plus")
    n, width = 64, 8
    features = torch.randn(n, width, generator=torch.Generator().manual_seed(0))
    keys = torch.nn.functional.normalize(torch.randn(n, width, generator=torch.Generator().manual_seed(1)), dim=-1)
    attention = torch.full((n,), 1 / (n + 1))
    merged = method._select(features, attention, keys)
    samples = [x for x in range(0, n - 1, 21) if x != int(attention.topk(1).indices)]
    assert merged.shape == (1 + len(samples) + 1, width)


# -- CDPruner ---------------------------------------------------------------------------------------


def cdpruner_oracle(model, clip_folder: str, pixel_values: torch.Tensor, text: str, visual_token_num: int) -> torch.Tensor:
    """`CLIPVisionTower.forward(images, texts)` (clip_encoder.py, its text tower and visual
    projection loaded as `load_text_tower` does, from the CLIP checkpoint) and
    `LlavaMetaForCausalLM.encode_images` (llava_arch.py) of Theia-4869/CDPruner on one image's
    crops (the relevance normalised over all of them): (the projected tokens [crops, N, d],
    `index_masks` [crops, N] of the kept ones)."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(clip_folder)
    text_tokenizer = AutoTokenizer.from_pretrained(clip_folder)
    max_position_embeddings = clip.config.text_config.max_position_embeddings
    tower = model.model.vision_tower
    with torch.no_grad():
        image_forward_outs = tower(pixel_values, output_hidden_states=True)
        image_outputs = image_forward_outs.hidden_states[-2][:, 1:]
        image_features = image_outputs
        text_inputs = text_tokenizer(text=text, return_tensors="pt")
        text_segment = (text_inputs.input_ids.shape[1] - 1) // max_position_embeddings + 1
        text_padding = max_position_embeddings * text_segment - text_inputs.input_ids.shape[1]
        text_inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], text_padding))], dim=1).reshape(-1, max_position_embeddings)
                       for k, v in text_inputs.items() if k in ("input_ids", "attention_mask")}
        text_embeds = clip.text_projection(clip.text_model(**text_inputs).pooler_output)  # CLIPTextModelWithProjection
        image_embeds = getattr(tower, "vision_model", tower).post_layernorm(image_outputs)
        image_embeds = clip.visual_projection(image_embeds.float())
        B, N, C = image_features.shape  # noqa: N806
        image_features = model.model.multi_modal_projector(image_features)
        image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
        image_normalized = image_normalized.float()
        similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        relevance = torch.matmul(image_embeds, text_embeds.t())
        relevance = (-relevance).mean(dim=-1)
        relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
        kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
        cis = torch.zeros((visual_token_num, B, N))
        di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
        select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
        for i in range(visual_token_num):
            j = torch.argmax(di2s, dim=-1)
            select_idx[i] = j
            eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
                / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
            cis[i, :, :] = eis
            di2s -= torch.square(eis)
            di2s[torch.arange(B), j] = -float('inf')
        select_idx = torch.sort(select_idx.t()).values
        index_masks = torch.zeros(B, N, dtype=torch.bool)
        index_masks.scatter_(1, select_idx, True)
    return image_features, index_masks


CDPRUNER_QUESTIONS = {
    "short": "how many circles are there ?",
    "two chunks": " ".join(["what color is the square in the picture ?"] * 10),  # 92 tokens: two 77-token chunks
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tokens", [1, 16, 40, 64])
@pytest.mark.parametrize("question", sorted(CDPRUNER_QUESTIONS))
def test_cdpruner_equals_the_official_selection(tiny, question, tokens, attn):
    from conftest import TINY_CLIP

    model = tiny(attn)
    method = get_method("cdpruner", tokens=tokens, clip=TINY_CLIP)
    inputs = _inputs(model, seed=7)
    text = CDPRUNER_QUESTIONS[question]
    seen = {}
    projector = family_of(model).projector(model)
    with torch.no_grad(), compress(model, method) as engine:
        engine.questions = [f"<image>\n{text}\nAnswer the question using a single word or phrase."]  # as lmms-eval asks
        handle = projector.register_forward_hook(lambda module, args, output: seen.update(tokens=output))
        try:
            logits = model(**engine.prepare(inputs)).logits
        finally:
            handle.remove()
    if tokens < 64:
        projected, masks = cdpruner_oracle(tiny("eager"), TINY_CLIP, inputs["pixel_values"], text, tokens)
        expected = projected[masks][None]
    else:  # every token, in order (the official MAP's last steps divide by rounding-size gains)
        with torch.no_grad():
            expected = model.model.multi_modal_projector(prompt_embeddings_features(model, inputs["pixel_values"]))
    torch.testing.assert_close(seen["tokens"], expected, atol=1e-6, rtol=1e-6)
    short = _shortened(model, inputs, tokens)
    torch.testing.assert_close(logits, _logits_with_image_tokens(model, short, expected), atol=1e-5, rtol=1e-5)


def test_cdpruner_batch_of_different_questions_answers_each_as_alone(tiny):
    """Two prompts, two questions, one left-padded batch through `EngineSession` (each prompt's
    question travels with it; no fallback question): each row as the prompt alone."""
    from conftest import TINY_CLIP

    from vtcbench.api import example_image
    from vtcbench.engine import QUESTIONS
    from vtcbench.generation import EngineSession

    model = tiny("sdpa")
    processor = load_model("tiny", random_weights=True)[1]
    session = EngineSession(model, processor, get_method("cdpruner", tokens=16, clip=TINY_CLIP))
    questions = ["how many circles are there ?", "what color is the square ?"]
    token = QUESTIONS.set(None)
    try:
        together = session.answer(questions, [example_image(), example_image()], max_new_tokens=4)
        alone = [session.answer([q], [example_image()], max_new_tokens=4)[0] for q in questions]
    finally:
        QUESTIONS.reset(token)
    assert together == alone


def test_cdpruner_needs_each_prompts_question_and_its_clip_checkpoint(tiny):
    from conftest import TINY_CLIP

    from vtcbench.engine import QUESTIONS

    model = tiny("sdpa")
    inputs = _inputs(model)
    token = QUESTIONS.set(None)
    try:
        with torch.no_grad(), compress(model, get_method("cdpruner", tokens=16, clip=TINY_CLIP)) as engine:
            with pytest.raises(VtcbenchError, match="^cdpruner scores the image against each prompt's question: [^\n]+$"):
                model(**engine.prepare(inputs))
    finally:
        QUESTIONS.reset(token)
    with pytest.raises(VtcbenchError, match="^cannot load the CLIP checkpoint '/nonexistent/clip' [^\n]+$"):
        with compress(model, get_method("cdpruner", clip="/nonexistent/clip")):
            pass
    assert not model.model._forward_pre_hooks and not model.model.multi_modal_projector._forward_hooks  # none left behind


# -- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("visionzip", {"dominant": 60, "contextual": 10}, "dominant=60 + contextual=10 exceed the 64 image tokens; valid: dominant + contextual <= 64"),
        ("visionzip", {"dominant": 0}, "dominant=0 is out of range"),
        ("vispruner", {"tokens": 65}, "tokens=65 exceeds the 64 image tokens; valid range: 1..64"),
        ("vispruner", {"tokens": 15, "important_ratio": 0.5}, "leaves 57 patches to pair, an odd number"),
        ("vispruner", {"tokens": 16, "important_ratio": 0.75}, "reaches a round of 12 tokens that must drop 8 of its 6 A tokens"),
        ("divprune", {"ratio": 0.005}, "ratio=0.005 keeps no token of 64; valid range: [0.007812, 1]"),
        ("divprune", {"ratio": 1.5}, "ratio=1.5 is out of range; valid range: (0, 1]"),
        ("dart", {"layer": 0}, "layer=0 is outside this model's decoder layers; valid range: 1..3"),
        ("dart", {"truncation": 128}, "keep 132 of 64 image tokens; valid truncation: 0..63"),
        ("cdpruner", {"tokens": 65}, "tokens=65 exceeds the 64 image tokens; valid range: 1..64"),
        ("cdpruner", {"tokens": 0}, "tokens=0 is out of range"),
    ],
)
def test_bad_settings_are_refused_in_one_line(tiny, name, params, message):
    model = tiny("sdpa")
    with pytest.raises(VtcbenchError) as error:
        method = get_method(name, **params)
        with compress(model, method):
            pass
    assert message in str(error.value) and "\n" not in str(error.value)


def test_dart_refuses_more_text_pivots_than_text_after_the_image(tiny):
    model = tiny("sdpa")
    ids = prompt_ids(model, 3, 2, seed=0)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels(0)}
    with torch.no_grad(), compress(model, get_method("dart", pivot_text_tokens=4, truncation=24)):
        with pytest.raises(VtcbenchError, match="^dart: pivot_text_tokens=4 exceeds the 2 tokens after the image$"):
            model(**inputs)


@pytest.mark.parametrize("name", ["visionzip", "vispruner", "cdpruner", "prumerge_plus"])
def test_selections_before_the_llm_refuse_keep_indices(name):
    """The engine sees the selected tokens, not the patches they came from: a retention picture
    would show the first patches of the grid as kept. Pooling (avgpool) keeps its pooled grid,
    and DivPrune's selection at the language model's input keeps the patches' own tokens."""
    from vtcbench.methods import check_before_loading
    from vtcbench.models import load_config

    config = load_config("llava-1.5-7b")
    with pytest.raises(VtcbenchError, match=f"^--keep-indices: {name} selects before the LLM, [^\n]+$"):
        check_before_loading(get_method(name), config, keep_indices=2)
    check_before_loading(get_method("avgpool"), config, keep_indices=2)
    check_before_loading(get_method("divprune"), config, keep_indices=2)


@pytest.mark.parametrize("model_type", ["llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_pre_llm_selections_refuse_families_without_a_fixed_grid_or_cls(model_type):
    """LLaVA-NeXT runs the per-crop selections (VisionZip, VisPruner, CDPruner), not PruMerge+'s."""
    family = family_of(model_type)
    refused = ("prumerge_plus",) if family.anyres_crops else ("visionzip", "vispruner", "prumerge_plus", "cdpruner")
    for name in refused:
        with pytest.raises(VtcbenchError, match=f"^{name} cannot run on the {family.name} family: [^\n]+$"):
            family.check_method(get_method(name))
