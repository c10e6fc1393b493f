"""Decoding a sweep's branches together: side by side, the decoder layers a sweep's branches
run after their branch layer, on the sequences they keep, four ways:

- separate: one forward per branch;
- padded batches: the branches in batches of `--group` rows, each left-padded to its longest
  (how a batch of branches with different kept counts runs under the engine);
- packed: all branches in one row, a block-diagonal causal mask keeping each to its own tokens;
- packed, attention per branch: the same row, its linear layers and norms on every branch's tokens
  at once, its attention run branch by branch (`transformers_seam.packed_layer`, what
  `vtcbench redundancy-sweep` runs on the CPU; no mask).

The branches are the sweep's default ten retained shares (0.1 .. 0.9 of 576 image tokens, with
64 text tokens) over llava-1.5-7b's last 16 decoder layers (a branch at K = 16), random weights,
no cache: the prefill the branches do not share. Medians of `--iterations`, the four taking
turns each round; then the decoder's multiply-accumulates per second on one short, one middle and
one vanilla-length sequence, and on a CPU the speed-up of all its threads over one on the short
and the vanilla-length sequence. Run: python benchmarks/branch_batching.py [--width quarter|eighth|full]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from sweep_cost import WIDTHS, build_model, timed

from vtcbench import transformers_seam as seam
from vtcbench.families import family_of, model_facts
from vtcbench.profilers.flops import layer_macs
from vtcbench.sweep import DEFAULT_RATIOS


@torch.no_grad()
def packed_per_branch(stack, rows: list[int]) -> None:
    """The layers on one sequence per branch, every layer one packed call (`seam.packed_layer`)."""
    weight = next(stack.parameters())
    hidden = [torch.randn(1, length, stack.config.hidden_size, dtype=weight.dtype, device=weight.device) for length in rows]
    positions = [torch.arange(length, device=weight.device)[None] for length in rows]
    tables = [stack.rotary_emb(h, p) for h, p in zip(hidden, positions)]
    for layer in stack.layers:
        calls = [((h,), {"attention_mask": None, "position_ids": p, "position_embeddings": t}) for h, p, t in zip(hidden, positions, tables)]
        hidden = seam.packed_layer(layer, calls)


@torch.no_grad()
def forward(stack, rows: list[int], packed: bool = False) -> None:
    """The layers on sequences of `rows` tokens: one left-padded batch, or one packed row (its
    attention masked block-diagonally)."""
    weight = next(stack.parameters())
    on = {"device": weight.device}
    width = stack.config.hidden_size
    if packed:
        total = sum(rows)
        mask = torch.full((total, total), torch.finfo(weight.dtype).min, dtype=weight.dtype, **on)
        start = 0
        for length in rows:
            mask[start : start + length, start : start + length].triu_(1)  # causal within the branch
            start += length
        positions = torch.cat([torch.arange(length, **on) for length in rows])[None]
        embeds = torch.randn(1, total, width, dtype=weight.dtype, **on)
        stack(inputs_embeds=embeds, attention_mask=mask[None, None], position_ids=positions, use_cache=False)
        return
    longest = max(rows)
    padding = torch.ones(len(rows), longest, dtype=torch.long, **on)
    for row, length in enumerate(rows):
        padding[row, : longest - length] = 0
    positions = (padding.cumsum(dim=1) - 1).clamp(min=0)
    embeds = torch.randn(len(rows), longest, width, dtype=weight.dtype, **on)
    stack(inputs_embeds=embeds, attention_mask=padding, position_ids=positions, use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", choices=list(WIDTHS), default="quarter")
    parser.add_argument("--group", type=int, default=3, help="branches per padded batch")
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = build_model(device, args.width)
    stack = family_of(model).language_model(model)
    stack.layers = stack.layers[16:]  # what a branch at K = 16 runs
    lengths = [int(576 * ratio) + 64 for ratio in DEFAULT_RATIOS if ratio < 1]
    ways = {
        "separate": lambda: [forward(stack, [length]) for length in lengths],
        f"padded batches of {args.group}": lambda: [forward(stack, lengths[i : i + args.group]) for i in range(0, len(lengths), args.group)],
        "packed": lambda: forward(stack, lengths, packed=True),
        "packed, attention per branch": lambda: packed_per_branch(stack, lengths),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for name, way in ways.items():  # warm-up
        way()
    for _ in range(args.iterations):
        for name, way in ways.items():
            seconds[name].append(timed(way))
    separate = statistics.median(seconds["separate"])
    print(f"{device}, hidden {stack.config.hidden_size}, 16 layers, branches of {', '.join(map(str, lengths))} tokens; "
          f"medians of {args.iterations}")
    for name, values in seconds.items():
        print(f"{name:<30} {statistics.median(values):7.3f} s   {statistics.median(values) / separate:5.2f}x separate")
    # what FLOPs do not count: a short sequence runs slower per MAC (the sweep's branches are short)
    facts = model_facts(model)
    rates = []
    for length in (lengths[0], lengths[len(lengths) // 2], 576 + 64):
        times = [timed(lambda length=length: forward(stack, [length])) for _ in range(args.iterations)]
        rates.append(f"{length} tokens {len(stack.layers) * layer_macs(length, facts) / statistics.median(times) / 1e9:.0f}")
    print("GMAC/s of one forward: " + ", ".join(rates) + " (576 + 64: a vanilla prompt)")
    threads = torch.get_num_threads()
    if device == "cpu" and threads > 1:  # why: the threads split a product of few rows less well
        speedups = []
        for length in (lengths[0], 576 + 64):
            times = {}
            for n in (1, threads):
                torch.set_num_threads(n)
                times[n] = statistics.median([timed(lambda length=length: forward(stack, [length])) for _ in range(args.iterations)])
            torch.set_num_threads(threads)
            speedups.append(f"{length} tokens {times[1] / times[threads]:.2f}x")
        print(f"{threads} threads' speed-up over 1 on one forward: " + ", ".join(speedups))


if __name__ == "__main__":
    main()
