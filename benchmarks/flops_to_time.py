"""Does latency fall as FLOPs fall? Prefill time of vanilla, fastv, pdrop and llavolta, side by side.

For each method: language-model prefill time (median over iterations; the methods take turns
each round so drift hits them alike), the measured speedup over vanilla, the analytic
full-sequence FLOPs speedup, their ratio (1.0 = time falls exactly as FLOPs do), and the
method's own overhead (scoring + rebuilding the sequence) as a share of its prefill.

Default shape: on a GPU, llava-1.5-7b (random weights, fp16). On CPU, a model that fits this
machine: llava-1.5-7b's 32 decoder layers and 576 image tokens at a quarter of the width
(hidden 1024, ffn 2752, 8 heads of 128) and a 2-layer vision tower, since only the language
model's prefill is timed. Run: python benchmarks/flops_to_time.py [--iterations 5] [--full-width] [--batch 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vtcbench.engine import compress
from vtcbench.families import language_model, model_facts
from vtcbench.methods import get_method
from vtcbench.models import load_config, random_model
from vtcbench.profilers.flops import analytic_flops
from vtcbench.profilers.latency import PhaseTimer
from vtcbench.profilers.session import Shape, synthetic_inputs

METHODS = {
    "vanilla": {},
    "fastv": {"layer": 2, "drop_ratio": 0.5},
    "pdrop": {"layers": (8, 16, 24), "keep_ratio": 0.5},
    "llavolta": {"layer": 2, "stride": 8},
}


def build_model(device: str, full_width: bool):
    config = load_config("llava-1.5-7b")
    if device == "cpu" and not full_width:
        text = config.text_config
        text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 1024, 2752, 8, 8
        text.head_dim = 128
        config.vision_config.num_hidden_layers = 2
    dtype = "float16" if device == "cuda" else "float32"
    return random_model(config, dtype=dtype, attn_implementation="sdpa", device=device)


@torch.no_grad()
def time_prefill(model, method, inputs, timer: PhaseTimer) -> tuple[float, float]:
    """(language-model prefill ms, method overhead ms) of one forward."""
    lm = language_model(model)
    handles = [
        lm.register_forward_pre_hook(lambda m, a: timer.start("prefill")),
        lm.register_forward_hook(lambda m, a, o: timer.stop("prefill")),
    ]
    try:
        with compress(model, method) as engine:
            engine.overhead = lambda: timer.phase("overhead")
            model(**engine.prepare(inputs), use_cache=True, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    phases = timer.read()
    return phases["prefill"][0], sum(phases.get("overhead", [0.0]))


def arguments(doc: str, iterations: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=iterations)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="prompts per forward (a GPU is host-bound at 1)")
    parser.add_argument("--full-width", action="store_true", help="on CPU too, the real 7B width (needs ~28 GB)")
    return parser.parse_args()


def bench_model(args: argparse.Namespace):
    """(device, model, its facts, one synthetic prompt at the model's image tokens)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(device, args.full_width)
    facts = model_facts(model)
    shape = Shape(image_tokens=facts.image_tokens, text_tokens=args.text_tokens, new_tokens=1, batch=args.batch)
    return device, model, facts, synthetic_inputs(model, shape)


def take_turns(methods: dict, time_one, iterations: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(prefill ms, overhead ms) per method: one warm-up each, then the methods in turn each round,
    so a shared machine's drift hits them alike."""
    for method in methods.values():
        time_one(method)
    prefill: dict[str, list[float]] = {name: [] for name in methods}
    overhead: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(iterations):
        for name, method in methods.items():
            total, extra = time_one(method)
            prefill[name].append(total)
            overhead[name].append(extra)
    return prefill, overhead


def main() -> None:
    args = arguments(__doc__, iterations=5)
    device, model, facts, inputs = bench_model(args)
    methods = {name: get_method(name, **params) for name, params in METHODS.items()}
    timer = PhaseTimer(device)
    prefill, overhead = take_turns(methods, lambda method: time_prefill(model, method, inputs, timer), args.iterations)

    flops = {name: analytic_flops(m, facts, model="bench", text_tokens=args.text_tokens).tflops_total for name, m in methods.items()}
    width = f"hidden {facts.hidden_size}, ffn {facts.intermediate_size}, {facts.n_layers} layers"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} ({torch.get_num_threads()} threads), "
          f"{model.dtype}, {width}, batch {args.batch} of {facts.image_tokens} image + {args.text_tokens} text tokens, "
          f"{args.iterations} iterations, medians")
    print(f"{'method':<9} {'prefill ms':>11} {'speedup':>8} {'FLOPs speedup':>14} {'ratio':>6} {'overhead ms':>12} {'overhead/prefill':>17}")
    base = statistics.median(prefill["vanilla"])
    for name in methods:
        ms = statistics.median(prefill[name])
        extra = statistics.median(overhead[name])
        measured, analytic = base / ms, flops["vanilla"] / flops[name]
        print(f"{name:<9} {ms:>11.1f} {measured:>8.2f} {analytic:>14.2f} {measured / analytic:>6.2f} {extra:>12.2f} {extra / ms:>16.2%}")


if __name__ == "__main__":
    main()
