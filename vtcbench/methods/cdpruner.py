"""CDPruner (Zhang et al., 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs"): the projected image tokens chosen by a determinantal point process
conditioned on the question, before the LLM.

Paper section 3 (conditional similarity, DPP selection) and the official code,
`Theia-4869/CDPruner` `llava/model/llava_arch.py` (`encode_images`) and
`llava/model/multimodal_encoder/clip_encoder.py` (`load_text_tower`, `forward`); its README runs
LLaVA-1.5 with `mme.sh 64` and `gqa.sh 128` (`--visual_token_num`). Per image, with N patches:

- similarity: the cosine similarity of the projected tokens (`mm_projector` output, normalised
  in the model's dtype, then float32);
- relevance: the question through CLIP's text tower (`clip`, the checkpoint the vision tower
  comes from: tokenised whole, zero-padded to 77-token chunks, each chunk's pooled projected
  embedding) against the patches of the tower's feature layer (CLIP layer -2) through its
  `post_layernorm` and CLIP's `visual_projection`; relevance = the mean over chunks of minus
  their cosine, min-max normalised as `(r - min + 1e-6) / (max - min)`;
- kernel L = diag(r) S diag(r); the official greedy MAP inference (Chen et al.'s incremental
  Cholesky) picks `tokens` tokens, kept in raster order; the prompt is shortened to them.

The question is the request's text without `<image>` and without the answer-format line the
official loader strips ("Answer the question using a single word or phrase.").

On LLaVA-NeXT, as the official code: `tokens` per crop (base and tiles), the relevance
normalised over all the image's crops, the kept tokens laid out as its
`prepare_inputs_labels_for_multimodal` lays them out with `mm_patch_merge_type` stripped of
`_unpad` (the base crop's, then the tiles' in raster order over the whole tile grid, without
unpadding or newline tokens); they replace the image's tokens at the language model's input
(`family.crop_layout`). The Qwen line is refused (no CLIP text tower; the official code has no
Qwen port).

Differences: the official code runs one prompt at a time and normalises the relevance over its
whole batch (one image's crops); here each image is normalised alone, so a batch gives what each
prompt gives alone. The official `theta` reweighting is commented out there and absent here.
With `tokens` = N every token is kept without running the MAP inference, whose last steps divide
by gains of rounding size (the official loop may then pick a token twice).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.families import FAMILIES, ModelFacts, family_of
from vtcbench.methods.base import (
    LayerContext,
    Method,
    PositionPolicy,
    Replace,
    check_positive,
    crop_replacement,
    register,
)
from vtcbench.methods.kinds import QUESTION_PRE_LLM, MethodKind

#: what the official `model_vqa_loader.py` removes from a question before the text tower
ANSWER_FORMAT = "\nAnswer the question using a single word or phrase."


def greedy_map(kernel: torch.Tensor, steps: int) -> torch.Tensor:
    """The official fast greedy MAP of a DPP with kernels [images, n, n]: [images, steps] indices,
    ascending (each step the token of largest remaining marginal gain)."""
    images, n, _ = kernel.shape
    rows = torch.arange(images, device=kernel.device)
    cis = kernel.new_zeros(steps, images, n)
    gains = kernel.diagonal(dim1=1, dim2=2).clone()
    chosen = torch.empty(steps, images, dtype=torch.long, device=kernel.device)
    for step in range(steps):
        best = gains.argmax(dim=-1)
        chosen[step] = best
        eis = (kernel[rows, best] - torch.einsum("tb,tbn->bn", cis[:step, rows, best], cis[:step])) / gains[rows, best].sqrt().unsqueeze(-1)
        cis[step] = eis
        gains -= eis.square()
        gains[rows, best] = float("-inf")
    return chosen.T.sort(dim=1).values


@register
@dataclass
class CDPruner(Method):
    """CDPruner (section 3; official code `Theia-4869/CDPruner`, `llava_arch.py`): a DPP over the
    projected tokens, its kernel conditioned on the question's CLIP relevance."""

    tokens: int = 64
    clip: str = "openai/clip-vit-large-patch14-336"

    name: ClassVar[str] = "cdpruner"
    kind: ClassVar[MethodKind] = QUESTION_PRE_LLM
    records_kept_patches: ClassVar[bool] = False  # a selection before the LLM
    selects_per_crop: ClassVar[bool] = True
    position_policy: ClassVar[PositionPolicy] = "compact"  # (on crops) as the shortened prompt
    description: ClassVar[str] = "keep the projected tokens a DPP picks, its kernel conditioned on the question's CLIP relevance"
    reads_text_side: ClassVar[bool] = True
    trainable: ClassVar[bool] = False  # the selection runs under no_grad
    budget_knobs: ClassVar[tuple[str, ...]] = ("tokens",)

    def __post_init__(self) -> None:
        check_positive(self.name, "tokens", self.tokens)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return range(1, n_image + 1)

    def validate_for(self, n_image: int, n_layers: int) -> None:
        if self.tokens > n_image:
            raise VtcbenchError(f"{self.name}: tokens={self.tokens} exceeds the {n_image} image tokens; valid range: 1..{n_image}")

    def pre_llm_tokens(self, n_image: int) -> int:
        return self.tokens

    def check_loaded(self, model: Any, processor: Any) -> None:
        """Load the text side now (once per process), so a missing or mismatched CLIP checkpoint
        is refused before a run writes anything."""
        family_of(model).text_side(model, self.clip)

    def select(self, ctx: LayerContext) -> Replace:
        return crop_replacement(ctx)

    def query(self, question: str) -> str:
        """The text the official code gives the text tower: the question without `<image>` and
        without the answer-format line."""
        return question.replace("<image>", "").replace(ANSWER_FORMAT, "").strip()

    def selection_macs(self, facts: ModelFacts, n_image: int, image_tokens_per_layer: list[float]) -> int:
        """One 77-token chunk through the text tower (a question of up to 75 tokens) and its
        projection, the patches' projection, the relevance, the tokens' similarity matrix and the
        DPP's updates (sum over steps t of t N), the last four per crop."""
        text = FAMILIES[facts.family].text_tower_facts(self.clip)
        p, w = text.positions, text.width
        text_macs = text.layers * (4 * p * w * w + 2 * p * p * w + 2 * p * w * text.ffn) + w * text.projection
        n, t = n_image, self.tokens
        patches = n * facts.vision_hidden_size * text.projection + n * text.projection
        return text_macs + facts.vision_crops * (patches + n * n * facts.hidden_size + n * t * (t - 1) // 2)

    @torch.no_grad()
    def question_slots(self, projected: torch.Tensor, patch_embeds: torch.Tensor, text_embeds: list[torch.Tensor],
                       crops: list[int]) -> torch.Tensor:
        """[crops, tokens] the kept tokens of each crop (ascending) of the projected tokens
        [crops, n, d], from the patches' embeddings and each image's question's (one per image,
        its crops `crops[i]` in a row), the relevance normalised over each image's crops."""
        n = projected.shape[1]
        if self.tokens == n:  # every token: the greedy MAP's last steps would divide by rounding-size gains
            return torch.arange(n, device=projected.device).expand(projected.shape[0], -1)
        unit = (projected / projected.norm(dim=-1, keepdim=True)).float()
        similarity = unit @ unit.transpose(1, 2)
        patches = (patch_embeds / patch_embeds.norm(dim=-1, keepdim=True)).split(crops)
        relevance = []
        for image, text in zip(patches, text_embeds):
            r = (-(image @ (text / text.norm(dim=-1, keepdim=True)).T)).mean(dim=-1)  # [crops, n]
            relevance.append((r - r.min() + 1e-6) / (r.max() - r.min()))
        relevance = torch.cat(relevance)
        kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
        return greedy_map(kernel, self.tokens)
