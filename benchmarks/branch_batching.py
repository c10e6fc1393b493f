"""Would the sweep's branches cost less decoded together? Side by side, the decoder layers a
sweep's branches run after their branch layer, on the sequences they keep, three ways:

- separate: one forward per branch (what `vtcbench redundancy-sweep` does);
- padded batches: the branches in batches of `--group` rows, each left-padded to its longest
  (how a batch of branches with different kept counts runs under the engine);
- packed: all branches in one row, a block-diagonal causal mask keeping each to its own tokens;
- packed, attention per branch: the same row, its linear layers and norms on every branch's tokens
  at once, its attention run branch by branch (a transformers attention function registered
  through `AttentionInterface`, which splits the row at the branches' boundaries; no mask).

The branches are the sweep's default ten retained shares (0.1 .. 0.9 of 576 image tokens, with
64 text tokens) over llava-1.5-7b's last 16 decoder layers (a branch at K = 16), random weights,
no cache: the prefill the branches do not share. Medians of `--iterations`, the three taking
turns each round; then the decoder's multiply-accumulates per second on one short, one middle and
one vanilla-length sequence. Run: python benchmarks/branch_batching.py [--width quarter|eighth|full]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from sweep_cost import WIDTHS, build_model, timed
from transformers import AttentionInterface, AttentionMaskInterface

from vtcbench.families import family_of, model_facts
from vtcbench.profilers.flops import layer_macs
from vtcbench.sweep import DEFAULT_RATIOS

#: the branches' lengths in the packed row `per_branch_attention` splits (set around a forward)
SEGMENTS: list[int] = []


def per_branch_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal SDPA on each branch's slice of a packed row ([1, heads, tokens, head_dim]); the
    output in transformers' layout [1, tokens, heads, head_dim]."""
    groups = query.shape[1] // key.shape[1]
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), is_causal=True, scale=scaling)
        for q, k, v in zip(query.split(SEGMENTS, dim=2), key.split(SEGMENTS, dim=2), value.split(SEGMENTS, dim=2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register("per_branch", per_branch_attention)
AttentionMaskInterface.register("per_branch", lambda *args, **kwargs: None)  # each slice is causal on its own


@torch.no_grad()
def forward(stack, rows: list[int], packed: bool = False, per_branch: bool = False) -> None:
    """The layers on sequences of `rows` tokens: one left-padded batch, or one packed row (its
    attention masked block-diagonally, or run per branch)."""
    weight = next(stack.parameters())
    on = {"device": weight.device}
    width = stack.config.hidden_size
    if per_branch:
        SEGMENTS[:] = rows
        positions = torch.cat([torch.arange(length, **on) for length in rows])[None]
        embeds = torch.randn(1, sum(rows), width, dtype=weight.dtype, **on)
        implementation = stack.config._attn_implementation
        stack.config._attn_implementation = "per_branch"
        try:
            stack(inputs_embeds=embeds, position_ids=positions, use_cache=False)
        finally:
            stack.config._attn_implementation = implementation
        return
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
        "packed, attention per branch": lambda: forward(stack, lengths, per_branch=True),
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


if __name__ == "__main__":
    main()
