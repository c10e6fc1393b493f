"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models"): keep the most diverse subset of the projected image tokens.

Paper section 3.2 (Eq. 4-6, the Max-Min Diversity Problem solved greedily) and the behaviour of
the official code, `vbdi/divprune` `LLaVA/llava/model/llava_arch.py` (`DivPrune`; its script
`run_Divprune.sh` sets `SUBSET_RATIO=0.098`). Written from the paper and that behaviour; the
official code is CC BY-NC and none of it is copied here. Per image, on the projector's output:

- distance = 1 - cosine similarity, every pair, in the features' dtype;
- first token: the one whose nearest other token is farthest (the second-smallest entry of its
  distance column; its own entry is the smallest);
- each next token: the one whose distance to its nearest chosen token is largest (first index
  on ties), until int(round(ratio * N)) are chosen (56 of LLaVA-1.5's 576 at 0.098);
- the chosen tokens go to the LLM in their original order, with compact positions (the prompt
  is shortened, as the official splice into `new_input_embeds` leaves it).

Differences: the official code selects on the first sample of a batch and applies its indices
to every row (its scripts run batch size 1); here each image is selected on its own. On
LLaVA-NeXT the official code selects over the whole unpadded sequence of the first image (newline
rows included); pre-LLM methods here need a fixed grid, so only LLaVA-1.5 runs it.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.families import ModelFacts
from vtcbench.methods.base import Method, check_ratio, register
from vtcbench.methods.kinds import PRE_LLM, MethodKind


@register
@dataclass
class DivPrune(Method):
    """DivPrune (section 3.2, Eq. 4-6; behaviour of the official `vbdi/divprune`
    `LLaVA/llava/model/llava_arch.py`): the greedy max-min diverse subset of each image's
    projected tokens, in original order."""

    ratio: float = 0.098

    name: ClassVar[str] = "divprune"
    kind: ClassVar[MethodKind] = PRE_LLM
    records_kept_patches: ClassVar[bool] = False  # a selection before the LLM
    description: ClassVar[str] = "keep the greedy max-min (cosine) diverse subset of each image's projected tokens"

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio, low_open=True, high_closed=True)

    budget_knobs: ClassVar[tuple[str, ...]] = ("ratio",)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return (kept / n_image for kept in range(1, n_image + 1))

    def validate_for(self, n_image: int, n_layers: int) -> None:
        if self.pre_llm_tokens(n_image) < 1:
            raise VtcbenchError(
                f"{self.name}: ratio={self.ratio} keeps no token of {n_image}; valid range: [{0.5 / n_image:.4g}, 1]"
            )

    def pre_llm_tokens(self, n_image: int) -> int:
        return int(round(self.ratio * n_image))

    def selection_macs(self, facts: ModelFacts, n_image: int, image_tokens_per_layer: list[int]) -> int:
        """The pairwise cosine matrix, N x N x d."""
        return n_image * n_image * facts.hidden_size

    def pre_llm(self, image_features: torch.Tensor) -> torch.Tensor:
        chosen = self.selected(image_features).sort(dim=1).values
        return image_features.gather(1, chosen[..., None].expand(-1, -1, image_features.shape[-1]))

    def selected(self, image_features: torch.Tensor) -> torch.Tensor:
        """[images, k] token indices in the order they were chosen."""
        unit = image_features / image_features.norm(dim=-1, keepdim=True)
        distance = 1.0 - unit @ unit.transpose(1, 2)  # [images, n, n], symmetric
        k = self.pre_llm_tokens(int(image_features.shape[1]))
        rows = torch.arange(image_features.shape[0], device=image_features.device)
        nearest = distance.topk(2, dim=1, largest=False).values[:, 1]  # each token's nearest other one
        chosen = [nearest.argmax(dim=1)]
        to_chosen = distance[rows, chosen[0]]  # [images, n]: distance to the nearest chosen token
        for _ in range(1, k):
            chosen.append(to_chosen.argmax(dim=1))
            to_chosen = torch.minimum(to_chosen, distance[rows, chosen[-1]])
        return torch.stack(chosen, dim=1)
