"""PyramidDrop (Xing et al., 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models
via Pyramid Visual Redundancy Reduction").

Paper section 3.2 and the official `Cooperx521/PyramidDrop` LLaMA forward: the decoder is split
into stages at layers r_1 < r_2 < ...; before stage s starts (layer r_s), rank the image tokens
with layer r_s's OWN projections applied to its input (`input_layernorm`, `q_proj`, `k_proj`,
RoPE), softmax over all keys, mean over heads, the row of the last instruction token, and keep
the top int(N0 * lambda^s), counted against the ORIGINAL N0. Position ids are compacted
(renumbered 0..n-1) after each drop, as the official code rebuilds them with `arange`.

Difference: with left padding, compaction renumbers only the real tokens (padding stays at 0),
so a batched prompt gets the same positions as it would alone. During decode, new tokens
continue from the compacted length of each stage (what an uncached rerun would give them). In a
batch each sample keeps int(N0_b * lambda^s) of its own N0_b (LLaVA-NeXT samples differ in N0_b).

On M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) positions are not compacted: a 3-D numbering has
no compacted form, so the kept tokens keep their original ids (as the Qwen ports of
PyramidDrop-style methods do); this is a difference from the LLaVA rule above.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from vtcbench.errors import VtcbenchError
from vtcbench.methods.base import (
    PositionPolicy,
    ScoredDrop,
    check_ratio,
    register,
)


class StagedDrop(ScoredDrop):
    """PyramidDrop's rule for any stage schedule: own-layer scoring, keep N0 * lambda^s."""

    keep_ratio: float
    position_policy: ClassVar[PositionPolicy] = "compact"

    def stage_layers(self, n_layers: int) -> tuple[int, ...]:
        raise NotImplementedError  # abstract: the schedule

    def plan(self, n_layers: int) -> dict[int, int | None]:
        return {layer: layer for layer in self.stage_layers(n_layers)}

    budget_knobs: ClassVar[tuple[str, ...]] = ("keep_ratio",)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        """keep_ratio on a grid of 0.001."""
        return (step / 1000 for step in range(1, 1001))

    def action_count(self, layer: int, n_current: int, n_image_original: int, n_layers: int) -> int:
        stage = self.stage_layers(n_layers).index(layer) + 1
        return int(n_image_original * self.keep_ratio**stage)


@register
@dataclass
class PyramidDrop(StagedDrop):
    """PyramidDrop (section 3.2; official code `Cooperx521/PyramidDrop`): staged drops at the listed
    layers, stage s keeping int(N0 * lambda^s), positions compacted."""

    layers: tuple[int, ...] = ()  # empty: the paper's 4 equal stages, L/4, L/2, 3L/4
    keep_ratio: float = 0.5

    name: ClassVar[str] = "pdrop"
    description: ClassVar[str] = (
        "stage-wise drop at each listed layer, keep N0*lambda^s (positions compacted); "
        "default layers: L/4,L/2,3L/4 (8,16,24 on 32 layers)"
    )

    def __post_init__(self) -> None:
        check_ratio(self.name, "keep_ratio", self.keep_ratio, low_open=True, high_closed=True)
        if list(self.layers) != sorted(set(self.layers)):
            raise VtcbenchError(
                f"{self.name}: layers={','.join(map(str, self.layers))} must be a strictly increasing list"
            )

    def stage_layers(self, n_layers: int) -> tuple[int, ...]:
        """The listed layers; by default the paper's split of the depth into 4 equal stages
        (section 4.1: layers 8, 16, 24 of LLaVA-1.5's 32), scaled to shallower models."""
        return self.layers or tuple(n_layers * stage // 4 for stage in (1, 2, 3))

    def validate_for(self, n_image: int, n_layers: int) -> None:
        for layer in self.stage_layers(n_layers):
            self._check_layer("layers", layer, n_layers, low=1)
