"""vtcbench's own cost: vanilla through vtcbench's generation loop (the lmms-eval model with its
durable run folder) against a plain `model.generate` loop on the same requests, side by side.

The plain loop is what lmms-eval's own `llava_hf` does per request: the doc's visuals (a
dataset row, whose image is decoded on access), processor, greedy `generate`, decode. Both see identical prompts (the vicuna_v1 template vtcbench builds) and must
give identical answers. The two take turns on chunks of 10 questions (ABBA), so the drift of a
shared machine (on this project's 2-core VM, +-10% between minutes) hits both alike; the
throughput ratio is plain's total time over vtcbench's, with the range of the rounds' own
ratios beside it. Default: vtc-tiny on
200 held-out vtcshapes questions, batch 1, one CPU thread (where per-sample costs show most).

    python benchmarks/overhead.py [--samples 200] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance

from vtcbench import shapes
from vtcbench.families import family_of
from vtcbench.families.llava import vicuna_v1_prompt
from vtcbench.lmms_model import VtcbenchLMM
from vtcbench.methods import get_method
from vtcbench.models import load_model
from vtcbench.results import RunFolder
from vtcbench.tasks.vtcshapes.utils import vtcshapes_doc_to_visual

MAX_NEW_TOKENS = 4  # the vtcshapes task's generation_kwargs
CHUNK = 10  # questions per turn


def documents(n: int):
    """The first `n` held-out vtcshapes questions as lmms-eval holds them: a `datasets.Dataset`."""
    import datasets

    data = datasets.load_dataset("parquet", data_files={"test": str(shapes.default_dataset())}, split="test")
    return data.select(range(n))


def plain_generate(model, processor, docs, doc_ids: range) -> list[str]:
    """lmms-eval's llava_hf loop, reduced to what it computes: visuals, encode, generate, decode."""
    answers, system = [], family_of(model.config).system_prompt(model.config)
    for doc_id in doc_ids:
        doc = docs[doc_id]
        prompt = vicuna_v1_prompt(doc["question"], 1, system=system)
        inputs = processor(images=vtcshapes_doc_to_visual(doc), text=prompt, return_tensors="pt").to(model.device)
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        tokens = output[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return answers


def vtcbench_model(model, processor, docs, folder: Path) -> VtcbenchLMM:
    """What `vtcbench run` drives: vtcbench's lmms-eval model over a fresh, durable run folder."""
    run = RunFolder.open(folder, {"model": "vtc-tiny", "method": "vanilla"}, {"git_revision": "overhead"})
    lmm = VtcbenchLMM(model, processor, get_method("vanilla"), run, batch_size=1, show_progress=False)
    lmm.task_dict = {"bench": {"test": docs}}
    return lmm


def requests(docs) -> list[Instance]:
    """lmms-eval's requests for the docs (generate_until with the task's kwargs, its default `until`)."""
    return [
        Instance(
            "generate_until",
            (doc["question"], {"max_new_tokens": MAX_NEW_TOKENS, "until": ["\n\n"]}, vtcshapes_doc_to_visual, doc_id, "bench", "test"),
            idx=0,
            metadata={"task": "bench", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each, alternating")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model("vtc-tiny")
    docs = documents(args.samples)
    all_requests = requests(docs)
    chunks = [range(start, min(start + CHUNK, len(docs))) for start in range(0, len(docs), CHUNK)]
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        plain_generate(model, processor, docs, range(CHUNK))  # warm-up, both paths
        vtcbench_model(model, processor, docs, Path(scratch) / "warmup").generate_until(all_requests[:CHUNK])
        for round_index in range(args.rounds):
            lmm = vtcbench_model(model, processor, docs, Path(scratch) / str(round_index))  # opened once per run
            seconds = {"plain": 0.0, "vtcbench": 0.0, "plain_cpu": 0.0, "vtcbench_cpu": 0.0}
            for chunk_index, chunk in enumerate(chunks):
                order = ("plain", "vtcbench") if chunk_index % 2 == 0 else ("vtcbench", "plain")
                for name in order:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    if name == "plain":
                        reference = plain_generate(model, processor, docs, chunk)
                    else:
                        answers = lmm.generate_until([all_requests[i] for i in chunk])
                    seconds[name] += time.perf_counter() - start
                    seconds[f"{name}_cpu"] += time.process_time() - start_cpu
                if answers != reference:
                    raise SystemExit("vtcbench's answers differ from plain generate's")
            rounds.append(seconds)
    samples = args.samples * args.rounds
    print(f"vtc-tiny, vanilla, {args.samples} vtcshapes questions x {args.rounds} rounds, batch 1, {args.threads} thread(s), "
          f"taking turns every {CHUNK} questions; same answers")
    for clock, suffix in (("wall clock", ""), ("CPU time", "_cpu")):
        ratios = sorted(r["plain" + suffix] / r["vtcbench" + suffix] for r in rounds)
        plain, ours = (sum(r[name + suffix] for r in rounds) for name in ("plain", "vtcbench"))
        print(f"{clock}: plain model.generate {samples / plain:.1f} samples/s, vtcbench {samples / ours:.1f} samples/s; "
              f"throughput ratio vtcbench/plain {plain / ours:.3f} (rounds: {ratios[0]:.3f} to {ratios[-1]:.3f})")


if __name__ == "__main__":
    main()
