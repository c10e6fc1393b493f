"""K-means merging: LLaVolta Table 3's "k-means" compressor, training-free use.

At the start of layer K, cluster each sample's image hidden states into `clusters` groups
(Lloyd's algorithm, `iters` rounds, float32) and replace the image tokens by the centroids.
A centroid's position id is the floor of the mean of its members' ids (LLaVolta's pooled-token
rule) and it takes the place of its earliest member in the sequence.

Choices the paper leaves open: initial centroids are the tokens at evenly spaced raster indices
(deterministic, so batch equals single); an empty cluster is re-seeded with the token farthest
from its centroid, so every sample yields exactly `clusters` tokens.

On M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) a merged token takes, per axis (temporal, height,
width), the floor of the mean of its members' ids, the rule above applied to each row; on
Qwen3-VL it also receives the mean of its members' DeepStack features.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.families import ModelFacts
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
class KMeans(Method):
    """LLaVolta's k-means compressor (section 4, Table 3), training-free: image tokens replaced at
    layer K by `clusters` centroids. No official code: LLaVolta's released
    `llava/model/language_model/llava_llama.py` implements only average pooling (`avgpool1d`)."""

    layer: int = 2
    clusters: int = 72
    iters: int = 10

    name: ClassVar[str] = "kmeans"
    kind: ClassVar[MethodKind] = IN_LLM
    position_policy: ClassVar[PositionPolicy] = "pooled"
    description: ClassVar[str] = "replace image tokens by k-means centroids at layer K"

    def __post_init__(self) -> None:
        check_positive(self.name, "clusters", self.clusters)
        check_positive(self.name, "iters", self.iters)

    def validate_for(self, n_image: int, n_layers: int) -> None:
        self._check_layer("layer", self.layer, n_layers)
        if self.clusters > n_image:
            raise VtcbenchError(
                f"{self.name}: clusters={self.clusters} exceeds the {n_image} image tokens; valid range: 1..{n_image}"
            )

    budget_knobs: ClassVar[tuple[str, ...]] = ("clusters",)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return range(1, n_image + 1)

    def plan(self, n_layers: int) -> dict[int, int | None]:
        return {self.layer: None}

    def action_count(self, layer: int, n_current: int, n_image_original: int, n_layers: int) -> int:
        return self.clusters

    def selection_macs(self, facts: ModelFacts, n_image: int, image_tokens_per_layer: list[int]) -> int:
        """Per Lloyd round: distances and centroid sums, n * k * d each."""
        n = image_tokens_per_layer[self.layer - 1] if self.layer else n_image
        return self.iters * 2 * n * self.clusters * facts.hidden_size

    def select(self, ctx: LayerContext) -> Replace:
        """Cluster each sample's own image tokens (the first `n_image_per_sample[b]` of its row):
        every sample yields `clusters` centroids, so rows stay equal."""
        points = ctx.image_hidden()
        positions = ctx.image_positions()
        results = [self._cluster(points[b, :n].float(), positions[b, :n]) for b, n in enumerate(ctx.n_image_per_sample)]
        hidden, pos, anchors = (torch.stack(parts) for parts in list(zip(*results))[:3])
        groups = torch.zeros(points.shape[:2], dtype=torch.long, device=points.device)  # a shorter row's padding: never read
        for b, result in enumerate(results):
            groups[b, : result[3].shape[0]] = result[3]
        return Replace(hidden=hidden.to(points.dtype), position_ids=pos, anchors=anchors, groups=groups)

    def _cluster(self, points: torch.Tensor, positions: torch.Tensor):
        n, k = points.shape[0], self.clusters
        init = torch.linspace(0, n - 1, k, device=points.device).round().long()
        centroids = points[init].clone()
        for _ in range(self.iters):
            assign = torch.cdist(points, centroids).argmin(dim=1)
            for empty in torch.nonzero(torch.bincount(assign, minlength=k) == 0).flatten().tolist():
                distance = (points - centroids[assign]).norm(dim=1)
                distance[torch.bincount(assign, minlength=k)[assign] <= 1] = -1  # never empty another cluster
                assign[distance.argmax()] = empty
            one_hot = torch.nn.functional.one_hot(assign, k).to(points.dtype)  # [n, k]
            counts = one_hot.sum(dim=0)
            centroids = (one_hot.T @ points) / counts.unsqueeze(1)
        members = one_hot.T.bool()  # [k, n]
        index = torch.arange(n, device=points.device)
        first = torch.where(members, index, n).min(dim=1).values
        mean_pos = (one_hot.T @ positions.to(points.dtype)) / counts[:, None]  # [k, rows]
        order = first.argsort()
        rank = order.argsort()  # a cluster's place among the centroids, in anchor order
        return centroids[order], mean_pos[order].floor().long(), first[order], rank[assign]
