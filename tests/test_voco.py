"""VoCo-LLaMA: the masked single pass (a) equals the compressed-cache form (b); the mask; reuse; refusal; FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vtcbench import transformers_seam as seam
from vtcbench.errors import VtcbenchError
from vtcbench.families import FAMILIES, family_of, model_facts
from vtcbench.methods import get_method
from vtcbench.models import load_config, load_model
from vtcbench.voco import (
    Row,
    VocoCache,
    add_voco_token,
    attention_mask,
    generate,
    position_ids,
    prefill,
    single_pass_generate,
    single_pass_logits,
    voco_prompt,
    voco_span,
)

K = 2
QUESTIONS = ("what color is the dog ?", "is there a red ball on the left of the table ?")


@pytest.fixture(scope="module")
def voco_model():
    """voco_model(attn) -> (tiny random LLaVA with `<voco>` added, its processor, the token's id)."""
    built: dict[str, tuple] = {}

    def get(attn: str = "eager"):
        if attn not in built:
            model, processor = load_model("tiny", random_weights=True, attn_implementation=attn)
            token = add_voco_token(model, processor)
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(0)
                model.get_input_embeddings().weight[token].normal_()  # a distinct, trained-looking row
            built[attn] = (model, processor, token)
        return built[attn]

    return get


def images(*seeds: int) -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(s).rand(56, 56, 3) * 255).astype("uint8")) for s in seeds]


def batch(processor, questions=QUESTIONS, seeds=(0, 1), system: str = "") -> dict:
    return dict(processor(images=images(*seeds), text=[voco_prompt(q, K, system) for q in questions],
                          return_tensors="pt", padding=True))


def rows_of(inputs: dict) -> list[Row]:
    """The unpadded prompts of a left-padded batch, one image each."""
    return [Row(ids[ok.bool()], inputs["pixel_values"][r : r + 1]) for r, (ids, ok) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"]))]


def text_lengths(inputs: dict, token: int) -> list[int]:
    _, last = voco_span(inputs["input_ids"], token, K)
    return [inputs["input_ids"].shape[1] - int(end) - 1 for end in last]


def test_prompt_layout(voco_model):
    """BOS, the image, the VoCo tokens, then the text; every row has K adjacent VoCo tokens after its image."""
    model, processor, token = voco_model()
    inputs = batch(processor)
    for ids, ok in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids = ids[ok.bool()]
        image = (ids == model.config.image_token_index).nonzero().flatten()
        assert ids[0] == processor.tokenizer.bos_token_id
        assert image.tolist() == list(range(1, 65))
        assert ids[65 : 65 + K].tolist() == [token] * K  # the whitespace tokenizer drops the "\n" separators


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_single_pass_equals_compressed_cache(voco_model, attn):
    """(a) one masked forward == (b) VoCo entries kept, text run against them: the text's logits, batch 2 padded."""
    model, processor, token = voco_model(attn)
    inputs = batch(processor)
    with torch.no_grad():
        single = single_pass_logits(model, inputs, token, K)
        state = prefill(model, rows_of(inputs), voco_id=token, voco_tokens=K, store=VocoCache(), pad_token_id=3, logits_to_keep=0)
    for row, n in enumerate(text_lengths(inputs, token)):
        torch.testing.assert_close(state.logits[row, -n:], single[row, -n:], atol=1e-5, rtol=1e-4)
    # and the mask matters: the same prompt without it gives other logits
    with torch.no_grad():
        plain = model(**inputs).logits
    assert not torch.allclose(plain[:, -1], single[:, -1], atol=1e-3)


def test_compressed_cache_holds_only_voco_and_later_entries(voco_model):
    """After the text forward, each layer holds K + text entries, equal to the single pass's at those positions."""
    model, processor, token = voco_model()
    inputs = batch(processor, QUESTIONS[:1], (0,))
    ids, padding = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        state = prefill(model, rows_of(inputs), voco_id=token, voco_tokens=K, store=VocoCache(), pad_token_id=3)
        mask = attention_mask(ids, padding, token, K, model.dtype)
        output = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(padding), pixel_values=inputs["pixel_values"], use_cache=True)
    full = seam.returned_cache(output)
    first, _ = voco_span(ids, token, K)
    kept = ids.shape[1] - int(first)
    assert seam.cache_layer_lengths(state.cache) == [kept] * len(full.layers)
    assert kept == K + text_lengths(inputs, token)[0]
    for ours, reference in zip(state.cache.layers, full.layers):
        torch.testing.assert_close(ours.keys, reference.keys[:, :, int(first) :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.values, reference.values[:, :, int(first) :], atol=1e-5, rtol=1e-4)


def test_keep_cache_entries_keeps_exactly_the_given_positions():
    from transformers.cache_utils import DynamicCache

    config = load_config("tiny").text_config
    cache = DynamicCache(config=config)
    keys = [torch.randn(2, 2, 7, 16) for _ in range(config.num_hidden_layers)]
    for layer, k in enumerate(keys):
        cache.update(k, -k, layer)
    seam.keep_cache_entries(cache, torch.tensor([0, 5, 6]))
    assert cache.get_seq_length() == 3
    for layer, k in zip(cache.layers, keys):
        assert torch.equal(layer.keys, k[:, :, [0, 5, 6]]) and torch.equal(layer.values, -k[:, :, [0, 5, 6]])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generation_equal_in_both_forms(voco_model, attn):
    model, processor, token = voco_model(attn)
    inputs = batch(processor)
    reference = single_pass_generate(model, inputs, token, K, max_new_tokens=4)
    ours = generate(model, rows_of(inputs), voco_id=token, voco_tokens=K, store=VocoCache(), max_new_tokens=4,
                    eos_token_id=None, pad_token_id=3)
    assert torch.equal(ours, reference)
    alone = [generate(model, [row], voco_id=token, voco_tokens=K, store=VocoCache(), max_new_tokens=4, eos_token_id=None,
                      pad_token_id=3) for row in rows_of(inputs)]
    assert torch.equal(torch.cat(alone), ours)  # batch == single


def test_text_tokens_pay_exactly_zero_attention_to_the_image_and_bos(voco_model):
    """Eager attention weights: rows after the VoCo tokens are 0 on BOS and image; VoCo rows see the image."""
    model, processor, token = voco_model("eager")
    inputs = batch(processor)
    ids, padding = inputs["input_ids"], inputs["attention_mask"]
    mask = attention_mask(ids, padding, token, K, model.dtype)
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(padding),
                       pixel_values=inputs["pixel_values"], output_attentions=True)
    first, last = voco_span(ids, token, K)
    for layer in output.attentions:
        for row in range(ids.shape[0]):
            before = slice(0, int(first[row]))  # padding, BOS, the image
            text = slice(int(last[row]) + 1, None)
            assert layer[row, :, text, before].abs().max().item() == 0.0
            assert (layer[row, :, text, int(first[row]) :].sum(-1) - 1).abs().max() < 1e-5
            voco = slice(int(first[row]), int(last[row]) + 1)
            image = ids[row] == model.config.image_token_index
            assert (layer[row, :, voco][..., image].sum(-1) > 0).all()


def test_mask_boundaries_single_voco_token():
    """K=1: the one VoCo row sees everything before it; the next row sees only the VoCo column onwards."""
    ids = torch.tensor([[3, 1, 4, 4, 9, 7, 8]])
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    allowed = attention_mask(ids, padding, 9, 1, torch.float32)[0, 0] == 0
    assert allowed[4].tolist() == [False, True, True, True, True, False, False]
    assert allowed[5].tolist() == [False, False, False, False, True, True, False]
    assert allowed[6].tolist() == [False, False, False, False, True, True, True]
    assert allowed[0].tolist() == [True] + [False] * 6  # a padding row sees only itself
    with pytest.raises(VtcbenchError, match="expected 2"):
        voco_span(ids, 9, 2)


def test_second_question_about_a_cached_image_skips_encoding(voco_model):
    model, processor, token = voco_model()
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    store = VocoCache()
    try:
        for question in QUESTIONS:
            inputs = batch(processor, (question,), (5,))
            generate(model, rows_of(inputs), voco_id=token, voco_tokens=K, store=store, max_new_tokens=2,
                     eos_token_id=None, pad_token_id=3)
    finally:
        handle.remove()
    assert len(calls) == 1 and (store.hits, store.misses) == (1, 1) and len(store.images) == 1
    # a different image is encoded again
    inputs = batch(processor, QUESTIONS[:1], (6,))
    generate(model, rows_of(inputs), voco_id=token, voco_tokens=K, store=store, max_new_tokens=1, eos_token_id=None, pad_token_id=3)
    assert (store.hits, store.misses) == (1, 2)


def test_profile_second_question_has_no_encoding_phase(voco_model):
    from vtcbench.profilers.voco import profile_voco

    model, _, token = voco_model()
    record = profile_voco(model, "tiny", get_method("voco", voco_tokens=K), voco_id=token, text_tokens=8, new_tokens=2,
                          iterations=1, warmup=0)
    first, second = record["questions"]
    assert first["image_encoding_ms"] > 0 and first["compression_pass_ms"] > 0
    assert second["image_encoding_ms"] == 0 and second["compression_pass_ms"] == 0
    assert second["kv_load_ms"] > 0 and second["transformer_forward_ms"] > 0
    facts = model_facts(model)
    per_entry = facts.n_layers * 2 * facts.n_kv_heads * facts.head_dim * 2
    storage = record["kv_storage_bytes_bf16"]
    assert storage == {"full_caching": (1 + 64) * per_entry, "voco_caching": K * per_entry, "no_caching": 0}


def test_checkpoint_without_the_token_is_refused(tiny):
    _, processor = load_model("tiny", random_weights=True)
    with pytest.raises(VtcbenchError, match="<voco>"):
        get_method("voco").token_id(tiny(), processor.tokenizer)


def test_cli_generate_refuses_a_checkpoint_without_the_token():
    from typer.testing import CliRunner

    from vtcbench.cli import app

    result = CliRunner().invoke(app, ["generate", "--method", "voco", "--model", "tiny", "--random-weights"])
    assert result.exit_code == 2 and "<voco>" in result.output


def test_cli_run_refuses_a_checkpoint_without_the_token_writing_nothing(tmp_path):
    from typer.testing import CliRunner

    from vtcbench.cli import app

    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", "--method", "voco", "--limit", "1", "--out", str(out)])
    assert result.exit_code == 2 and "<voco>" in result.output
    assert not out.exists()


def test_voco_tokens_boundaries():
    with pytest.raises(VtcbenchError, match="voco_tokens=0"):
        get_method("voco", voco_tokens="0")
    assert get_method("voco", voco_tokens="1").voco_tokens == 1


def test_flops_plan():
    """The text sees K VoCo entries in every layer; the papers' image-token FLOPs follow from K."""
    from vtcbench.profilers.flops import analytic_flops, layer_macs

    facts = model_facts(load_config("llava-1.5-7b"))
    for k in (1, 2, 128):
        report = analytic_flops(get_method("voco", voco_tokens=k), facts, model="llava-1.5-7b")
        assert report.image_tokens_per_layer == [k] * 32
        assert report.tflops_image == pytest.approx(32 * layer_macs(k, facts, grouped_query=False) / 1e12)
        assert report.compression_ratio == pytest.approx(576 / k)
    assert get_method("voco", voco_tokens=2).compression_pass_tokens(576) == 578


def test_voco_training_adds_the_token_trains_through_the_mask_and_saves_a_loadable_voco_model(tmp_path):
    """`vtcbench train --method voco` (random init, 4 steps): a folder that loads normally, keeps `<voco>`,
    answers through the efficient form, and reports held-out accuracy with voco."""
    import json

    from typer.testing import CliRunner

    from vtcbench.cli import app

    out = tmp_path / "voco"
    args = ["train", "--steps", "4", "--batch-size", "4", "--test-per-family", "1", "--time-every", "0",
            "--method", "voco", "--set", "voco_tokens=1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert set(json.loads((out / "training.json").read_text())["accuracy"]) == {"vanilla", "voco(voco_tokens=1)"}
    model, processor = load_model(str(out))
    token = get_method("voco", voco_tokens=1).token_id(model, processor.tokenizer)
    assert token == model.get_input_embeddings().num_embeddings - 1 == model.config.text_config.vocab_size - 1
    generated = CliRunner().invoke(app, ["generate", "--method", "voco", "--set", "voco_tokens=1", "--model", str(out)])
    assert generated.exit_code == 0, generated.output
    assert "visual tokens per layer (6 layers): 1" in generated.output


def test_training_inputs_carry_the_voco_mask_and_running_positions():
    from vtcbench.models import build_local_processor, random_model
    from vtcbench.training import Encoder, training_conversations, vocabulary

    config = load_config("vtc-tiny")
    model, processor = random_model(config), build_local_processor(config, vocabulary(""))
    method = get_method("voco", voco_tokens=K)
    method.prepare_training(model, processor)
    token = method.token_id(model, processor.tokenizer)
    batch = Encoder(processor.tokenizer, FAMILIES["llava"], 64, "", method.prompt)(training_conversations(0, set())(3))
    inputs = method.training_inputs(model, processor.tokenizer, batch.inputs)
    ids, padding = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    first, last = voco_span(ids, token, K)
    assert torch.equal(first + K - 1, last)
    assert torch.equal(inputs["attention_mask"], attention_mask(ids, padding, token, K, model.dtype))
    assert torch.equal(inputs["position_ids"], position_ids(padding))
    assert (inputs["position_ids"].gather(1, first[:, None]) == 65).all()  # BOS + 64 image tokens before it


def test_lmms_model_answers_through_the_compressed_cache(voco_model, tmp_path):
    """`vtcbench run`'s generation path: batch 3 == batch 1 == the single pass; a repeated image is reused."""
    from lmms_eval.api.instance import Instance

    from vtcbench.lmms_model import VtcbenchLMM
    from vtcbench.results import RunFolder

    model, processor, token = voco_model("sdpa")
    docs = [{"image": picture, "question": question} for picture, question in zip(images(0, 1, 0), (*QUESTIONS, "what is it ?"))]

    def requests(kind: str) -> list[Instance]:
        target = {"max_new_tokens": 3, "until": ["\n\n"]} if kind == "generate_until" else " red"
        return [Instance(request_type=kind, arguments=(doc["question"], target, lambda d: [d["image"]], i, "toy", "test"), idx=0,
                         metadata={"task": "toy", "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]

    def lmm(name: str, batch_size: int) -> VtcbenchLMM:
        folder = RunFolder.open(tmp_path / name, {"model": "tiny", "method": "voco", "batch": batch_size}, {"git_revision": "x"})
        built = VtcbenchLMM(model, processor, get_method("voco", voco_tokens=K), folder, batch_size=batch_size, show_progress=False)
        built.task_dict = {"toy": {"test": docs}}
        return built

    system = family_of(model.config).system_prompt(model.config)
    one, three = lmm("one", 1), lmm("three", 3)
    answers = one.generate_until(requests("generate_until"))
    assert three.generate_until(requests("generate_until")) == answers
    store = one._sessions[id(one.method)].store
    assert store.hits == 1 and len(store.images) == 2  # docs 0 and 2 share an image
    for doc, answer in zip(docs, answers):
        inputs = dict(processor(images=[doc["image"]], text=[voco_prompt(doc["question"], K, system)], return_tensors="pt"))
        new = single_pass_generate(model, inputs, token, K, max_new_tokens=3)
        assert answer == processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
    records = sorted(one.run.finished.values(), key=lambda r: r["doc_id"])
    assert [r["image_tokens_per_layer"] for r in records] == [[K] * 4] * 3
    assert [r["voco_cache_hits"] for r in records] == [0, 0, 1]
    scores = lmm("loglikelihood", 1).loglikelihood(requests("loglikelihood"))
    inputs = dict(processor(images=[docs[0]["image"]], text=[voco_prompt(docs[0]["question"], K, system) + " red"], return_tensors="pt"))
    logits = single_pass_logits(model, inputs, token, K)
    target = inputs["input_ids"][0, -1]
    assert scores[0].text[0] == pytest.approx(-float(logits[0, -2].log_softmax(-1)[target]), rel=1e-5)


def test_a_batch_mixing_visual_token_counts_is_refused_before_any_forward(voco_model):
    model, _, token = voco_model()
    image, voco = model.config.image_token_index, [token] * K
    rows = [Row(torch.tensor([1, *[image] * 64, *voco, 20, 21]), pixels)
            for pixels in (torch.zeros(1, 3, 56, 56), torch.ones(1, 3, 56, 56))]
    rows[1].input_ids = torch.cat([torch.tensor([1, 22]), rows[1].input_ids[1:]])  # one more token before the VoCo tokens
    with pytest.raises(VtcbenchError, match="different visual-token counts"):
        generate(model, rows, voco_id=token, voco_tokens=K, store=VocoCache(), max_new_tokens=1, eos_token_id=None, pad_token_id=3)


@pytest.mark.parametrize("extra", [["run", "--fidelity"], ["run", "--keep-indices", "2"], ["profile", "--train", "--random-weights"]])
def test_cli_refuses_options_voco_cannot_honour(extra):
    from typer.testing import CliRunner

    from vtcbench.cli import app

    result = CliRunner().invoke(app, [extra[0], "--method", "voco", "--model", "tiny", *extra[1:]])
    assert result.exit_code == 2 and "voco" in result.output
