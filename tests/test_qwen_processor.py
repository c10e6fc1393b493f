"""Offline tests for the Qwen-VL shipped configs and vtcbench.families.qwen_processor.

The tiny random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL models go through their real processor class and
``generate`` under eager and sdpa attention; the hub configs are built on the meta device and counted.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import pytest
import torch
from PIL import Image
from transformers import (
    CONFIG_MAPPING,
    AutoModelForImageTextToText,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

import vtcbench
from vtcbench.families.qwen_processor import (
    build_local_qwen_processor,
    qwen_chat_messages,
    qwen_chat_prompt,
    qwen_special_ids,
)

CONFIG_DIR = Path(vtcbench.__file__).parent / "model_configs"

TINY = {
    "tiny-qwen2-vl": (Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    "tiny-qwen2.5-vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
    "tiny-qwen3-vl": (Qwen3VLForConditionalGeneration, Qwen3VLProcessor),
}

# parameters of the meta-device model (tied embeddings counted once) and the size the model card states
HUB = {
    "Qwen2-VL-2B-Instruct": (2_208_985_600, 2.21e9),
    "Qwen2-VL-7B-Instruct": (8_291_375_616, 8.29e9),
    "Qwen2.5-VL-3B-Instruct": (3_754_622_976, 3.75e9),
    "Qwen2.5-VL-7B-Instruct": (8_292_166_656, 8.29e9),
    "Qwen2.5-VL-32B-Instruct": (33_452_718_336, 33.5e9),
    "Qwen2.5-VL-72B-Instruct": (73_410_777_344, 73.4e9),
    "Qwen3-VL-4B-Instruct": (4_437_815_808, 4.44e9),
    "Qwen3-VL-8B-Instruct": (8_767_123_696, 8.77e9),
}

QUESTIONS = ("What color is the dog ?", "How many people are there ?")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def load(name: str):
    data = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)


def images() -> list[Image.Image]:
    return [Image.new("RGB", (112, 112), (200, 30, 30)), Image.new("RGB", (84, 140), (30, 200, 30))]


def batch(processor):
    texts = [qwen_chat_prompt(q, 1) for q in QUESTIONS]
    return processor(images=images(), text=texts, padding=True, return_tensors="pt")


def tiny_model(name: str, attn: str):
    cls = TINY[name][0]
    torch.manual_seed(0)
    return cls._from_config(load(name), attn_implementation=attn).eval()


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_config_builds_with_the_advertised_size(name):
    config = load(name)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    count = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    expected, advertised = HUB[name]
    assert count == expected
    assert abs(count - advertised) / advertised < 0.005


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_configs_are_tiny_and_consistent(name):
    config = load(name)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers) == (64, 4)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert (text.intermediate_size, text.vocab_size) == (128, 320)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert (vision.spatial_merge_size, vision.temporal_patch_size) == (2, 2)
    ids = qwen_special_ids(config)
    assert len(set(ids.values())) == len(ids) and max(ids.values()) < text.vocab_size
    if config.model_type == "qwen2_5_vl":
        assert vision.depth == 4 and list(vision.fullatt_block_indexes) == [1, 3]
        assert vision.window_size // vision.spatial_merge_size // vision.patch_size == 2  # 2x2 merged tokens a window
    if config.model_type == "qwen3_vl":
        assert list(vision.deepstack_visual_indexes) == [0, 1]
        assert text.rope_parameters["mrope_interleaved"] is True


@pytest.mark.parametrize("name", sorted(TINY))
def test_processor_is_the_family_class_and_expands_image_pad(name):
    config = load(name)
    processor = build_local_qwen_processor(config)
    assert isinstance(processor, TINY[name][1])
    tokenizer = processor.tokenizer
    for token, idx in qwen_special_ids(config).items():
        assert tokenizer.convert_tokens_to_ids(token) == idx
    assert tokenizer.eos_token_id == config.text_config.eos_token_id
    inputs = batch(processor)
    merge = config.vision_config.spatial_merge_size
    per_image = (inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
    assert (inputs["input_ids"] == config.image_token_id).sum(-1).tolist() == per_image
    assert per_image[0] == 16  # 112x112 -> 4x4 merged tokens
    assert inputs["mm_token_type_ids"].eq(1).sum(-1).tolist() == per_image
    assert inputs["attention_mask"][:, 0].tolist() in ([1, 0], [0, 1])  # one row left-padded


@pytest.mark.parametrize("name", sorted(TINY))
def test_chat_template_renders_the_lmms_eval_prompt(name):
    processor = build_local_qwen_processor(load(name))
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What color is the dog ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen_chat_prompt("What color is the dog ?", 1) == expected
    rendered = processor.apply_chat_template(
        qwen_chat_messages("What color is the dog ?", 1), tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected
    answered = qwen_chat_messages("What color is the dog ?", 1, answer="red")
    with_answer = processor.apply_chat_template(answered, tokenize=False)
    assert with_answer == qwen_chat_prompt("What color is the dog ?", 1, answer="red") == expected + "red<|im_end|>\n"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_model_generates_from_the_local_processor(name, attn):
    model = tiny_model(name, attn)
    config = model.config
    inputs = batch(build_local_qwen_processor(config))
    merge = config.vision_config.spatial_merge_size
    per_image = (inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
    assert (inputs["input_ids"] == config.image_token_id).sum(-1).tolist() == per_image
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert int(out.max()) < config.text_config.vocab_size


@pytest.mark.parametrize("name", sorted(TINY))
def test_eager_and_sdpa_agree_on_a_padded_batch(name):
    inputs = batch(build_local_qwen_processor(load(name)))
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        eager = tiny_model(name, "eager")(**inputs).logits
        sdpa = tiny_model(name, "sdpa")(**inputs).logits
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-4, rtol=1e-4)


def test_qwen2_5_tiny_vision_really_uses_windows():
    """Blocks outside fullatt_block_indexes attend inside 2x2-merged-token windows (16 patches)."""
    model = tiny_model("tiny-qwen2.5-vl", "sdpa")
    seen: dict[int, list[int]] = {}
    for index, block in enumerate(model.model.visual.blocks):
        block.register_forward_pre_hook(
            lambda mod, args, kwargs, index=index: seen.__setitem__(index, kwargs["cu_seqlens"].diff().tolist()),
            with_kwargs=True,
        )
    inputs = batch(build_local_qwen_processor(model.config))
    with torch.no_grad():
        model(**inputs)
    grid = inputs["image_grid_thw"].prod(-1).tolist()  # patches per image: 64 and 60
    assert seen[1] == seen[3] == grid  # full attention: one segment per image
    assert seen[0] == seen[2] and len(seen[0]) > len(grid) and max(seen[0]) == 16


def test_qwen3_tiny_deepstack_reaches_two_decoder_layers():
    model = tiny_model("tiny-qwen3-vl", "sdpa")
    got = {}
    model.model.language_model.register_forward_pre_hook(lambda mod, args, kwargs: got.update(kwargs), with_kwargs=True)
    inputs = batch(build_local_qwen_processor(model.config))
    with torch.no_grad():
        model(**inputs)
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert torch.equal(got["visual_pos_masks"], inputs["input_ids"] == model.config.image_token_id)
    assert [tuple(t.shape) for t in got["deepstack_visual_embeds"]] == [(n_image, 64)] * 2


def test_video_processor_only_with_torchvision():
    """Without torchvision (the CPU install) the processor is an image-only subclass of the family class."""
    import importlib.util

    processor = build_local_qwen_processor(load("tiny-qwen2.5-vl"))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor) is not Qwen2_5_VLProcessor and "video_processor" not in processor.get_attributes()
    else:
        assert type(processor) is Qwen2_5_VLProcessor
        assert processor.video_processor.merge_size == 2 and processor.video_processor.patch_size == 14
