"""The README's method tables: each method on vtcshapes with a shipped model (vtc-tiny, or
vtc-tiny-qwen with --model), through
`vtcbench run` (lmms-eval, the held-out split), one run folder per method under --out.

Methods run at their defaults (docs/methods.md), scaled to vtc-tiny's 6 layers where a
default is a layer list (PyramidDrop: L/4, L/2, 3L/4 = 1, 3, 4). Prints a markdown table of
accuracy per question family, mean visual tokens per layer and analytic image TFLOPs.
Rerunning resumes (finished runs are read back). Run: python benchmarks/vtcshapes_methods.py

With --budget (e.g. tokens=16), every training-free method the model's family runs is set to
that cost instead (`vtcbench run --budget`, docs/methods.md#budgets), vanilla as the reference.
A 16-token mean is out of reach on a 6-layer model for a method acting from layer 2, so the
single-layer in-LLM methods act from layer 1 (their first legal layer: `BUDGET_SETTINGS`), and
VisPruner splits its tokens half and half (its default 0.75 cannot pair 16 tokens of 64).
PruMerge+ runs at its own count (it has no knob: each image sets it). CDPruner reads the question
through the CLIP the model's tower belongs to: vtc-tiny's is the shipped `vtc-tiny-clip`
(`MODEL_SETTINGS`; `vtcbench train-clip`); the Qwen line has none and refuses it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vtcbench.methods import get_method
from vtcbench.runner import RunConfig, run
from vtcbench.shapes import FAMILIES

METHODS = ("vanilla", "fastv", "pdrop", "llavolta", "random", "avgpool")
#: settings the budget does not choose, with --budget (see the docstring)
BUDGET_SETTINGS = {
    "dart": {"layer": "1"}, "fastv": {"layer": "1"}, "kmeans": {"layer": "1"}, "llavolta": {"layer": "1"},
    "random": {"layer": "1"}, "vispruner": {"important_ratio": "0.5"},
}
#: settings a model needs, with or without --budget: the CLIP checkpoint its tower comes from
MODEL_SETTINGS = {"vtc-tiny": {"cdpruner": {"clip": "vtc-tiny-clip"}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vtc-tiny", help="vtc-tiny or vtc-tiny-qwen (pre-LLM avgpool runs on vtc-tiny only)")
    parser.add_argument("--methods", default=None, help=f"default: {','.join(METHODS)} (without avgpool on a Qwen model)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keep-indices", type=int, default=0, help="record kept tokens of the first N questions")
    parser.add_argument("--budget", default=None, help="tokens=N or tflops=X: every training-free method at that cost")
    args = parser.parse_args()

    from vtcbench.budgets import parse_budget, solve
    from vtcbench.families import model_facts
    from vtcbench.methods import METHODS as REGISTRY
    from vtcbench.models import load_config

    model_config = load_config(args.model)
    if args.budget:
        default = ["vanilla", *(name for name, cls in sorted(REGISTRY.items())
                                if cls.budget_knobs or cls.adaptive)]
    else:
        default = list(METHODS)
    methods = args.methods.split(",") if args.methods else [m for m in default if _runs_on(get_method(m), model_config)]
    rows = []
    for method in methods:
        params = dict(MODEL_SETTINGS.get(args.model, {}).get(method, {}))
        budgeted = args.budget and method != "vanilla" and not REGISTRY[method].adaptive
        if budgeted:
            settings = {**BUDGET_SETTINGS.get(method, {}), **params}
            solved = solve(method, settings, parse_budget(args.budget), model_facts(model_config))
            params = solved.method.params()
            print(solved.describe())
        run_config = RunConfig(
            model=args.model, method=method, params=params, tasks=["vtcshapes"], out=args.out, batch_size=args.batch_size,
            keep_indices=args.keep_indices, show_progress=False, budget=args.budget if budgeted else None,
        )
        summary = run(run_config).summary
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


def _runs_on(method, config) -> bool:
    """Whether the model runs `method` (its family, then its checkpoint); says why not."""
    from vtcbench.errors import VtcbenchError
    from vtcbench.families import family_of

    try:
        family_of(config).check_method(method)
        method.check_model(config)
    except VtcbenchError as refusal:
        print(f"left out: {refusal}")
        return False
    return True


if __name__ == "__main__":
    main()
