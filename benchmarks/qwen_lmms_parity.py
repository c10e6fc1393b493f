"""Answers of `vtcbench run` on a Qwen2.5-VL against lmms-eval 0.7.3's own `qwen2_5_vl` class:
the same weights (a random-weight tiny-qwen2.5-vl saved to a folder with its offline processor),
the same vtcshapes questions, identical answers required (vanilla, and fastv at keep-all).

lmms-eval's class runs as users run it: constructed on the folder with its default pixel bounds,
`batch_size=1`, driven by lmms-eval's `simple_evaluate`. `device_map="cpu"` is the one argument
besides `device`: its default, "auto", sends the inputs to "cuda" whatever `device` says. The
class loads the weights in bfloat16 whatever the folder holds, so vtcbench runs with
`--dtype bfloat16`.

Not a CI test: the class needs `qwen_vl_utils` (which imports torchvision at import) and a
Qwen2.5-VL processor from `AutoProcessor` (whose video processor needs torchvision), and
torchvision does not load beside the CPU torch of the README's install. Run it where torchvision
loads (a PyPI torch and its torchvision, CPU or GPU), with `pip install decord qwen-vl-utils`:

    python benchmarks/qwen_lmms_parity.py [--samples 40]

Prints the timings and the count of identical answers; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def reference_answers(folder: Path, samples: int) -> dict[int, str]:
    """lmms-eval's own class on the first `samples` vtcshapes questions, by doc id."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL

    from vtcbench.runner import load_tasks, task_names
    from vtcbench.tasks import resolve_tasks

    model = Qwen2_5_VL(pretrained=str(folder), device="cpu", device_map="cpu", batch_size=1)
    with tempfile.TemporaryDirectory() as workdir:
        names, manager = task_names(resolve_tasks(["vtcshapes"]), None, Path(workdir))
        results = simple_evaluate(
            model=model, tasks=load_tasks(names, manager), task_manager=manager, limit=samples, log_samples=True,
            cli_args=argparse.Namespace(output_path=workdir, process_with_media=True), verbosity="ERROR",
        )
    return {int(s["doc_id"]): s["resps"][0][0] for s in results["samples"][names[0]]}


def vtcbench_answers(folder: Path, samples: int, method: str, *settings: str) -> dict[int, str]:
    """`vtcbench run` on the folder (bfloat16, as the class loads it), by doc id."""
    from vtcbench.cli import app

    with tempfile.TemporaryDirectory() as out:
        args = ["run", "--model", str(folder), "--method", method, "--tasks", "vtcshapes", "--limit", str(samples),
                "--dtype", "bfloat16", "--device", "cpu", "--out", out]
        for setting in settings:
            args += ["--set", setting]
        app(args, standalone_mode=False)
        (run_folder,) = [p for p in Path(out).iterdir() if p.is_dir()]
        records = [json.loads(line) for line in (run_folder / "samples.jsonl").read_text().splitlines()]
    return {int(r["doc_id"]): r["prediction"] for r in records}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()

    from vtcbench.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny-qwen2.5-vl"
        model, processor = load_model("tiny-qwen2.5-vl", random_weights=True)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        started = time.perf_counter()
        reference = reference_answers(folder, args.samples)
        print(f"lmms-eval qwen2_5_vl: {len(reference)} answers in {time.perf_counter() - started:.1f} s")
        failed = not any(reference.values())
        if failed:
            print("every reference answer is empty: the comparison would prove nothing")
        for label, method, settings in (("vanilla", "vanilla", ()), ("fastv keep-all", "fastv", ("drop_ratio=0",))):
            started = time.perf_counter()
            answers = vtcbench_answers(folder, args.samples, method, *settings)
            same = sum(answers.get(doc) == text for doc, text in reference.items())
            print(f"vtcbench {label}: {same}/{len(reference)} identical, {time.perf_counter() - started:.1f} s")
            for doc, text in sorted(reference.items()):
                if answers.get(doc) != text:
                    print(f"  doc {doc}: lmms-eval {text!r}, vtcbench {answers.get(doc)!r}")
            failed |= same != len(reference)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
