"""Videos through the engine on the Qwen toys: a video's tokens are visual tokens, compressed by
the in-LLM methods as an image's are, with the counts per modality
(`engine.applied_video_tokens_per_sample`).

Inputs are built as the models take them: `pixel_values_videos` and `video_grid_thw`, and the
prompt's `<|video_pad|>` runs (one run for Qwen2-VL and Qwen2.5-VL; one per frame pair, after its
timestamp, for Qwen3-VL), with random pixels: no video processor runs offline (transformers'
needs torchvision).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import OraclePlan, mrope_oracle_greedy
from PIL import Image

from vtcbench.engine import compress
from vtcbench.families import family_of
from vtcbench.methods import get_method
from vtcbench.models import MODELS, load_model

QWEN_TOYS = sorted(alias for alias, spec in MODELS.items() if spec.toy and family_of(spec.family).position_rows > 1)
GRID = (2, 4, 6)  # frame pairs, patch rows, patch columns: 12 video tokens after the 2x2 merge
CASES = {
    "fastv-first": ("fastv", {"layer": 1, "drop_ratio": 0.5}),
    "pdrop": ("pdrop", {"layers": (1, 3), "keep_ratio": 0.5}),
    "llavolta-first": ("llavolta", {"layer": 0, "stride": 2}),
    "kmeans": ("kmeans", {"layer": 1, "clusters": 4, "iters": 3}),
    "divprune": ("divprune", {"ratio": 0.3}),
}
KEEP_ALL = {
    "fastv": {"layer": 1, "drop_ratio": 0.0},
    "llavolta": {"layer": 0, "stride": 1},
    "divprune": {"ratio": 1.0},
}

_models: dict = {}


def toy(alias: str, attn: str = "sdpa"):
    if (alias, attn) not in _models:
        _models[alias, attn] = load_model(alias, random_weights=True, attn_implementation=attn)
    return _models[alias, attn]


def _video_text(model, question: str, grid: tuple[int, int, int], image: bool = False) -> str:
    family = family_of(model)
    t, h, w = grid
    per_frame = h * w // model.config.vision_config.spatial_merge_size**2
    if family.name == "qwen3_vl":  # each frame pair its own run, after its timestamp (Qwen3-VL's processor)
        video = "".join(f"<{i}.0 seconds><|vision_start|>{'<|video_pad|>' * per_frame}<|vision_end|>" for i in range(t))
    else:
        video = f"<|vision_start|>{'<|video_pad|>' * (t * per_frame)}<|vision_end|>"
    picture = "<|vision_start|><|image_pad|><|vision_end|>" if image else ""
    return f"<|im_start|>user\n{picture}{video}{question}<|im_end|>\n<|im_start|>assistant\n"


def _image_text(question: str) -> str:
    return f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (84, 112, 3), dtype=np.uint8))


def _inputs(model, processor, texts: list[str], images: list[Image.Image], videos: int, seed: int = 0) -> dict:
    """The image processor's inputs and each `<|image_pad|>` expanded to its image's tokens (as the
    processor does, which also insists on a video processor for `<|video_pad|>`), the texts
    tokenized (left-padded), then each video's patches and grid (random pixels)."""
    vision = model.config.vision_config
    inputs = {}
    if images:
        inputs.update(processor.image_processor(images=images, return_tensors="pt"))
        counts = iter((inputs["image_grid_thw"].prod(dim=-1) // vision.spatial_merge_size**2).tolist())
        texts = [text.replace("<|image_pad|>", "<|image_pad|>" * next(counts)) if "<|image_pad|>" in text else text for text in texts]
    inputs.update(processor.tokenizer(texts, padding=True, return_tensors="pt"))
    if videos:
        dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        patches = videos * int(np.prod(GRID))
        inputs["pixel_values_videos"] = torch.randn(patches, dim, generator=torch.Generator().manual_seed(seed))
        inputs["video_grid_thw"] = torch.tensor([GRID] * videos)
    inputs.update(family_of(model).token_inputs(model.config, inputs["input_ids"]))
    return inputs


def _generate(model, inputs: dict, method, new_tokens: int = 3):
    with torch.no_grad(), compress(model, method) as engine:
        engine.record_kept = True
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -new_tokens:], torch.stack(out.logits, dim=1), engine


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
@pytest.mark.parametrize("alias", QWEN_TOYS)
def test_keep_all_equals_vanilla_on_a_video(alias, name):
    model, processor = toy(alias)
    inputs = _inputs(model, processor, [_video_text(model, "what happens ?", GRID)], [], videos=1)
    tokens, logits, engine = _generate(model, inputs, get_method("vanilla"))
    kept_tokens, kept_logits, kept = _generate(model, inputs, get_method(name, **KEEP_ALL[name]))
    assert torch.equal(kept_tokens, tokens)
    torch.testing.assert_close(kept_logits, logits, atol=1e-4, rtol=1e-4)
    assert kept.applied_video_tokens_per_sample == kept.applied_image_tokens_per_sample == engine.applied_image_tokens_per_sample


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("alias", QWEN_TOYS)
def test_a_video_prompt_batched_with_an_image_prompt_answers_as_alone(alias, case):
    """Each row of a left-padded batch (a video prompt, an image prompt) as its prompt alone; the
    video row's visual tokens are all video tokens, the image row's none."""
    model, processor = toy(alias)
    name, params = CASES[case]
    method = get_method(name, **params)
    video_text, image_text = _video_text(model, "what happens in the clip ?", GRID), _image_text("what is it ?")
    batch = _inputs(model, processor, [video_text, image_text], [_image(1)], videos=1)
    tokens, logits, engine = _generate(model, batch, method)
    visual, video = engine.applied_image_tokens_per_sample, engine.applied_video_tokens_per_sample
    assert video[0] == visual[0] and video[1] == [0] * len(visual[1])
    for row, alone in enumerate([_inputs(model, processor, [video_text], [], videos=1),
                                 _inputs(model, processor, [image_text], [_image(1)], videos=0)]):
        alone_tokens, alone_logits, single = _generate(model, alone, method)
        assert tokens[row].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-4, rtol=1e-4)
        assert visual[row] == single.applied_image_tokens_per_sample[0]


@pytest.mark.parametrize("alias", QWEN_TOYS)
def test_fastv_on_a_video_equals_the_oracle_on_its_3d_positions(alias):
    """The decoder run by hand on the model's own positions (a video's temporal row advances per
    frame pair) and DeepStack features, the least-attended video tokens dropped after layer 1."""
    model, processor = toy(alias, "eager")
    inputs = _inputs(model, processor, [_video_text(model, "what happens ?", GRID)], [], videos=1, seed=3)
    video_token = family_of(model).video_token_id(model.config)
    n = int((inputs["input_ids"] == video_token).sum())
    tokens, logits, _ = _generate(model, inputs, get_method("fastv", layer=2, drop_ratio=0.5))
    expected, expected_logits = mrope_oracle_greedy(model, inputs, video_token, OraclePlan("fastv", {2: n - n // 2}, "keep"), 3)
    assert tokens[0].tolist() == expected
    torch.testing.assert_close(logits[0], torch.stack(expected_logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("alias", QWEN_TOYS)
def test_counts_per_modality_follow_the_kept_tokens(alias):
    """A prompt with an image and a video: after FastV's drop, the video count is the number of
    kept visual tokens that were the video's."""
    model, processor = toy(alias)
    inputs = _inputs(model, processor, [_video_text(model, "what changes ?", GRID, image=True)], [_image(2)], videos=1)
    _, _, engine = _generate(model, inputs, get_method("fastv", layer=1, drop_ratio=0.6))
    ids = inputs["input_ids"][0]
    visual = (ids == family_of(model).image_token_id(model.config)) | (ids == family_of(model).video_token_id(model.config))
    is_video = (ids == family_of(model).video_token_id(model.config))[visual]
    kept = engine.kept_image_tokens[1][0]
    assert 0 < engine.applied_video_tokens_per_sample[0][1] == int(is_video[kept].sum()) < int(is_video.sum())
    assert engine.applied_video_tokens_per_sample[0][0] == int(is_video.sum())
    assert engine.applied_image_tokens_per_sample[0][1] == len(kept)
