"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models"): keep the most diverse subset of the projected image tokens.

Paper section 3.2 (Eq. 4-6, the Max-Min Diversity Problem solved greedily) and the behaviour of
the official code, `vbdi/divprune` `LLaVA/llava/model/llava_arch.py` (`DivPrune`; its script
`run_Divprune.sh` sets `SUBSET_RATIO=0.098`). Written from the paper and that behaviour; the
official code is CC BY-NC and none of it is copied here. Per image, on the projector's output:

- distance = 1 - cosine similarity, every pair, in the features' dtype;
- first token: the one whose nearest other token is farthest (the second-smallest entry of its
  distance column; its own entry is the smallest);
- each next token: the one not yet chosen whose distance to its nearest chosen token is largest
  (first index on ties), until int(round(ratio * N)) are chosen (56 of LLaVA-1.5's 576 at 0.098);
- the chosen tokens go to the LLM in their original order, with compact positions (the prompt
  is shortened, as the official splice into `new_input_embeds` leaves it).

The selection is made, as the official code makes it (on `new_input_embeds`, LAYER_INDEX=0),
at the language model's input, whose image tokens are exactly the projector's output
(`PROJECTED_SELECTION`): a layer-0 action keeps each image's chosen tokens, which computes what
the shortened prompt computes. So it runs on every family:

- LLaVA-NeXT: over each image's whole token sequence as the model packs it (base crop, then the
  unpadded tiles with a newline token per row), as the official LLaVA-NeXT path selects;
- the Qwen line, which the official code does not run: over each image's merged tokens (a
  video's: its run of tokens; Qwen3-VL gives each frame pair a run of its own); on M-RoPE the
  kept tokens keep their 3-D ids, as every compacting method does here.

Differences: the official code selects on the first image of a batch and applies its indices
to every row (its scripts run batch size 1); here each image is selected on its own. Once every
distinct token is chosen (equal tokens: LLaVA-NeXT's newlines, at a high ratio) the official
greedy picks a chosen token again and duplicates it in the sequence; here a token is chosen
once. A LLaVA-NeXT prompt whose images' placeholders touch (its images cannot be told apart) is
refused.
"""

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtcbench.errors import VtcbenchError
from vtcbench.families import ModelFacts
from vtcbench.methods.base import (
    Keep,
    LayerContext,
    Method,
    PositionPolicy,
    check_ratio,
    register,
)
from vtcbench.methods.kinds import PROJECTED_SELECTION, MethodKind


@register
@dataclass
class DivPrune(Method):
    """DivPrune (section 3.2, Eq. 4-6; behaviour of the official `vbdi/divprune`
    `LLaVA/llava/model/llava_arch.py`): the greedy max-min diverse subset of each image's
    projected tokens, in original order."""

    ratio: float = 0.098

    name: ClassVar[str] = "divprune"
    kind: ClassVar[MethodKind] = PROJECTED_SELECTION
    position_policy: ClassVar[PositionPolicy] = "compact"
    description: ClassVar[str] = "keep the greedy max-min (cosine) diverse subset of each image's projected tokens"

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio, low_open=True, high_closed=True)

    budget_knobs: ClassVar[tuple[str, ...]] = ("ratio",)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return (kept / n_image for kept in range(1, n_image + 1))

    def validate_for(self, n_image: int, n_layers: int) -> None:
        if self.kept(n_image) < 1:
            raise VtcbenchError(
                f"{self.name}: ratio={self.ratio} keeps no token of {n_image}; valid range: [{0.5 / n_image:.4g}, 1]"
            )

    def kept(self, n_image: int) -> int:
        """Tokens kept of an image's n: int(round(ratio * n)), the official rounding."""
        return int(round(self.ratio * n_image))

    def plan(self, n_layers: int) -> dict[int, int | None]:
        return {0: None}

    def action_count(self, layer: int, n_current: int, n_image_original: int, n_layers: int) -> int:
        return self.kept(n_image_original)

    def selection_macs(self, facts: ModelFacts, n_image: int, image_tokens_per_layer: list[int]) -> int:
        """The pairwise cosine matrix, N x N x d."""
        return n_image * n_image * facts.hidden_size

    def select(self, ctx: LayerContext) -> Keep:
        """Each image's chosen tokens, images of one size selected together."""
        if ctx.image_runs is None:
            raise VtcbenchError(
                f"{self.name} selects per image, and two images' placeholders touch in this batch's prompts; "
                "separate them with text"
            )
        features = ctx.image_hidden()
        images = [(sample, start, n) for sample, runs in enumerate(ctx.image_runs)
                  for start, n in zip(itertools.accumulate(runs, initial=0), runs)]
        chosen: list[list[tuple[int, torch.Tensor]]] = [[] for _ in ctx.image_runs]
        for n in sorted({n for _, _, n in images}):
            group = [(sample, start) for sample, start, size in images if size == n]
            stacked = torch.stack([features[sample, start : start + n] for sample, start in group])
            for (sample, start), indices in zip(group, self.selected(stacked)):
                chosen[sample].append((start, indices.sort().values + start))
        rows = [torch.cat([indices for _, indices in sorted(row, key=lambda item: item[0])]) for row in chosen]
        counts = [len(row) for row in rows]
        indices = torch.stack([F.pad(row, (0, max(counts) - len(row))) for row in rows])
        return Keep(indices, counts=None if len(set(counts)) == 1 else tuple(counts))

    def selected(self, image_features: torch.Tensor) -> torch.Tensor:
        """[images, k] token indices in the order they were chosen, from [images, n, d] features."""
        unit = image_features / image_features.norm(dim=-1, keepdim=True)
        distance = 1.0 - unit @ unit.transpose(1, 2)  # [images, n, n], symmetric
        k = self.kept(int(image_features.shape[1]))
        rows = torch.arange(image_features.shape[0], device=image_features.device)
        nearest = distance.topk(2, dim=1, largest=False).values[:, 1]  # each token's nearest other one
        chosen = [nearest.argmax(dim=1)]
        to_chosen = distance[rows, chosen[0]]  # [images, n]: distance to the nearest chosen token
        for _ in range(1, k):
            to_chosen[rows, chosen[-1]] = float("-inf")  # never twice, even among equal tokens
            chosen.append(to_chosen.argmax(dim=1))
            to_chosen = torch.minimum(to_chosen, distance[rows, chosen[-1]])
        return torch.stack(chosen, dim=1)
