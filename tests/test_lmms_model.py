"""vtcbench's lmms-eval model on hand-built requests: batching, resume, records, no swallowed errors."""

from __future__ import annotations

import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

from vtcbench.families.llava import vicuna_v1_prompt
from vtcbench.lmms_model import VtcbenchLMM
from vtcbench.methods import get_method
from vtcbench.models import load_model
from vtcbench.results import RunFolder

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple"]


@pytest.fixture(scope="module")
def tiny_with_processor():
    return load_model("tiny", random_weights=True)


def _docs() -> list[dict]:
    return [
        {"image": Image.new("RGB", (40 + 7 * i, 56), colour), "question": f"What color is {'the ' * i}square?"}
        for i, colour in enumerate(COLOURS)
    ]


def _requests(kind: str = "generate_until") -> list[Instance]:
    to_visual = lambda doc: [doc["image"]]
    requests = []
    for doc_id, doc in enumerate(_docs()):
        if kind == "generate_until":
            args = (doc["question"], {"max_new_tokens": 4, "until": ["\n\n"]}, to_visual, doc_id, "toy", "test")
        else:
            args = (doc["question"], " red", to_visual, doc_id, "toy", "test")
        requests.append(Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "toy", "doc_id": doc_id, "repeats": 1}))
    return requests


def _lmm(model_and_processor, tmp_path, method="fastv", batch_size=1) -> VtcbenchLMM:
    model, processor = model_and_processor
    folder = RunFolder.open(tmp_path, {"model": "tiny", "method": method, "batch": batch_size}, {"git_revision": "x"})
    lmm = VtcbenchLMM(model, processor, get_method(method), folder, batch_size=batch_size, show_progress=False)
    lmm.task_dict = {"toy": {"test": _docs()}}
    return lmm


def test_prompt_is_llava_vicuna_v1():
    assert vicuna_v1_prompt("What is it?", 1) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT:"
    )


def test_batch_of_four_equals_batch_of_one_and_records_every_sample(tiny_with_processor, tmp_path):
    single = _lmm(tiny_with_processor, tmp_path / "one", batch_size=1)
    batched = _lmm(tiny_with_processor, tmp_path / "four", batch_size=4)
    assert single.generate_until(_requests()) == batched.generate_until(_requests())
    records = sorted(batched.run.finished.values(), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in records] == list(range(len(COLOURS)))
    assert {r["batch_size"] for r in records} == {4, 3}
    for r in records:
        assert r["image_tokens_per_layer"] == [64, 64, 32, 32] and r["image_tokens"] == 64
        assert r["prefill_ms"] > 0 and 1 <= r["new_tokens"] <= 4


def test_resume_reuses_finished_samples_without_recomputing(tiny_with_processor, tmp_path):
    first = _lmm(tiny_with_processor, tmp_path)
    answers = first.generate_until(_requests())
    resumed = _lmm(tiny_with_processor, tmp_path)
    assert len(resumed.run.finished) == len(COLOURS)
    resumed._generate_batch = None  # any recomputation would fail
    assert resumed.generate_until(_requests()) == answers
    assert len(resumed.run.samples_path.read_text().splitlines()) == len(COLOURS)


def test_loglikelihood_is_the_continuations_loss(tiny_with_processor, tmp_path):
    """lmms-eval's convention (its llava_hf; its multiple-choice scoring takes the argmin):
    the mean negative log-likelihood of the continuation's tokens."""
    lmm = _lmm(tiny_with_processor, tmp_path, method="vanilla")
    score, greedy = lmm.loglikelihood(_requests("loglikelihood"))[0].text
    model, processor = tiny_with_processor
    doc = _docs()[0]
    full = processor(images=[doc["image"]], text=vicuna_v1_prompt(doc["question"], 1, "red"), return_tensors="pt")
    with torch.no_grad():
        logits = model(**full).logits[0].float()
    target = full["input_ids"][0, -1]
    assert score == pytest.approx(-float(logits[-2].log_softmax(-1)[target]), abs=1e-4)
    assert greedy == bool(logits[-2].argmax() == target)


def test_a_generation_error_propagates(tiny_with_processor, tmp_path):
    lmm = _lmm(tiny_with_processor, tmp_path)
    requests = _requests()
    requests[2].arguments = (requests[2].arguments[0], {"temperature": 0.7}, *requests[2].arguments[2:])
    with pytest.raises(ValueError, match="greedily"):
        lmm.generate_until(requests)


def test_clean_keeps_the_model(tiny_with_processor, tmp_path):
    lmm = _lmm(tiny_with_processor, tmp_path)
    lmm.clean()
    assert isinstance(lmm.model, torch.nn.Module)


def test_fidelity_compares_with_vanilla_on_the_same_samples(tiny_with_processor, tmp_path):
    model, processor = tiny_with_processor
    results = {}
    for name, params in (("keep-all", {"drop_ratio": 0.0}), ("half", {"drop_ratio": 0.5})):
        folder = RunFolder.open(tmp_path, {"model": "tiny", "method": name}, {"git_revision": "x"})
        lmm = VtcbenchLMM(model, processor, get_method("fastv", **params), folder, batch_size=3, show_progress=False,
                          fidelity=True)
        lmm.task_dict = {"toy": {"test": _docs()}}
        answers = lmm.generate_until(_requests())
        records = sorted(folder.finished.values(), key=lambda r: r["doc_id"])
        assert [r["prediction"] for r in records] == answers
        results[name] = records
    for record in results["keep-all"]:
        assert record["agrees_with_vanilla"] and record["prediction"] == record["vanilla_prediction"]
        assert record["first_token_kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["first_token_kl"] > 1e-6 for r in results["half"])  # half the image tokens change the distribution
    assert [r["vanilla_prediction"] for r in results["half"]] == [r["vanilla_prediction"] for r in results["keep-all"]]


def test_multi_round_follows_lmms_eval_protocol(tiny_with_processor, tmp_path):
    """Round 0 from the request, then `doc_to_text(doc, previous_output=..., round_idx=...)` until terminal."""
    lmm = _lmm(tiny_with_processor, tmp_path)
    calls = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        calls.append((round_idx, list(previous_output)))
        terminal = round_idx == 2
        return [doc["image"]], "And now?", terminal, list(previous_output), {"round": round_idx}

    doc_to_visual = lambda doc: [doc["image"]]
    request = Instance(
        request_type="generate_until_multi_round",
        arguments=("First question?", {"max_new_tokens": 2}, doc_to_visual, doc_to_text, 0, "toy", "test"),
        idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1},
    )
    (rounds,) = lmm.generate_until_multi_round([request])
    assert len(rounds) == 2 and [c[0] for c in calls] == [1, 2] and calls[1][1] == rounds
