"""The engine's invariants (docs/architecture.md#tests) on a tiny random-weight LLaVA."""

from __future__ import annotations

import pytest
import torch
from conftest import KEEP_ALL, NO_KEEP_ALL, TINY_DEFAULTS, left_pad, pixels, prompt_ids
from oracles import OraclePlan, oracle_greedy, oracle_logits, prompt_embeddings

from vtcbench.engine import compress
from vtcbench.methods import METHODS, get_method
from vtcbench.transformers_seam import (
    TransformersConventionError,
    cache_layer_lengths,
    returned_cache,
)

METHOD_NAMES = sorted(name for name, cls in METHODS.items() if not cls.needs_weights)  # trained-weight methods: tests/test_stf.py, test_voco.py


def _inputs(model, seed: int = 0, n_before: int = 5, n_after: int = 7) -> dict:
    ids = prompt_ids(model, n_before, n_after, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels(seed)}


def _generate(model, inputs: dict, method=None, new_tokens: int = 6):
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if method is None:
        out = model.generate(**inputs, **kwargs)
        counts = None
    else:
        with compress(model, method) as engine:
            out = model.generate(**engine.prepare(inputs), **kwargs)
            counts = engine.applied_image_tokens_per_layer
    new = out.sequences[:, -new_tokens:]
    return new, torch.stack(out.logits, dim=1), counts


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.skip(reason=NO_KEEP_ALL[name])) if name in NO_KEEP_ALL else name for name in METHOD_NAMES
])
def test_keep_all_configuration_equals_vanilla(tiny, name, attn):
    model = tiny(attn)
    inputs = _inputs(model)
    with torch.no_grad():
        reference = model(**inputs).logits
        with compress(model, get_method(name, **KEEP_ALL[name])) as engine:
            logits = model(**engine.prepare(inputs)).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    tokens, step_logits, _ = _generate(model, inputs, get_method(name, **KEEP_ALL[name]))
    ref_tokens, ref_logits, _ = _generate(model, inputs)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(step_logits, ref_logits, atol=1e-5, rtol=1e-5)


ORACLE_CASES = {
    "fastv": (
        {"layer": 2, "drop_ratio": 0.5},
        lambda: OraclePlan("fastv", {2: 32}, "keep"),
    ),
    "pdrop": (
        {"layers": (1, 3), "keep_ratio": 0.5},
        lambda: OraclePlan("pdrop", {1: 32, 3: 16}, "compact"),
    ),
    "llavolta": (
        {"layer": 2, "stride": 4},
        lambda: OraclePlan("llavolta", {2: 4}, "pooled"),
    ),
    "llavolta-layer0": (
        {"layer": 0, "stride": 8},
        lambda: OraclePlan("llavolta", {0: 8}, "pooled"),
    ),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_prefill_equals_oracle_fed_only_the_surviving_tokens(tiny, case):
    """fastv: kept tokens with original positions; pdrop: compacted; llavolta: pooled, floored mean."""
    params, plan = ORACLE_CASES[case]
    model = tiny("eager")
    inputs = _inputs(model, seed=3)
    n_after = 7
    with torch.no_grad(), compress(model, get_method(case.split("-")[0], **params)):
        logits = model(**inputs, use_cache=False).logits[0]
    embeds = prompt_embeddings(model, inputs["input_ids"], inputs["pixel_values"])
    is_image = (inputs["input_ids"] == model.config.image_token_index)[0]
    expected = oracle_logits(model, embeds, is_image, plan())
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits[-n_after:], expected[-n_after:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_cached_decode_equals_uncached_oracle(tiny, case):
    """Greedy decoding with per-layer compressed KV caches equals rerunning the whole sequence
    each step with the keep-set of the first prefill and every generated token kept."""
    params, plan = ORACLE_CASES[case]
    model = tiny("eager")
    inputs = _inputs(model, seed=5)
    tokens, step_logits, _ = _generate(model, inputs, get_method(case.split("-")[0], **params), new_tokens=6)
    expected_tokens, expected_logits = oracle_greedy(model, inputs["input_ids"], inputs["pixel_values"], plan(), 6)
    assert tokens[0].tolist() == expected_tokens
    torch.testing.assert_close(step_logits[0], torch.stack(expected_logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_left_padded_batch_equals_prompts_run_one_by_one(tiny, name, attn):
    model = tiny(attn)
    method = get_method(name, **TINY_DEFAULTS[name])
    prompts = [prompt_ids(model, n_before, n_after, seed) for seed, (n_before, n_after) in enumerate([(2, 3), (6, 9), (4, 1)])]
    images = torch.cat([pixels(seed) for seed in range(3)])
    singles = [
        _generate(model, {"input_ids": p, "attention_mask": torch.ones_like(p), "pixel_values": images[i : i + 1]}, method, 4)
        for i, p in enumerate(prompts)
    ]
    ids, mask = left_pad(prompts, model.config.pad_token_id or 0)
    batch_tokens, batch_logits, _ = _generate(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": images}, method, 4)
    for row, (tokens, logits, _) in enumerate(singles):
        assert batch_tokens[row].tolist() == tokens[0].tolist()
        torch.testing.assert_close(batch_logits[row], logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_applied_counts_equal_image_tokens_per_layer(tiny, name):
    model = tiny("sdpa")
    method = get_method(name, **TINY_DEFAULTS[name])
    _, _, counts = _generate(model, _inputs(model), method, new_tokens=2)
    n_layers = model.config.text_config.num_hidden_layers
    if method.adaptive:  # its count comes from the image: the engine applies it at the LLM's input
        assert len(set(counts)) == 1 and counts[0] == int(_kept_by_the_tower(model, method).sum())
    else:
        assert counts == method.image_tokens_per_layer(64, n_layers)
    if name != "vanilla":
        assert counts != [64] * n_layers  # the default configuration really compresses


def _kept_by_the_tower(model, method) -> torch.Tensor:
    """What an adaptive method's tower selection made real on `_inputs(model)`, read on its own."""
    with torch.no_grad(), compress(model, method) as engine:
        model(**_inputs(model))
    return engine.tower_kept


def test_hooks_are_removed_on_exit_even_after_an_error(tiny):
    model = tiny("sdpa")
    inputs = _inputs(model)
    with torch.no_grad():
        reference = model(**inputs).logits
    with pytest.raises(RuntimeError, match="boom"):
        with compress(model, get_method("fastv")):
            raise RuntimeError("boom")
    layers = model.model.language_model.layers
    assert all(not layer._forward_pre_hooks for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference)


def test_compressed_kv_cache_holds_only_kept_tokens(tiny):
    model = tiny("sdpa")
    inputs = _inputs(model)
    with torch.no_grad(), compress(model, get_method("fastv", layer=2, drop_ratio=0.75)):
        cache = returned_cache(model(**inputs, use_cache=True))
    length = inputs["input_ids"].shape[1]
    assert cache_layer_lengths(cache) == [length, length, length - 48, length - 48]


def test_gradients_flow_through_the_engine(tiny):
    """Compression-aware training needs autograd through kept and pooled tokens."""
    model = tiny("sdpa")
    inputs = _inputs(model)
    for name in ("fastv", "llavolta", "pdrop"):
        model.zero_grad()
        with compress(model, get_method(name, **TINY_DEFAULTS[name])):
            logits = model(**inputs).logits  # compressed length: score the answer positions only
            loss = torch.nn.functional.cross_entropy(logits[0, -3:], inputs["input_ids"][0, -3:])
        loss.backward()
        grad = model.model.multi_modal_projector.linear_1.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_teacher_forced_answer_does_not_change_what_is_kept(tiny, name):
    """Training appends the answer after the prompt; with `prompt_length` set, scoring uses the last
    prompt token and ignores the answer, so the prompt's logits equal those of the prompt alone."""
    model = tiny("sdpa")
    prompt = _inputs(model)
    answer = torch.tensor([[17, 23, 2]])
    ids = torch.cat([prompt["input_ids"], answer], dim=1)
    full = dict(prompt, input_ids=ids, attention_mask=torch.ones_like(ids))
    length = prompt["input_ids"].shape[1]
    method = get_method(name, **TINY_DEFAULTS[name])
    with torch.no_grad(), compress(model, method) as engine:
        alone = model(**prompt).logits
        kept_alone = list(engine.applied_image_tokens_per_layer)
        engine.prompt_length = length
        forced = model(**full).logits
        engine.prompt_length = None
        unguarded = model(**full).logits
    assert engine.applied_image_tokens_per_layer == kept_alone
    torch.testing.assert_close(forced[:, : alone.shape[1]], alone)
    # without it, the last answer token picks the tokens: the prompt's logits change
    assert not torch.allclose(unguarded[:, : alone.shape[1]], alone)


def test_pre_llm_method_without_prepare_fails_with_a_clear_error(tiny):
    from vtcbench.errors import VtcbenchError

    model = tiny("sdpa")
    with compress(model, get_method("avgpool")), pytest.raises(VtcbenchError, match=r"engine.prepare\(inputs\)"):
        model(**_inputs(model))


def _next_inputs(processor, size=(80, 60)):
    from PIL import Image

    image = Image.new("RGB", size, (200, 30, 60))
    return dict(processor(images=[image], text=["USER: <image>\nWhat color is it? ASSISTANT:"], return_tensors="pt"))


@pytest.mark.parametrize("name", ["fastv", "pdrop", "vico", "llavolta", "random", "kmeans"])
def test_llava_next_keep_all_equals_vanilla_and_compression_follows_the_plan(tiny_next, name):
    """AnyRes prompts carry crops and newline tokens; the engine treats all of them as image tokens."""
    model, processor = tiny_next
    inputs = _next_inputs(processor)
    n_image = int((inputs["input_ids"] == model.config.image_token_index).sum())
    with torch.no_grad():
        reference = model(**inputs).logits
        keep_all = dict(KEEP_ALL[name], **({"clusters": n_image} if name == "kmeans" else {}))
        with compress(model, get_method(name, **keep_all)):
            torch.testing.assert_close(model(**inputs).logits, reference, atol=1e-5, rtol=1e-5)
    params = dict(TINY_DEFAULTS[name], **({"stride": 1} if name == "llavolta" else {}))
    method = get_method(name, **params)
    _, _, counts = _generate(model, inputs, method, new_tokens=3)
    assert counts == method.image_tokens_per_layer(n_image, 4)


def test_llava_next_refuses_pre_llm_pooling(tiny_next):
    from vtcbench.errors import VtcbenchError

    model, _ = tiny_next
    with pytest.raises(VtcbenchError, match="cannot run on the llava_next family"):
        with compress(model, get_method("avgpool")):
            pass


@pytest.mark.parametrize("name", ["fastv", "pdrop", "llavolta", "kmeans"])
def test_eager_equals_sdpa_under_compression(tiny, name):
    method = get_method(name, **TINY_DEFAULTS[name])
    eager_tokens, eager_logits, _ = _generate(tiny("eager"), _inputs(tiny("eager"), seed=7), method)
    sdpa_tokens, sdpa_logits, _ = _generate(tiny("sdpa"), _inputs(tiny("sdpa"), seed=7), method)
    assert eager_tokens.tolist() == sdpa_tokens.tolist()
    torch.testing.assert_close(eager_logits, sdpa_logits, atol=1e-4, rtol=1e-4)


def test_a_decode_step_in_a_form_the_seam_does_not_know_fails_loudly(tiny):
    """Were transformers to rename the cache argument again, the engine must stop, not take each
    decode step for a new prompt and count zero visual tokens (what 5.24's rename did)."""
    model = tiny("sdpa")
    inputs = _inputs(model)
    length = inputs["input_ids"].shape[1]
    step = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, length + 1, dtype=torch.long)}
    with torch.no_grad(), compress(model, get_method("fastv")):
        cache = returned_cache(model(**inputs, use_cache=True))
        with pytest.raises(TransformersConventionError, match="the KV cache arrived as 'kv_store'"):
            model.model(**step, kv_store=cache)
        with pytest.raises(TransformersConventionError, match=f"1 new tokens under a {length + 1}-column attention mask"):
            model.model(**step)
