"""Random drop: LLaVolta Table 3's "random" compressor, a training-free control for FastV.

At the start of layer K keep round(N * (1 - R)) image tokens chosen uniformly at random,
positions kept. The draw is seeded by `seed` and by a hash of each sample's prompt tokens, so a
sample gets the same draw alone or in a batch (of any mix of image-token counts) and on every
rerun.

On M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) the kept tokens keep all three original ids
(temporal, height, width), as the official Qwen ports of token dropping do.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtcbench.methods.base import (
    LayerContext,
    ScoredDrop,
    check_ratio,
    register,
)


@register
@dataclass
class RandomDrop(ScoredDrop):
    """LLaVolta's random-dropping compressor (section 4, Table 3): a seeded uniform draw at layer K,
    positions kept. No official code: LLaVolta's released
    `llava/model/language_model/llava_llama.py` implements only average pooling (`avgpool1d`)."""

    layer: int = 2
    drop_ratio: float = 0.5
    seed: int = 0

    name: ClassVar[str] = "random"
    description: ClassVar[str] = "drop a seeded uniform-random subset of image tokens at layer K"

    def __post_init__(self) -> None:
        check_ratio(self.name, "drop_ratio", self.drop_ratio)

    def validate_for(self, n_image: int, n_layers: int) -> None:
        self._check_layer("layer", self.layer, n_layers)

    def plan(self, n_layers: int) -> dict[int, int | None]:
        return {self.layer: None}

    budget_knobs: ClassVar[tuple[str, ...]] = ("drop_ratio",)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return (1 - kept / n_image for kept in range(1, n_image + 1))

    def action_count(self, layer: int, n_current: int, n_image_original: int, n_layers: int) -> int:
        return round(n_image_original * (1 - self.drop_ratio))

    def score(self, ctx: LayerContext) -> torch.Tensor:
        rows = torch.zeros(len(ctx.sample_keys), ctx.n_image)  # a sample with fewer tokens: the rest is never read
        for row, (key, n) in enumerate(zip(ctx.sample_keys, ctx.n_image_per_sample)):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
            rows[row, :n] = torch.rand(n, generator=generator)
        return rows.to(ctx.hidden_states.device)
