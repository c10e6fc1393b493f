"""Offline tests for vtcbench.models: shipped configs, random-weight tiny model, local processor, errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from vtcbench.errors import VtcbenchError
from vtcbench.families import decoder_layers, language_model, model_facts
from vtcbench.models import (
    LOCAL_WORDS,
    MODELS,
    build_local_processor,
    image_token_mask,
    load_config,
    load_model,
    resolve_model,
)

PROMPT = "USER: <image>\nWhat color is the car? Answer the question using a single word or phrase. ASSISTANT:"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Force offline mode even if huggingface_hub was imported before the env var was set."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", random_weights=True)


def _image(color=(200, 30, 30), size=(80, 60)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.mark.parametrize(
    "alias, layers, hidden, inter, heads, image_tokens",
    [
        ("llava-1.5-7b", 32, 4096, 11008, 32, 576),
        ("llava-1.5-13b", 40, 5120, 13824, 40, 576),
        ("llava-next-7b", 32, 4096, 11008, 32, 2880),
        ("tiny", 4, 64, 128, 4, 64),
    ],
)
def test_shipped_config_facts(alias, layers, hidden, inter, heads, image_tokens):
    facts = model_facts(load_config(alias))
    assert (facts.n_layers, facts.hidden_size, facts.intermediate_size, facts.n_heads) == (layers, hidden, inter, heads)
    assert facts.image_tokens == image_tokens
    assert facts.family == MODELS[alias].family
    if alias != "tiny":
        assert (facts.vocab_size, facts.image_token_index, facts.head_dim) == (32064, 32000, 128)
        assert (facts.vision_n_layers, facts.vision_hidden_size, facts.vision_n_tokens) == (24, 1024, 577)
        assert (facts.projector_in, facts.projector_out) == (1024, hidden)


def test_tiny_facts_are_grouped_query():
    facts = model_facts(load_config("tiny"))
    assert (facts.n_kv_heads, facts.head_dim, facts.vision_n_tokens, facts.vision_crops) == (2, 16, 65, 1)


def test_resolve_model():
    assert resolve_model("tiny") is MODELS["tiny"]
    assert resolve_model("llava-hf/llava-1.5-7b-hf") is MODELS["llava-1.5-7b"]
    assert resolve_model("someone/some-llava") is None
    with pytest.raises(VtcbenchError) as err:
        resolve_model("llava-99b")
    assert "llava-1.5-7b" in str(err.value) and "tiny" in str(err.value)


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(VtcbenchError, match="config.json"):
        resolve_model(str(tmp_path))


def test_tiny_random_weights_are_deterministic(tiny):
    model, _ = tiny
    state = torch.random.get_rng_state()
    again, _ = load_model("tiny", random_weights=True, seed=0)
    other, _ = load_model("tiny", random_weights=True, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG stream untouched
    ref, same, diff = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], diff[k]) for k in ref)
    assert not model.training


def test_tiny_processor_generate_round_trip(tiny):
    model, processor = tiny
    prompts = [PROMPT, "USER: <image>\nWhat? ASSISTANT:"]  # different lengths → left padding
    batch = processor(images=[_image(), _image((0, 0, 255))], text=prompts, return_tensors="pt", padding=True)
    mask = image_token_mask(batch["input_ids"], model.config.image_token_index)
    assert mask.sum(dim=1).tolist() == [64, 64]
    for row in mask:  # one contiguous span per image
        pos = row.nonzero().flatten()
        assert pos[-1] - pos[0] + 1 == 64
    assert batch["input_ids"][1, 0].item() == processor.tokenizer.pad_token_id
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    assert all(isinstance(t, str) for t in processor.batch_decode(out[:, batch["input_ids"].shape[1] :]))


def test_local_tokenizer_matches_tiny_config(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_index
    assert len(tok) == model.config.text_config.vocab_size
    assert tok.pad_token_id == model.config.pad_token_id
    assert all(tok.convert_tokens_to_ids(w) != tok.unk_token_id for w in LOCAL_WORDS)


def test_structure_helpers(tiny):
    model, _ = tiny
    assert type(language_model(model)).__name__ == "LlamaModel"
    assert len(decoder_layers(model)) == 4
    assert decoder_layers(model) is language_model(model).layers


def test_local_processor_llava15_expands_576():
    config = load_config("llava-1.5-7b")
    processor = build_local_processor(config)
    batch = processor(images=[_image(size=(500, 375))], text=[PROMPT], return_tensors="pt", padding=True)
    ids = batch["input_ids"]
    assert image_token_mask(ids, 32000).sum().item() == 576
    assert ids.max().item() < config.text_config.vocab_size
    assert batch["pixel_values"].shape == (1, 3, 336, 336)


def test_local_processor_llava_next_uses_anyres():
    processor = build_local_processor(load_config("llava-next-7b"))
    batch = processor(images=[_image(size=(500, 375))], text=[PROMPT], return_tensors="pt")
    assert batch["pixel_values"].shape[:3] == (1, 5, 3)  # base + 2x2 grid for a 4:3 image
    assert 576 < image_token_mask(batch["input_ids"], 32000).sum().item() <= 2880 + 48  # + newline tokens


def test_local_processor_matches_llava_next_model():
    """A toy llava_next built from the tiny config: the model itself checks placeholder count == features."""
    import json

    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from vtcbench.models import CONFIG_DIR

    data = json.loads((CONFIG_DIR / "tiny.json").read_text())
    data.update(model_type="llava_next", image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
    config = LlavaNextConfig.from_dict(data)
    processor = build_local_processor(config)
    model = LlavaNextForConditionalGeneration._from_config(config).eval()
    assert model_facts(config).image_tokens == 5 * 64
    for size in [(80, 60), (56, 56), (200, 50)]:
        batch = processor(images=[_image(size=size)], text=["USER: <image>\nWhat? ASSISTANT:"], return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape[1] == batch["input_ids"].shape[1]
        assert image_token_mask(batch["input_ids"], 4).sum().item() > 64


@pytest.mark.parametrize(
    "kwargs, valid",
    [({"dtype": "float64"}, "bfloat16, float16, float32"), ({"attn_implementation": "magic"}, "eager")],
)
def test_bad_options(kwargs, valid):
    with pytest.raises(VtcbenchError) as err:
        load_model("tiny", random_weights=True, **kwargs)
    assert "valid choices" in str(err.value) and valid in str(err.value)


def test_unknown_model():
    with pytest.raises(VtcbenchError, match="valid choices: .*llava-1.5-7b"):
        load_model("nope", random_weights=True)


def test_flash_attention_needs_package():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn installed")
    with pytest.raises(VtcbenchError, match="flash_attn"):
        load_model("tiny", random_weights=True, attn_implementation="flash_attention_2")


def test_tiny_needs_random_weights():
    with pytest.raises(VtcbenchError, match="--random-weights"):
        load_model("tiny")


def test_real_weights_offline_is_one_line_error():
    with pytest.raises(VtcbenchError) as err:
        load_model("llava-1.5-7b")
    message = str(err.value)
    assert "\n" not in message
    assert "--random-weights" in message and "llava-hf/llava-1.5-7b-hf" in message


def test_saved_folder_round_trip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert resolve_model(str(tmp_path)) is None
    loaded, loaded_processor = load_model(str(tmp_path))
    prompt = ["USER: <image>\nWhat color? ASSISTANT:"]
    batch = processor(images=[_image()], text=prompt, return_tensors="pt")
    again = loaded_processor(images=[_image()], text=prompt, return_tensors="pt")
    assert torch.equal(batch["input_ids"], again["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert model_facts(loaded) == model_facts(model)


HUB_PREFIXES = ("language_model.model.", "language_model.lm_head.", "multi_modal_projector.", "vision_tower.vision_model.")


def _checkpoint_keys(folder) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return list(handle.keys())


def test_save_checkpoint_writes_the_llava_hf_hub_layout_and_loads_back(tiny, tmp_path):
    """The layout every supported transformers reads (5.23's save_pretrained drops `vision_model.`)."""
    from vtcbench.transformers_seam import save_checkpoint

    model, _ = tiny
    save_checkpoint(model, tmp_path)
    keys = _checkpoint_keys(tmp_path)
    assert keys and all(key.startswith(HUB_PREFIXES) for key in keys), keys[:5]
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_shipped_vtc_tiny_is_in_the_hub_layout():
    from pathlib import Path

    from vtcbench.models import MODELS

    keys = _checkpoint_keys(Path(MODELS["vtc-tiny"].source))
    assert len(keys) == 132 and all(key.startswith(HUB_PREFIXES) for key in keys)  # 116 trained, 16 of its CLIP layer


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tiny, tmp_path):
    """Weights transformers cannot place would be initialised at random: refuse, naming a key."""
    from safetensors.torch import load_file, save_file

    from vtcbench.transformers_seam import save_checkpoint

    model, processor = tiny
    save_checkpoint(model, tmp_path)
    processor.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["multi_modal_projector.linear_9.weight"] = state.pop("multi_modal_projector.linear_1.weight")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VtcbenchError, match=r"does not fit the model: 1 missing keys \(e\.g\. .*linear_1\.weight\); 1 unexpected keys"):
        load_model(str(tmp_path))
