"""Shared fixtures: a tiny random-weight LLaVA (built offline from the shipped config) and prompts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vtcbench.engine import QUESTIONS  # noqa: E402
from vtcbench.families.llava import write_random_clip  # noqa: E402
from vtcbench.models import load_model  # noqa: E402

#: CDPruner's text tower for the tiny LLaVA, built once per test session
TINY_CLIP = write_random_clip(Path(tempfile.mkdtemp(prefix="vtcbench-tiny-clip-")), tower_width=32)
#: the question of prompts the tests build without one (CDPruner reads it)
TEST_QUESTION = "how many circles are there ?"


@pytest.fixture(autouse=True, scope="session")
def _question_of_synthetic_prompts():
    token = QUESTIONS.set(TEST_QUESTION)
    yield
    QUESTIONS.reset(token)


# Configurations that act on the tiny model (4 decoder layers, 64 image tokens) ...
TINY_DEFAULTS: dict[str, dict] = {
    "vanilla": {},
    "fastv": {"layer": 2, "drop_ratio": 0.5},
    "pdrop": {"layers": (1, 3), "keep_ratio": 0.5},
    "vico": {"stages": 4, "keep_ratio": 0.5},
    "llavolta": {"layer": 2, "stride": 8},
    "random": {"layer": 1, "drop_ratio": 0.5},
    "kmeans": {"layer": 2, "clusters": 16},
    "avgpool": {"kernel": 2},
    "dart": {"layer": 2, "pivot_image_tokens": 2, "pivot_text_tokens": 1, "truncation": 24},
    "divprune": {"ratio": 0.25},
    "visionzip": {"dominant": 12, "contextual": 4},
    "vispruner": {"tokens": 16, "important_ratio": 0.5},
    "sparsevlm": {"tokens": 192},
    "prumerge_plus": {},
    "cdpruner": {"tokens": 16, "clip": TINY_CLIP},
}
# ... and the same methods configured to keep every token.
KEEP_ALL: dict[str, dict] = {
    "vanilla": {},
    "fastv": {"layer": 2, "drop_ratio": 0.0},
    "pdrop": {"layers": (1, 3), "keep_ratio": 1.0},
    "vico": {"stages": 4, "keep_ratio": 1.0},
    "llavolta": {"layer": 2, "stride": 1},
    "random": {"layer": 1, "drop_ratio": 0.0},
    "kmeans": {"layer": 2, "clusters": 64},
    "avgpool": {"kernel": 1},
    "dart": {"layer": 2, "pivot_image_tokens": 64, "pivot_text_tokens": 1, "truncation": 0},
    "divprune": {"ratio": 1.0},
    "vispruner": {"tokens": 64, "important_ratio": 1.0},
    "cdpruner": {"tokens": 64, "clip": TINY_CLIP},
}
#: methods with no keep-all configuration, and why
NO_KEEP_ALL: dict[str, str] = {
    "visionzip": "its tokens always include CLS's feature, which LLaVA's default select strategy drops",
    "sparsevlm": "each pruning keeps at most N - 1 of N tokens (the official min(count, N - 1))",
    "prumerge_plus": "it has no setting: each image keeps its CLS-attention outliers and samples, merged",
}


@pytest.fixture(scope="session")
def tiny():
    """tiny(attn) -> a random-weight tiny LLaVA with that attention backend (cached)."""
    models: dict[str, torch.nn.Module] = {}

    def get(attn: str = "sdpa"):
        if attn not in models:
            models[attn] = load_model("tiny", random_weights=True, attn_implementation=attn)[0]
        return models[attn]

    return get


def prompt_ids(model, n_before: int, n_after: int, seed: int) -> torch.Tensor:
    """[1, seq]: BOS, random text, the image placeholders, random text."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    reserved = {config.image_token_index, config.pad_token_id or 0, 0, 1, 2}

    def text(n: int) -> list[int]:
        ids = torch.randint(10, vocab, (n * 2,), generator=generator).tolist()
        return [i for i in ids if i not in reserved][:n]

    n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    ids = [1, *text(n_before), *[config.image_token_index] * n_image, *text(n_after)]
    return torch.tensor([ids])


def pixels(seed: int, size: int = 56) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), length), pad_id)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, length - p.shape[1]:] = p[0]
        mask[row, length - p.shape[1]:] = 1
    return ids, mask


@pytest.fixture(scope="session")
def tiny_next():
    """A toy LLaVA-NeXT (AnyRes crops + newline tokens) from the tiny config, with its processor."""
    return build_tiny_next("sdpa")


def build_tiny_next(attn: str):
    """The `tiny_next` model (the same random weights for every backend) and its processor."""
    import json

    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from vtcbench.models import CONFIG_DIR, build_local_processor

    data = json.loads((CONFIG_DIR / "tiny.json").read_text())
    data.update(model_type="llava_next", image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
    config = LlavaNextConfig.from_dict(data)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    return model, build_local_processor(config)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """VTCBENCH_CACHE and lmms-eval's datasets cache in a temporary folder, not the home folder."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VTCBENCH_CACHE", str(root / "vtcbench"))
        patch.setenv("LMMS_EVAL_DATASETS_CACHE", str(root / "hf-datasets"))
        yield root
