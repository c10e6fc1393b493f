"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models"): dominant tokens by CLS attention, the rest merged into a few contextual ones,
before the projector.

Paper section 3.2 (dominant and contextual token selection) and the official code,
`dvlab-research/VisionZip` `visionzip/clip_encoder.py` (`CLIPVisionTower_VisionZip.forward`),
`visionzip/utils.py` (the key metric) and `visionzip/main.py` (`visionzip(model, dominant,
contextual)`; its README runs LLaVA-1.5 with `dominant=54, contextual=10`, 64 tokens). From the
tower's feature layer (layer -2 of CLIP: its attention, its keys and its output, all three the
same layer's), per image:

- dominant: CLS and the `dominant - 1` patches CLS attends to most (attention summed over heads),
  in token order;
- contextual: of the remaining tokens (in token order), `contextual` targets at a stride of
  `remaining // contextual`; every other remaining token goes to the target whose key (averaged
  over heads, L2-normalised) is most similar; a contextual token is its target's feature plus
  the mean of the features assigned to it;
- the projector maps `[dominant tokens, contextual tokens]` (`dominant + contextual` in all, CLS's
  feature among them, as the official path skips LLaVA's CLS-dropping `feature_select`), and the
  prompt is shortened to that many image tokens with compact positions.

Differences: the official code reads the eager attention weights and a patched attention's keys;
here both come from recomputing the layer's CLS row and keys on its input, so the tower may run
under any attention backend. With `contextual=0` no tokens are merged (the official code divides
by it). Its 128- and 192-token settings (108+20, 162+30) are in the paper, not in the released
code.

LLaVA-NeXT, as the official `visionzip/llava_arch.py` (`prepare_inputs_labels_for_multimodal_visionzip`,
`restore_image_features_sorted`): each crop selected alone (dominant + contextual per crop, so
the defaults give 64 x 5 = 320 on the 5-crop image; `--budget tokens=640` gives the paper's
108+20 per crop); the base crop's tokens as selected, then the tiles' dominant patches in raster
order over the whole tile grid (no unpadding, no newline tokens), then every tile's CLS, then
every tile's contextual tokens (`family.crop_layout`). The model packs every crop's patches, so
the projector maps the selection padded to the crop and the laid-out tokens replace the image's
tokens at the language model's input, positions compacted (what the official shorter prompt
gives). The Qwen line is refused (no CLS).
"""

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.families import ModelFacts
from vtcbench.methods.base import (
    Method,
    TowerFeatures,
    TowerSelection,
    check_positive,
    register,
)


@register
@dataclass
class VisionZip(TowerSelection):
    """VisionZip (section 3.2; official code `dvlab-research/VisionZip`, `visionzip/clip_encoder.py`):
    CLS and the dominant patches by CLS attention, plus contextual tokens merged by key similarity."""

    dominant: int = 54
    contextual: int = 10

    name: ClassVar[str] = "visionzip"
    description: ClassVar[str] = "keep CLS-attended dominant tokens and merge the rest into contextual ones, before the projector"

    def __post_init__(self) -> None:
        check_positive(self.name, "dominant", self.dominant)
        if self.contextual < 0:
            raise VtcbenchError(f"{self.name}: contextual={self.contextual} is out of range; valid: an integer >= 0")

    budget_knobs: ClassVar[tuple[str, ...]] = ("dominant", "contextual")

    def budget_candidates(self, n_image: int, n_layers: int) -> Iterator[Method]:
        """T tokens at the official split, 10 contextual in 64 (54+10; the paper's 108+20, 162+30)."""
        for total in range(1, n_image + 1):
            contextual = round(total * 10 / 64)
            yield dataclasses.replace(self, dominant=total - contextual, contextual=contextual)

    def validate_for(self, n_image: int, n_layers: int) -> None:
        if self.dominant + self.contextual > n_image:  # the prompt carries n_image placeholders
            raise VtcbenchError(
                f"{self.name}: dominant={self.dominant} + contextual={self.contextual} exceed the {n_image} image tokens; "
                f"valid: dominant + contextual <= {n_image}"
            )

    def pre_llm_tokens(self, n_image: int) -> int:
        return self.dominant + self.contextual

    def selection_macs(self, facts: ModelFacts, n_image: int, image_tokens_per_layer: list[int]) -> int:
        """CLS's query and every key at the feature layer, CLS's attention row, the key
        similarities of the merged tokens to the targets and their one-hot sums (per crop)."""
        c = facts.vision_hidden_size
        merged = facts.vision_n_tokens - self.dominant - self.contextual
        return facts.vision_crops * (self.cls_row_macs(facts) + merged * self.contextual * (c // facts.vision_n_heads + c))

    @torch.no_grad()
    def select_patches(self, tower: TowerFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = tower.output  # [images, 1 + n, width]
        images, length, width = hidden.shape
        top = tower.cls_attention[:, :, 1:].sum(dim=1).topk(self.dominant - 1, dim=1).indices + 1
        chosen = torch.cat([top.new_zeros(images, 1), top], dim=1)
        rest = torch.ones(images, length, dtype=torch.bool, device=hidden.device).scatter(1, chosen, torch.zeros_like(chosen, dtype=torch.bool))
        dominant = hidden[~rest].view(images, self.dominant, width)
        slots = chosen.sort(dim=1).values - 1  # CLS (token 0) first: -1
        if not self.contextual:
            return dominant, slots
        metric = tower.keys.mean(dim=1)[rest].view(images, length - self.dominant, -1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        others = hidden[rest].view(images, length - self.dominant, width)
        step = max(1, metric.shape[1] // self.contextual)
        targets = torch.arange(0, metric.shape[1], step, device=hidden.device)[: self.contextual]
        merged = ~torch.isin(torch.arange(metric.shape[1], device=hidden.device), targets)
        similarity = metric[:, merged] @ metric[:, targets].transpose(1, 2)
        assign = torch.zeros(images, int(merged.sum()), self.contextual, dtype=hidden.dtype, device=hidden.device)
        assign.scatter_(2, similarity.argmax(dim=2, keepdim=True), 1)
        counts = assign.sum(dim=1).clamp(min=1)[..., None]
        contextual = others[:, targets] + assign.transpose(1, 2) @ others[:, merged] / counts
        return torch.cat([dominant, contextual], dim=1), torch.cat([slots, slots.new_full((images, self.contextual), -2)], dim=1)
