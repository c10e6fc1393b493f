"""The README's method tables: each method on vtcshapes with a shipped model (vtc-tiny, or
vtc-tiny-qwen with --model), through
`vtcbench run` (lmms-eval, the held-out split), one run folder per method under --out.

Methods run at their defaults (docs/methods.md), scaled to vtc-tiny's 6 layers where a
default is a layer list (PyramidDrop: L/4, L/2, 3L/4 = 1, 3, 4). Prints a markdown table of
accuracy per question family, mean visual tokens per layer and analytic image TFLOPs.
Rerunning resumes (finished runs are read back). Run: python benchmarks/vtcshapes_methods.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vtcbench.methods import get_method
from vtcbench.runner import RunConfig, run
from vtcbench.shapes import FAMILIES

METHODS = ("vanilla", "fastv", "pdrop", "llavolta", "random", "avgpool")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vtc-tiny", help="vtc-tiny or vtc-tiny-qwen (pre-LLM avgpool runs on vtc-tiny only)")
    parser.add_argument("--methods", default=None, help=f"default: {','.join(METHODS)} (without avgpool on a Qwen model)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keep-indices", type=int, default=0, help="record kept tokens of the first N questions")
    args = parser.parse_args()

    from vtcbench.families import family_of
    from vtcbench.models import load_config

    family = family_of(load_config(args.model))
    methods = args.methods.split(",") if args.methods else [m for m in METHODS if family.refusal(get_method(m)) is None]
    rows = []
    for method in methods:
        config = RunConfig(
            model=args.model, method=method, tasks=["vtcshapes"], out=args.out, batch_size=args.batch_size,
            keep_indices=args.keep_indices, show_progress=False,
        )
        summary = run(config).summary
        (entry,) = summary["tasks"].values()
        metrics = {key.split(",")[0]: value for key, value in entry["metrics"].items()}
        tokens = entry["mean_image_tokens_per_layer"]
        rows.append(
            f"| {method} | "
            + " | ".join(f"{100 * metrics[k]:.1f}" for k in (*FAMILIES, "overall"))
            + f" | {sum(tokens) / len(tokens):.1f} | {1e6 * entry['tflops_image']:.1f} |"
        )
    print(f"| method | {' | '.join(FAMILIES)} | overall | visual tokens / layer | image MFLOPs |")
    print("|---" * (len(FAMILIES) + 4) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
