"""Each method's selection time as a share of its prefill, side by side (goal: under 2%).

For every training-free method at its LLaVA-1.5 defaults: the whole prefill forward (tower,
projector, selection, language model; median over iterations, the methods taking turns each
round so drift hits them alike) and, inside it, the time the method's own work takes (the
engine's `overhead` seam: scoring, keys, similarities, rebuilding the sequence; for the pre-LLM
selections, the work at the projector). The analytic selection TFLOPs (`tflops_method_overhead`)
is printed beside it.

Shape: as benchmarks/flops_to_time.py, llava-1.5-7b (random weights) on a GPU; on CPU its 32
decoder layers and 576 image tokens at a quarter of the width (hidden 1024, ffn 2752, 8 heads)
and a 2-layer CLIP tower; CDPruner's text tower has CLIP ViT-L/14-336's text shape (random
weights, 12 layers of width 768 on one 77-token chunk). Run: python benchmarks/method_overhead.py [--iterations 3] [--full-width] [--batch 1]
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from flops_to_time import arguments, bench_model, take_turns

from vtcbench.engine import QUESTIONS, compress
from vtcbench.families.llava import write_random_clip
from vtcbench.methods import METHODS, get_method
from vtcbench.profilers.flops import analytic_flops
from vtcbench.profilers.latency import PhaseTimer
from vtcbench.profilers.session import SYNTHETIC_QUESTION, measured_image_tokens

GOAL = 0.02


@torch.no_grad()
def time_prefill(model, method, inputs, timer: PhaseTimer) -> tuple[float, float]:
    """(whole prefill forward ms, the method's own work ms) of one forward."""
    with compress(model, method) as engine:
        engine.overhead = lambda: timer.phase("overhead")
        prepared = engine.prepare(inputs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(**prepared, use_cache=True, logits_to_keep=1)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        total = (time.perf_counter() - started) * 1000
    return total, sum(timer.read().get("overhead", [0.0]))


def main() -> None:
    args = arguments(__doc__, iterations=3)
    device, model, facts, inputs = bench_model(args)
    names = sorted(name for name, cls in METHODS.items() if not cls.needs_weights and name != "vanilla")
    # CDPruner's text side: CLIP ViT-L/14-336's text tower shape, random weights (offline)
    clip = write_random_clip(tempfile.mkdtemp(prefix="bench-clip-"), facts.vision_hidden_size, layers=12, width=768, heads=12,
                             ffn=3072, projection=768)
    methods = {name: get_method(name, **({"clip": clip} if name == "cdpruner" else {})) for name in names}
    QUESTIONS.set(SYNTHETIC_QUESTION)
    timer = PhaseTimer(device)
    prefill, overhead = take_turns(methods, lambda method: time_prefill(model, method, inputs, timer), args.iterations)

    width = f"hidden {facts.hidden_size}, ffn {facts.intermediate_size}, {facts.n_layers} layers"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} ({torch.get_num_threads()} threads), "
          f"{model.dtype}, {width}, batch {args.batch} of {facts.image_tokens} image + {args.text_tokens} text tokens, "
          f"{args.iterations} iterations, medians")
    print(f"{'method':<10} {'prefill ms':>11} {'selection ms':>13} {'share':>7} {'selection TFLOPs':>17}  goal {GOAL:.0%}")
    for name, method in methods.items():
        ms, extra = statistics.median(prefill[name]), statistics.median(overhead[name])
        applied = measured_image_tokens(model, method, inputs)  # a count that adapts to the image (PruMerge+)
        tflops = analytic_flops(method, facts, model="bench", text_tokens=args.text_tokens,
                                image_tokens_per_layer=applied).tflops_method_overhead
        print(f"{name:<10} {ms:>11.1f} {extra:>13.2f} {extra / ms:>7.2%} {tflops:>17.3g}  {'ok' if extra / ms < GOAL else 'misses'}")


if __name__ == "__main__":
    main()
