"""PruMerge+ (Shang et al., ICCV 2025, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient
Large Multimodal Models"): the CLS-attention outliers plus spatially uniform samples, each merged
with its nearest neighbours by key similarity, before the projector; the count adapts per image.

Paper section 3 (PruMerge, and PruMerge+'s spatial supplement) and the official code,
`42Shawn/LLaVA-PruMerge` `llava/model/multimodal_encoder/clip_encoder.py`
(`token_prune_merge_advanced_plus(images, if_adaptive=True)`, which `forward` calls, and
`outlier_dectection`). Per image, with N patches of the tower's feature layer (CLIP layer -2)
and the queries and keys of the layer after it (layer 23 of 24, `q_proj`/`k_proj` of its
`layer_norm1`, full width C, no heads):

- attention: softmax(q·kᵀ · C^-0.5) over CLS and the patches; CLS's row over the patches;
- outliers: `ratio` = the share of patches above Q3 + 1.5·IQR (numpy's linear percentiles);
  the int(N·ratio) patches with the most attention, most attended first;
- samples: `range(0, N - 1, int(int(1 / ratio) / 3))` (the official `arange(0, 575, ...)`),
  those not among the outliers, ascending, after them;
- each kept token is its feature plus the attention-weighted sum of the features of the 32
  other patches whose keys (L2-normalised) are most similar to its own; one more token is the
  attention-weighted sum of every patch not kept;
- the projector maps them in that order (kept, then the extra one): int(N·ratio) + samples + 1
  tokens, compact positions.

Differences: the official code scores a batch's outliers over the whole batch at once (it runs at
batch 1; the samples' concatenation only works there); here each image is scored alone, so a
batch gives what each image gives alone. An image with no outlier (the official code divides by
zero) keeps its most attended patch as its one outlier. Where every patch is kept (over a sixth
of them outliers, a sampling stride of 1, the last patch among the outliers) the official code
appends an extra token summing no patch, all zeros; it is left out here, so an image never keeps
more than its N placeholders. Fewer than 33 patches merge N - 1 neighbours. The prompt keeps its N placeholders per image and the padded projected tokens are
dropped at the language model's input with compact positions (`ADAPTIVE_PRE_LLM`), which is what
a prompt shortened per image computes; the projector maps N tokens per image, not the kept ones.
LLaVA-NeXT (the official code has no AnyRes path) and the Qwen line (no CLS) are refused.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from vtcbench.errors import VtcbenchError
from vtcbench.families import ModelFacts, family_of
from vtcbench.methods.base import (
    Keep,
    LayerContext,
    Method,
    PositionPolicy,
    TowerFeatures,
    register,
)
from vtcbench.methods.kinds import ADAPTIVE_PRE_LLM, MethodKind

NEIGHBOURS = 32  # the official `torch.topk(cos_sim_matrix, k=int(32))`


def outlier_ratio(attention: torch.Tensor) -> float:
    """The share of values above Q3 + 1.5·IQR, as the official `outlier_dectection` (numpy)."""
    values = attention.to(dtype=torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)


@register
@dataclass
class PruMergePlus(Method):
    """PruMerge+ (section 3; official code `42Shawn/LLaVA-PruMerge`, `clip_encoder.py`): CLS-attention
    outliers plus uniform samples, merged with their key-nearest neighbours; adaptive count."""

    name: ClassVar[str] = "prumerge_plus"
    kind: ClassVar[MethodKind] = ADAPTIVE_PRE_LLM
    records_kept_patches: ClassVar[bool] = False  # a selection before the LLM
    position_policy: ClassVar[PositionPolicy] = "compact"
    description: ClassVar[str] = "keep CLS-attention outliers plus uniform samples, each merged with its nearest keys, before the projector"
    reads_tower_cls: ClassVar[bool] = True
    trainable: ClassVar[bool] = False  # the selection reads the tower under no_grad hooks
    adaptive: ClassVar[str | None] = "a number of tokens per image set by its CLS-attention outliers"
    budget_refusal: ClassVar[str] = "it keeps a number of tokens per image set by the image (its CLS-attention outliers)"

    def check_model(self, model: Any) -> None:
        """Refuse a tower whose feature layer is its last: the attention comes from the next one."""
        super().check_model(model)
        config = getattr(model, "config", model)
        if family_of(config).tower_layers_after_feature(config) < 1:
            raise VtcbenchError(
                f"{self.name} reads the queries and keys of the tower layer after the one the projector reads "
                "(LLaVA-1.5: layer 23 after layer -2); this model's projector reads the tower's last layer"
            )

    def plan(self, n_layers: int) -> dict[int, int | None]:
        return {0: None}  # drop each image's padding at the language model's input

    def image_tokens_per_layer(self, n_image: int, n_layers: int, crops: int = 1) -> list[int]:
        raise VtcbenchError(
            f"{self.name} keeps {self.adaptive}: its visual tokens per layer are known only from the images; "
            "`vtcbench run` records each sample's and costs it"
        )

    def selection_macs(self, facts: ModelFacts, n_image: int, image_tokens_per_layer: list[float]) -> float:
        """The next layer's CLS query and keys, CLS's row and the kept tokens' key similarities to
        every patch (matrix products only; the neighbour sums are elementwise)."""
        c, n = facts.vision_hidden_size, facts.vision_n_tokens - 1
        kept = image_tokens_per_layer[0] - 1
        return c * c + (n + 1) * c * c + (n + 1) * c + kept * n * c

    @torch.no_grad()
    def pre_projector(self, tower: TowerFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        features = tower.output[:, 1:]  # the patches (`feature_select`, 'patch')
        images, n, width = features.shape
        query, keys = tower.next_layer_cls_query_keys()
        attention = ((query @ keys.transpose(1, 2)) * width**-0.5).softmax(dim=-1)[:, 0, 1:]
        keys = F.normalize(keys[:, 1:], p=2, dim=-1)
        out = features.new_zeros(images, n, width)
        real = torch.zeros(images, n, dtype=torch.bool, device=features.device)
        for image in range(images):
            merged = self._select(features[image], attention[image], keys[image])  # at most n tokens
            out[image, : merged.shape[0]] = merged
            real[image, : merged.shape[0]] = True
        return out, real

    @staticmethod
    def _select(features: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """One image: [kept + 1, width] from its patches, CLS's attention and normalised keys."""
        n = features.shape[0]
        ratio = outlier_ratio(attention) or 1 / n
        top = attention.topk(int(n * ratio)).indices
        stride = max(1, int(int(1 / ratio) / 3))
        taken = set(top.tolist())
        samples = [x for x in range(0, n - 1, stride) if x not in taken]
        kept = torch.cat([top, torch.tensor(samples, dtype=top.dtype, device=top.device)])
        similarity = keys[kept] @ keys.T
        similarity[torch.arange(kept.shape[0], device=kept.device), kept] = float("-inf")  # not itself
        neighbours = similarity.topk(min(NEIGHBOURS, n - 1), dim=1).indices
        centres = features[kept] + (features[neighbours] * attention[neighbours, None]).sum(dim=1)
        rest = torch.ones(n, dtype=torch.bool, device=features.device)
        rest[kept] = False
        if not rest.any():  # every patch kept (a sampling stride of 1): no extra token, which would be all zeros
            return centres
        extra = (features[rest] * attention[rest, None]).sum(dim=0, keepdim=True)
        return torch.cat([centres, extra])

    def select(self, ctx: LayerContext) -> Keep:
        """Each sample's real tokens: its images' runs, in order, each cut to the image's count."""
        if ctx.tower_kept is None:
            raise RuntimeError(f"{self.name}: the tower hooks recorded no selection before the language model")
        rows = ctx.tower_kept.reshape(-1).split(ctx.n_image_per_sample)
        kept = [row.nonzero().squeeze(1) for row in rows]
        counts = [len(k) for k in kept]
        indices = torch.stack([F.pad(k, (0, max(counts) - len(k))) for k in kept])
        return Keep(indices, counts=None if len(set(counts)) == 1 else tuple(counts))
