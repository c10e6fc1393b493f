"""VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs"): the tokens CLS attends to most, plus diverse ones, chosen
before the projector.

Paper section 3 and the official code, `Theia-4869/VisPruner` `llava/model/llava_arch.py`
(`encode_images`) and `llava/model/multimodal_encoder/clip_encoder.py` (`feature_select`); its
README runs LLaVA-1.5 with `mme.sh 64 0.75` ("48 important tokens and 16 diverse tokens"). From
the tower's feature layer (CLIP layer -2), per image:

- important: the int(tokens * important_ratio) patches with the largest CLS attention (the CLS
  row of the softmax over every token, averaged over heads);
- diverse: the rest, in descending attention, are thinned in rounds until tokens - important
  remain: each round splits them alternately into A and B, scores each A token by its largest
  cosine similarity (layer -2 features) to a B token, drops the min(8, surplus) highest-scoring
  A tokens, and continues with the surviving A tokens (by descending score) then B;
- the chosen patches, in raster order (CLS not among them), go through the projector; the prompt
  is shortened to them, compact positions.

Differences: the official code reads the eager attention weights; here CLS's row is recomputed
from the layer's input, so the tower may run under any attention backend. The projector maps
only the chosen patches (the official maps all and masks; a per-token MLP gives the same). Its
argparse default keeps all 576 tokens; the default here is the README's 64-token setting.
Settings where the number of remaining tokens is odd crash the official pairing; they are
refused.

LLaVA-NeXT, as the official `prepare_inputs_labels_for_multimodal`, whose `mm_patch_merge_type`
is stripped of `_unpad`: `tokens` per crop (base and tiles, 320 on the 5-crop image at the
defaults), laid out as the base crop's, then the tiles' in raster order over the whole tile grid,
without unpadding or newline tokens (`family.crop_layout`). The model packs every crop's patches,
so the projector maps the selection padded to the crop, and the laid-out tokens replace the
image's tokens at the language model's input, positions compacted (the official shorter prompt).
The Qwen line is refused (no CLS).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.families import ModelFacts
from vtcbench.methods.base import (
    TowerFeatures,
    TowerSelection,
    check_positive,
    check_ratio,
    register,
)

ROUND = 8  # A tokens dropped per round at most (the official `min(8, R - diverse_token_num)`)


@register
@dataclass
class VisPruner(TowerSelection):
    """VisPruner (section 3; official code `Theia-4869/VisPruner`, `llava/model/llava_arch.py`):
    important patches by CLS attention, diverse patches by thinning near-duplicates."""

    tokens: int = 64
    important_ratio: float = 0.75

    name: ClassVar[str] = "vispruner"
    description: ClassVar[str] = "keep CLS-attended patches plus diverse ones (duplicates thinned), before the projector"

    def __post_init__(self) -> None:
        check_positive(self.name, "tokens", self.tokens)
        check_ratio(self.name, "important_ratio", self.important_ratio, high_closed=True)

    budget_knobs: ClassVar[tuple[str, ...]] = ("tokens",)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return range(1, n_image + 1)

    @property
    def important(self) -> int:
        return int(self.tokens * self.important_ratio)

    def rounds(self, n_image: int) -> list[tuple[int, int]]:
        """(remaining tokens, A tokens dropped) of each thinning round."""
        remaining, diverse, rounds = n_image - self.important, self.tokens - self.important, []
        while diverse > 0 and remaining - diverse > 0:
            drop = min(ROUND, remaining - diverse)
            rounds.append((remaining, drop))
            remaining -= drop
        return rounds

    def validate_for(self, n_image: int, n_layers: int) -> None:
        """Refuse what the official loop cannot run: an odd number of tokens to pair, or a round
        that would drop more A tokens than there are."""
        if self.tokens > n_image:
            raise VtcbenchError(f"{self.name}: tokens={self.tokens} exceeds the {n_image} image tokens; valid range: 1..{n_image}")
        setting = f"tokens={self.tokens} with important_ratio={self.important_ratio}"
        if self.tokens > self.important and (n_image - self.important) % 2:
            raise VtcbenchError(
                f"{self.name}: {setting} leaves {n_image - self.important} patches to pair, an odd number "
                "(the official pairing fails); choose them so that it is even"
            )
        for remaining, drop in self.rounds(n_image):
            if remaining // 2 < drop:
                raise VtcbenchError(
                    f"{self.name}: {setting} reaches a round of {remaining} tokens that must drop {drop} of its {remaining // 2} "
                    "A tokens (the official loop fails); keep more diverse tokens or fewer important ones"
                )

    def pre_llm_tokens(self, n_image: int) -> int:
        return self.tokens

    def selection_macs(self, facts: ModelFacts, n_image: int, image_tokens_per_layer: list[int]) -> int:
        """CLS's query, the layer's keys and CLS's row; each round's A x B similarities (per crop)."""
        c = facts.vision_hidden_size
        return facts.vision_crops * (self.cls_row_macs(facts) + sum((remaining // 2) ** 2 * c for remaining, _ in self.rounds(n_image)))

    @torch.no_grad()
    def select_patches(self, tower: TowerFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        patches = tower.output[:, 1:]  # [images, n, width]
        images, n, _ = patches.shape
        rows = torch.arange(images, device=patches.device)[:, None]
        order = tower.cls_attention[:, :, 1:].mean(dim=1).argsort(dim=-1, descending=True)
        important, residual = order[:, : self.important], order[:, self.important :]
        diverse = self.tokens - self.important
        unit = patches / patches.norm(dim=-1, keepdim=True)
        while diverse > 0:
            remaining = residual.shape[1]
            drop = min(ROUND, remaining - diverse)
            if drop <= 0:
                break
            tokens = unit[rows.expand(-1, remaining), residual]
            a, b = tokens[:, ::2], tokens[:, 1::2]
            scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
            distinct = scores.argsort(dim=-1, descending=True)[:, drop:]
            residual = torch.cat([residual[:, ::2][rows.expand(-1, distinct.shape[1]), distinct], residual[:, 1::2]], dim=-1)
        chosen = torch.cat([important, residual], dim=-1) if diverse > 0 else important
        chosen = chosen.sort(dim=-1).values
        return patches[rows.expand(-1, chosen.shape[1]), chosen], chosen
