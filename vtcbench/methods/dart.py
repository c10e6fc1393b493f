"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"): keep the image tokens least like a few pivot tokens.

Paper section 3 (Eq. 3-5) and the official code, `ZichenWen1/DART`
`llava/model/language_model/modeling_llama_self.py` (`DART.get_retained_image_token`, commit
9fee9fa; its scripts `scripts/v1_5/eval/*.sh`: `--pruned_layer 2 --pivot_image_token 4
--pivot_text_token 4 --max_num_trunction 128`). At the start of layer K, per sample:

1. pivots: the `pivot_image_tokens` image tokens and the `pivot_text_tokens` tokens after the
   image (the question and the template's tail, up to the last prompt token) with the largest L1
   norm of their layer-(K-1) keys after RoPE, every head concatenated;
2. for each pivot, in the order CPython iterates the set of their sequence indices (the official
   code loops over `set(image_pivots + text_pivots)`; the order decides which pivot takes a
   contested token), the `truncation // (pivots)` image tokens not yet taken whose hidden states
   (layer K's input through the final norm) have the lowest cosine similarity to the pivot's;
3. keep the image pivots and every token taken; positions stay the original ones.

It keeps `pivot_image_tokens + pivots * (truncation // pivots)` tokens (4 + 8 * 16 = 132 for the
official "128"). Indices are each sample's own, counted from its first unpadded token as in the
official batch-of-one code, so a sample keeps in a batch what it keeps alone.

Differences: the official code runs at batch size 1; its Qwen2-VL/2.5-VL ports derive the
per-pivot count from a reduction ratio (`int(N * (1 - ratio) / pivots)`), which `truncation`
= floor(N * (1 - ratio)) reproduces; its LLaVA-NeXT scripts keep 320 (`--set truncation=320`).
Keys come from recomputing layer K-1's projections on its input (the official code returns them
from a patched attention), so every attention backend gives the same selection.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtcbench.errors import VtcbenchError
from vtcbench.families import ModelFacts
from vtcbench.methods.base import Keep, LayerContext, Method, check_positive, register
from vtcbench.methods.kinds import IN_LLM, MethodKind


@register
@dataclass
class DART(Method):
    """DART (section 3, Eq. 3-5; official code `ZichenWen1/DART`, `modeling_llama_self.py`): from
    layer K keep the image pivots and, per pivot, the image tokens least similar to it."""

    layer: int = 2
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4
    truncation: int = 128

    name: ClassVar[str] = "dart"
    kind: ClassVar[MethodKind] = IN_LLM
    description: ClassVar[str] = "keep image tokens least similar to key-norm pivots at layer K (duplication-aware)"

    def __post_init__(self) -> None:
        check_positive(self.name, "pivot_image_tokens", self.pivot_image_tokens)
        check_positive(self.name, "pivot_text_tokens", self.pivot_text_tokens)
        if self.truncation < 0:
            raise VtcbenchError(f"{self.name}: truncation={self.truncation} is out of range; valid: an integer >= 0")

    @property
    def per_pivot(self) -> int:
        return self.truncation // (self.pivot_image_tokens + self.pivot_text_tokens)

    def validate_for(self, n_image: int, n_layers: int) -> None:
        self._check_layer("layer", self.layer, n_layers, low=1)
        kept = self.action_count(self.layer, n_image, n_image, n_layers)
        if kept > n_image:
            most = (n_image - self.pivot_image_tokens) // (self.pivot_image_tokens + self.pivot_text_tokens) * (
                self.pivot_image_tokens + self.pivot_text_tokens)
            raise VtcbenchError(
                f"{self.name}: {self.pivot_image_tokens} image pivots and truncation={self.truncation} keep {kept} of "
                f"{n_image} image tokens; valid truncation: 0..{most + self.pivot_image_tokens + self.pivot_text_tokens - 1}"
            )

    budget_knobs: ClassVar[tuple[str, ...]] = ("truncation",)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return range(0, n_image + 1)

    def plan(self, n_layers: int) -> dict[int, int | None]:
        return {self.layer: self.layer - 1}

    def action_count(self, layer: int, n_current: int, n_image_original: int, n_layers: int) -> int:
        return self.pivot_image_tokens + (self.pivot_image_tokens + self.pivot_text_tokens) * self.per_pivot

    def score_layer_macs(self, facts: ModelFacts, n: int, text_tokens: int) -> int:
        """Keys of the score layer (and the query projection `family.query_key` also forms);
        DART reads no attention row, and its cosine similarities are not matrix products."""
        return facts.hidden_size * facts.hidden_size + n * facts.hidden_size * facts.n_kv_heads * facts.head_dim

    def select(self, ctx: LayerContext) -> Keep:
        keys = ctx.score_keys()  # [batch, kv_heads, seq, head_dim]
        norms = keys.permute(0, 2, 1, 3).flatten(2).norm(p=1, dim=-1)  # [batch, seq]
        normed = ctx.final_norm(ctx.hidden_states)
        kept = []
        for b, n in enumerate(ctx.n_image_per_sample):
            columns = ctx.image_index[b, :n]
            start = int(ctx.valid[b].nonzero()[0])  # the sample's own index 0 (after left padding)
            text = torch.arange(int(columns[-1]) + 1, int(ctx.query[b]) + 1, device=columns.device)
            kept.append(self._retained(normed[b], norms[b], columns, text, start))
        return Keep(torch.stack(kept))

    def _retained(self, hidden: torch.Tensor, norms: torch.Tensor, image: torch.Tensor, text: torch.Tensor, start: int) -> torch.Tensor:
        """The official selection on one sample, in its own sequence indices (`column - start`),
        with the same Python sets, so pivots are visited in the same order. Returns the kept
        image tokens as ascending ranks among the sample's image tokens."""
        if len(text) < self.pivot_text_tokens:
            raise VtcbenchError(
                f"{self.name}: pivot_text_tokens={self.pivot_text_tokens} exceeds the {len(text)} tokens after the image"
            )
        image_indices = (image[norms[image].topk(self.pivot_image_tokens).indices] - start).tolist()
        query_indices = (text[norms[text].topk(self.pivot_text_tokens).indices] - start).tolist()
        first = int(image[0]) - start
        chosen = set(image_indices + query_indices)
        valid = set(range(first, first + len(image))) - set(image_indices)
        valid_list = list(valid)
        for item in list(chosen):
            vectors = hidden[torch.tensor(valid_list, dtype=torch.long, device=hidden.device) + start]
            similarity = -F.cosine_similarity(hidden[item + start], vectors, dim=-1)
            taken = [valid_list[i] for i in similarity.topk(self.per_pivot).indices.tolist()]
            chosen.update(taken)
            valid.difference_update(taken)
            valid_list = list(valid)
        chosen.difference_update(query_indices)
        return torch.tensor(sorted(chosen), device=image.device) - first
