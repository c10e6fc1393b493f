"""SparseVLM+ (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference"; its v2.0, SparseVLM+): text-guided pruning at three layers.

Paper sections 3.2-3.3 (raters, sparsification) and 4.2-4.3 of SparseVLM+ (gravity correction,
head selection); the official code `Gumpest/SparseVLMs` at its v2.0 (`USE_VERSION=2_0`), files
`llava/model/language_model/modelling_sparse_llama.py` (the layer loop, `pruning_loc=[2, 6, 15]`)
and `score.py` (`sparse_token_list_*`, `select_attn_head_by_sum`, `attn_postprocess_topk`). Per
sample:

- raters, once, on the decoder's input embeddings: the tokens after the image (the question and
  the template's tail) whose softmax relevance to the image tokens (raw dot products, softmax over
  the text tokens, averaged over the image tokens) is above its mean;
- after each pruning layer l (2, 6, 15 of 32), from that layer's attention: the raters' rows over
  the image tokens, divided by the positional part of q.k (RoPE of all-ones vectors, / sqrt(d):
  the gravity correction), averaged over the 14 heads whose corrected rater-to-image attention
  sums highest, then over the raters; the top min(count, N - 1) image tokens are kept, in order,
  with their original positions, from layer l + 1 on;
- counts per stage from the official table for the `tokens` setting, its RETAIN_TOKN (192: 300,
  200, 118; 128: 238, 108, 60; 96: 246, 54, 28; 64: 66, 34, 20); layer 2 itself still sees all
  576, so the mean over LLaVA-1.5's 32 layers is 206.8, 144.1, 113.9 and 81.8.

Why v2.0: the official default (v1.5) renumbers positions after each pruning and, at decode,
gives each layer its own cache length as the new token's position; v2.0 keeps the original
positions and drops token recycling, which is the engine's `keep` policy. Differences: where no
text token is above the mean (a single one after the image) every one rates (the official
averages over none: NaN). The
official code runs one sample of LLaVA-1.5 at a time in fp16 with 32 heads; here each sample of
a batch is scored alone, in float32, from recomputed attention rows (any backend). On other
shapes the layers are the official ones scaled to the depth (round(l L / 32)), the counts scaled
to the image tokens (round(c N0 / 576)) and the heads to the head count (round(14 H / 32)).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.families import ModelFacts
from vtcbench.methods.base import LayerContext, ScoredDrop, register

#: `score.py` at v2.0: visual tokens kept after each pruning layer, by RETAIN_TOKN
COUNTS: dict[int, tuple[int, int, int]] = {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}
LAYERS = (2, 6, 15)  # `pruning_loc`, of LLaVA-1.5's 32 layers
HEADS = 14  # `select_attn_head_by_sum`'s topk(14), of 32 heads
OFFICIAL_TOKENS, OFFICIAL_LAYERS, OFFICIAL_HEADS = 576, 32, 32


@register
@dataclass
class SparseVLM(ScoredDrop):
    """SparseVLM+ (SparseVLM v2.0; sections 3.2-3.3 and SparseVLM+ 4.2-4.3; official code
    `Gumpest/SparseVLMs`, `modelling_sparse_llama.py` and `score.py`): rater-guided pruning at
    three layers, gravity-corrected attention over the top heads, original positions kept."""

    tokens: int = 192

    name: ClassVar[str] = "sparsevlm"
    description: ClassVar[str] = "prune image tokens at 3 layers by the attention of text raters (SparseVLM+ v2.0)"
    budget_knobs: ClassVar[tuple[str, ...]] = ("tokens",)

    def __post_init__(self) -> None:
        if self.tokens not in COUNTS:
            raise VtcbenchError(f"{self.name}: tokens={self.tokens} has no official count table; valid: "
                                f"{', '.join(map(str, sorted(COUNTS)))}")

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return sorted(COUNTS)

    def pruning_layers(self, n_layers: int) -> tuple[int, ...]:
        return tuple(round(layer * n_layers / OFFICIAL_LAYERS) for layer in LAYERS)

    def validate_for(self, n_image: int, n_layers: int) -> None:
        layers = self.pruning_layers(n_layers)
        if len(set(layers)) < len(layers) or layers[-1] + 1 >= n_layers:
            raise VtcbenchError(f"{self.name}: a {n_layers}-layer model has no room for three pruning layers ({layers})")

    def plan(self, n_layers: int) -> dict[int, int | None]:
        return {layer + 1: layer for layer in self.pruning_layers(n_layers) if layer + 1 < n_layers}

    def action_count(self, layer: int, n_current: int, n_image_original: int, n_layers: int) -> int:
        stage = self.pruning_layers(n_layers).index(layer - 1)
        count = round(COUNTS[self.tokens][stage] * n_image_original / OFFICIAL_TOKENS)
        return max(0, min(count, n_current - 1))

    def score_layer_macs(self, facts: ModelFacts, n: int, text_tokens: int) -> int:
        """An upper bound: every key, and the query, attention row and gravity row of every text
        token (the raters are the text after the image above the mean, a data-dependent share)."""
        d = facts.hidden_size
        return n * d * facts.n_kv_heads * facts.head_dim + text_tokens * (d * d + n * d + n * facts.head_dim)

    def heads(self, n_heads: int) -> int:
        return max(1, round(HEADS * int(n_heads) / OFFICIAL_HEADS))

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """[batch, n]: each image token's gravity-corrected rater attention over the top heads
        (`ScoredDrop` keeps each sample's top `action_count`, in order)."""
        raters = [self._rater_columns(ctx, b, n) for b, n in enumerate(ctx.n_image_per_sample)]
        width = max(len(r) for r in raters)  # one batched read; a shorter row repeats its first rater
        columns = torch.stack([torch.cat([r, r[:1].expand(width - len(r))]) for r in raters])
        rows = ctx.score_layer.attention_rows(columns)  # [batch, heads, raters, seq]
        gravity = ctx.score_layer.rope_dot(columns)  # [batch, raters, seq]
        scores = rows.new_zeros(ctx.image_index.shape)
        for b, n in enumerate(ctx.n_image_per_sample):
            m = len(raters[b])
            corrected = (rows[b, :, :m] / gravity[b, None, :m])[:, :, ctx.image_index[b, :n]]  # [heads, raters, image]
            top = corrected.sum(dim=(1, 2)).topk(self.heads(corrected.shape[0])).indices
            scores[b, :n] = corrected[top].mean(dim=0).mean(dim=0)
        return scores

    def _rater_columns(self, ctx: LayerContext, b: int, n: int) -> torch.Tensor:
        """Sample b's raters as columns of the current sequence."""
        last = int(ctx.image_index[b, n - 1])
        text = torch.arange(last + 1, int(ctx.query[b]) + 1, device=ctx.image_index.device)  # after the image, to the prompt's end
        if not len(text):
            raise VtcbenchError(f"{self.name}: a prompt has no text after its image to rate the image tokens with")
        return text[self._raters(ctx, b, ctx.index0[b, text])]

    def _raters(self, ctx: LayerContext, b: int, text0: torch.Tensor) -> torch.Tensor:
        """Positions (among the tokens after the image) of sample b's raters, from the layer-0
        embeddings: text tokens whose softmax relevance to the image is above the mean. `text0`:
        those tokens' layer-0 columns; the image is the N0 tokens right before them."""
        embeds = ctx.embeddings0[b]
        first = int(text0[0])
        visual = embeds[first - ctx.n_image_original_per_sample[b] : first].float()
        relevance = (visual @ embeds[text0].float().T).softmax(dim=1).mean(dim=0)
        raters = torch.nonzero(relevance > relevance.mean()).flatten()
        # none above the mean (one text token, or all tied): every one rates, where the official
        # mean over no rater is NaN
        return raters if len(raters) else torch.arange(len(relevance), device=relevance.device)
