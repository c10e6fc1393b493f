"""What the redundancy sweep's shared trunk saves: the sweep against one separate run per cell.

Ten retained shares (0.1 .. 1.0, attention criterion) at one layer K, on the same prompts,
side by side in one run: for each sample, every cell answered separately (what `vtcbench run`
per cell computes: the whole prefill under the cell's method) and all cells answered by the
sweep (vanilla once, each cell resumed at K, the branches' layers packed in one row where they
can be), and by the sweep with its branches run one after another (`SweepLMM.pack_branches`
off), the three in rotating order so drift hits them alike, each `--repeats` times and its
fastest run counted (as timeit does: on a shared machine, noise only ever adds time). Prints the
wall times, the sweeps' ratios to the separate runs, and the FLOPs floor: the decoder prefill
MACs of the sweep over the separate runs' (`sweep.shared_flops_ratio`, the figure the design
quotes: about 0.42 for these cells), and the same with the vision encoder,
which the sweep also runs once rather than once per cell (the floor the measured ratio is held
against).

Default shape on CPU (as benchmarks/flops_to_time.py's): llava-1.5-7b's 32 decoder layers and
576 image tokens at a quarter of the width (hidden 1024, ffn 2752, 8 heads of 128; `--width
eighth`: 512, 1376, 4) and a 2-layer vision tower, random weights, one new token per answer (the
prefill is what the sweep shares). On a GPU: --width full.
With --profile, it then profiles one more sample's sweep (cProfile, by time spent in each
function itself): where the time above the floor goes.
Run: python benchmarks/sweep_cost.py [--layer 16] [--samples 3] [--repeats 3] [--width quarter|eighth|full] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from lmms_eval.api.instance import Instance
from PIL import Image

from vtcbench import shapes
from vtcbench.families import model_facts
from vtcbench.lmms_model import Job, VtcbenchLMM
from vtcbench.models import build_local_processor, load_config, random_model
from vtcbench.profilers.flops import layer_macs, vision_encoder_macs
from vtcbench.sweep import DEFAULT_RATIOS, Cell, shared_flops_ratio
from vtcbench.sweep_lmm import Branch, SweepLMM

#: (hidden, ffn, heads) of llava-1.5-7b's decoder at a fraction of its width (heads of 128)
WIDTHS = {"full": (4096, 11008, 32), "quarter": (1024, 2752, 8), "eighth": (512, 1376, 4)}


def build_model(device: str, width: str):
    config = load_config("llava-1.5-7b")
    if width != "full":
        text = config.text_config
        text.hidden_size, text.intermediate_size, text.num_attention_heads = WIDTHS[width]
        text.num_key_value_heads, text.head_dim = text.num_attention_heads, 128
        config.vision_config.num_hidden_layers = 2
    dtype = "float16" if device == "cuda" else "float32"
    return random_model(config, dtype=dtype, attn_implementation="sdpa", device=device), build_local_processor(config)


def jobs(n: int) -> list[Job]:
    """One generation request per vtcshapes test question (its image and question), one new token."""
    out = []
    for index, sample in enumerate(shapes.split(shapes.TEST_SEED, per_family=n)[:n]):
        request = Instance(
            request_type="generate_until",
            arguments=(sample.question, {"max_new_tokens": 1}, None, index, "sweep_cost", "test"),
            idx=0,
            metadata={"task": "sweep_cost", "doc_id": index, "repeats": 1},
        )
        out.append(Job(index, request, [Image.fromarray(sample.scene.render())]))
    return out


def timed(function) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=16, help="the branch layer K")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side per sample; the fastest counts")
    parser.add_argument("--width", choices=list(WIDTHS), default="quarter", help="the decoder's width (full: for a GPU)")
    parser.add_argument("--profile", action="store_true", help="then profile one more sample's sweep")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model, processor = build_model(device, args.width)
    facts = model_facts(model)
    cells = [Cell(None, 1.0)] + [Cell(args.layer, r) for r in DEFAULT_RATIOS if r < 1]
    methods = {cell: cell.method("attention", seed=0) for cell in cells}
    separate = {cell: VtcbenchLMM(model, processor, methods[cell], run=None, show_progress=False) for cell in cells}
    branches = [Branch(c.id, c.layer, methods[c]) for c in cells[1:]]
    sweep = SweepLMM(model, processor, branches, run=None, show_progress=False)
    one_by_one = SweepLMM(model, processor, branches, run=None, show_progress=False)
    one_by_one.pack_branches = False
    samples = jobs(args.samples + 2)
    warmup, samples, profiled = samples[0], samples[1:-1], samples[-1]
    for lm in (sweep, one_by_one):
        list(lm._sweep_generate([warmup]))
    for cell in cells:
        list(separate[cell]._generate_batch([warmup]))

    sides = ("separate", "sweep", "one by one")
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    agree = True
    for index, job in enumerate(samples):
        answers: dict = {}

        def run_separate(job=job, answers=answers):
            for cell in cells:
                ((_, text, _),) = separate[cell]._generate_batch([job])
                answers[cell.id] = text

        def run_sweep(lm, side, job=job, answers=answers):
            ((_, texts, _),) = lm._sweep_generate([job])
            answers[side] = texts

        functions = {"separate": run_separate, "sweep": lambda: run_sweep(sweep, "sweep"),
                     "one by one": lambda: run_sweep(one_by_one, "one by one")}
        fastest = dict.fromkeys(sides, float("inf"))
        for repeat in range(args.repeats):
            shift = (index + repeat) % len(sides)
            for side in sides[shift:] + sides[:shift]:
                fastest[side] = min(fastest[side], timed(functions[side]))
        for side in sides:
            seconds[side].append(fastest[side])
        agree &= all(answers[side][cell.id] == answers[cell.id] for side in sides[1:] for cell in cells)
    separate_s, sweep_s = seconds["separate"], seconds["sweep"]

    encoded = separate[cells[0]]._encode_jobs([samples[0]])[0]
    n_text = int(encoded.input_ids.shape[0]) - encoded.image_tokens
    counts = {cell: methods[cell].image_tokens_per_layer(facts.image_tokens, facts.n_layers) for cell in cells}
    floor = shared_flops_ratio(counts, n_text, facts)
    measured = sum(sweep_s) / sum(separate_s)
    vision = vision_encoder_macs(facts)
    decoder = {cell: sum(layer_macs(n + n_text, facts) for n in counts[cell]) for cell in cells}
    # with the vision encoder, which the sweep also runs once rather than once per cell
    floor_all = (vision + floor * sum(decoder.values())) / (len(cells) * vision + sum(decoder.values()))
    print(f"model: {facts.n_layers} layers, hidden {facts.hidden_size}, {facts.image_tokens} image tokens, {n_text} text tokens; "
          f"device {device}; {len(cells)} cells (ratios {', '.join(f'{r:g}' for r in DEFAULT_RATIOS)}) at layer {args.layer}; "
          f"{len(samples)} samples, one new token each, fastest of {args.repeats} runs per sample and side")
    print(f"separate runs: {sum(separate_s):.2f} s (median per sample {statistics.median(separate_s):.2f} s)")
    print(f"sweep:         {sum(sweep_s):.2f} s (median per sample {statistics.median(sweep_s):.2f} s)")
    print(f"sweep, branches one by one: {sum(seconds['one by one']):.2f} s (median per sample "
          f"{statistics.median(seconds['one by one']):.2f} s; the sweep takes {sum(sweep_s) / sum(seconds['one by one']):.3f} of it)")
    print(f"measured ratio sweep / separate: {measured:.3f}   (branches one by one: {sum(seconds['one by one']) / sum(separate_s):.3f})")
    print(f"FLOPs floor, decoder prefill:                  {floor:.3f}")
    print(f"FLOPs floor, decoder prefill + vision encoder: {floor_all:.3f}   measured / floor: {measured / floor_all:.3f}"
          f"   (branches one by one: {sum(seconds['one by one']) / sum(separate_s) / floor_all:.3f})")
    print(f"(the vision encoder is {vision / (vision + decoder[cells[0]]):.1%} of a vanilla prefill's MACs; "
          f"the sweep runs it once, the separate runs {len(cells)} times)")
    print(f"answers of every cell equal between both sweeps and the separate runs: {agree}")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: list(sweep._sweep_generate([profiled])))
        stats = pstats.Stats(profiler)
        print(f"profile of one sample's sweep: {stats.total_tt:.2f} s; the functions that spent the most in themselves:")
        stats.sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
