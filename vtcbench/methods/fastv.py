"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2").

Paper section 4 (and the official `pkunlp-icler/FastV` LLaMA patch and its HF KV-cache port):
after layer K-1, rank image tokens by the attention the LAST prompt token pays them in layer
K-1, averaged over heads; from layer K on keep the top round(N * (1 - R)). Kept tokens keep
their original position ids; the ranking happens once, at prefill, and the per-layer KV caches
hold only kept tokens during decode (the official HF port's behaviour).

Difference: the official code reads the attention map that layer K-1's eager attention
returns; we recompute the same row from layer K-1's input (`input_layernorm`, `q_proj`,
`k_proj`, RoPE, `repeat_kv`), so FastV also runs under sdpa and flash_attention_2. In a batch
each sample keeps round(N_b * (1 - R)) of its own N_b image tokens, as it would alone (the
official code runs one sample at a time; LLaVA-NeXT samples differ in N_b).

On M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) the kept tokens keep all three original ids
(temporal, height, width), as the official Qwen ports of token dropping do.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from vtcbench.methods.base import ScoredDrop, check_ratio, register


@register
@dataclass
class FastV(ScoredDrop):
    """FastV (paper section 4; official code `pkunlp-icler/FastV`): from layer K keep the
    round(N * (1 - R)) image tokens the last prompt token attends to most in layer K-1, positions kept."""

    layer: int = 2
    drop_ratio: float = 0.5

    name: ClassVar[str] = "fastv"
    description: ClassVar[str] = "drop the least-attended image tokens after layer K-1 (positions kept)"

    def __post_init__(self) -> None:
        check_ratio(self.name, "drop_ratio", self.drop_ratio)

    def validate_for(self, n_image: int, n_layers: int) -> None:
        self._check_layer("layer", self.layer, n_layers, low=1)

    def plan(self, n_layers: int) -> dict[int, int | None]:
        return {self.layer: self.layer - 1}

    budget_knobs: ClassVar[tuple[str, ...]] = ("drop_ratio",)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return (1 - kept / n_image for kept in range(1, n_image + 1))

    def action_count(self, layer: int, n_current: int, n_image_original: int, n_layers: int) -> int:
        return round(n_image_original * (1 - self.drop_ratio))
