"""LLaVolta's visual context compressor (Chen et al., 2024, "Efficient Large Multi-modal Models
via Visual Context Compression"), training-free use.

Paper section 3 (Eq. for the compressor) and the official `Beckschen/LLaVolta` LLaMA forward: at
the start of layer K, 1-D average pooling with kernel = stride = S over the image tokens in
raster order; a pooled token's position id is the floor of the mean of the ids it pools; text
tokens keep their ids. K = 0 pools the embeddings. Compression ratio (paper Table 5):
CR = N L / ((N - K) L_out + K L).

Difference: the official code pools inside its patched forward; here the engine substitutes the
pooled tokens at layer K's input, and during decode the KV caches of layers >= K hold the pooled
tokens. In a batch each sample's own image span is pooled (the stride must divide every sample's
count), so samples with different counts (LLaVA-NeXT) keep different numbers.

On M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) a merged token takes, per axis (temporal, height,
width), the floor of the mean of its members' ids, the rule above applied to each row; on
Qwen3-VL it also receives the mean of its members' DeepStack features.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.methods.base import (
    LayerContext,
    Method,
    PositionPolicy,
    Replace,
    check_positive,
    register,
)
from vtcbench.methods.kinds import IN_LLM, MethodKind


@register
@dataclass
class LLaVolta(Method):
    """LLaVolta's visual context compressor (section 3.2, its compression ratio Eq. 3 and Table 5;
    official code `Beckschen/LLaVolta`, `llava/model/language_model/llava_llama.py`): 1-D average
    pooling with stride S over the image tokens at layer K."""

    layer: int = 2
    stride: int = 8

    name: ClassVar[str] = "llavolta"
    kind: ClassVar[MethodKind] = IN_LLM
    position_policy: ClassVar[PositionPolicy] = "pooled"
    description: ClassVar[str] = "1-D average pooling (kernel=stride=S) of image tokens at layer K"

    def __post_init__(self) -> None:
        check_positive(self.name, "stride", self.stride)

    def validate_for(self, n_image: int, n_layers: int) -> None:
        self._check_layer("layer", self.layer, n_layers)
        if n_image % self.stride:
            divisors = [d for d in range(1, n_image + 1) if n_image % d == 0]
            raise VtcbenchError(
                f"{self.name}: stride={self.stride} does not divide the {n_image} image tokens; "
                f"valid strides: {', '.join(map(str, divisors))}"
            )

    budget_knobs: ClassVar[tuple[str, ...]] = ("stride",)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return range(1, n_image + 1)

    def plan(self, n_layers: int) -> dict[int, int | None]:
        return {self.layer: None}

    def action_count(self, layer: int, n_current: int, n_image_original: int, n_layers: int) -> int:
        return n_current // self.stride

    def select(self, ctx: LayerContext) -> Replace:
        """Pool each row in windows of `stride`; a sample's span divides by `stride`, so its own
        windows never reach the padding of a shorter sample's row (those are ignored)."""
        batch, n, dim = ctx.hidden_states.shape[0], ctx.n_image, ctx.hidden_states.shape[-1]
        groups = n // self.stride
        hidden = ctx.image_hidden().reshape(batch, groups, self.stride, dim).mean(dim=2)
        positions = ctx.image_positions().reshape(batch, groups, self.stride, -1)  # [batch, groups, stride, rows]
        pooled_positions = positions.sum(dim=2).div(self.stride, rounding_mode="floor")
        anchors = torch.arange(0, n, self.stride, device=hidden.device).expand(batch, -1)
        groups = torch.arange(n, device=hidden.device).div(self.stride, rounding_mode="floor").expand(batch, -1)
        counts = None if ctx.uniform else tuple(ctx.keep_counts(lambda n_b, _: n_b // self.stride))
        return Replace(hidden=hidden, position_ids=pooled_positions, anchors=anchors, groups=groups, counts=counts)
