"""Does `--batch-size` pay? The same generate requests through vtcbench's lmms-eval model at
batch 1 and batch B, side by side in one process; predictions must match, time should fall.

Default: the tiny random-weight LLaVA (64 image tokens, 4 layers) with fastv, 32 requests of
up to 8 new tokens, on whatever device is present. Run: python benchmarks/batching.py [--batch 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from PIL import Image

from vtcbench.lmms_model import VtcbenchLMM
from vtcbench.methods import get_method
from vtcbench.models import load_model
from vtcbench.results import RunFolder


def requests(n: int) -> tuple[list[Instance], list[dict]]:
    docs = [{"image": Image.new("RGB", (56, 56), (37 * i % 256, 91 * i % 256, 53 * i % 256)),
             "question": "What color is the square? " + "Look closely. " * (i % 4)} for i in range(n)]
    made = []
    for doc_id, doc in enumerate(docs):
        args = (doc["question"], {"max_new_tokens": 8}, lambda d: [d["image"]], doc_id, "bench", "test")
        made.append(Instance("generate_until", args, idx=0, metadata={"task": "bench", "doc_id": doc_id, "repeats": 1}))
    return made, docs


def timed(model, processor, method, batch_size: int, n: int, folder: Path) -> tuple[float, list[str]]:
    run = RunFolder.open(folder, {"model": "tiny", "method": method.name, "batch": batch_size}, {"git_revision": "bench"})
    lmm = VtcbenchLMM(model, processor, method, run, batch_size=batch_size, show_progress=False)
    batch, docs = requests(n)
    lmm.task_dict = {"bench": {"test": docs}}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    answers = lmm.generate_until(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load_model("tiny", random_weights=True, device=device)
    method = get_method("fastv")
    with tempfile.TemporaryDirectory() as scratch:
        timed(model, processor, method, args.batch, 8, Path(scratch) / "warmup")
        single, single_answers = timed(model, processor, method, 1, args.requests, Path(scratch) / "one")
        batched, batched_answers = timed(model, processor, method, args.batch, args.requests, Path(scratch) / "many")
    assert single_answers == batched_answers, "batched predictions differ from batch 1"
    print(f"{device}, tiny LLaVA + fastv, {args.requests} requests: batch 1 {single:.2f} s, batch {args.batch} "
          f"{batched:.2f} s, speedup {single / batched:.2f}x, predictions identical")


if __name__ == "__main__":
    main()
