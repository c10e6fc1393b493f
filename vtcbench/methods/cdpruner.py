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

Differences: the official code runs one prompt at a time and normalises the relevance over its
whole batch of images (LLaVA-NeXT's crops); here each image is normalised alone, so a batch
gives what each prompt gives alone. The official `theta` reweighting is commented out there and
absent here. With `tokens` = N every token is kept without running the MAP inference, whose last
steps divide by gains of rounding size (the official loop may then pick a token twice).
The official code also runs LLaVA-NeXT (T per crop, the mask carried through unpadding and row
newlines); the engine's pre-LLM path needs one fixed grid and refuses LLaVA-NeXT for now, as it
refuses the Qwen line (no CLIP text tower; the official code has no Qwen port).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.families import FAMILIES, ModelFacts, family_of
from vtcbench.methods.base import Method, check_positive, register
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

    def query(self, question: str) -> str:
        """The text the official code gives the text tower: the question without `<image>` and
        without the answer-format line."""
        return question.replace("<image>", "").replace(ANSWER_FORMAT, "").strip()

    def selection_macs(self, facts: ModelFacts, n_image: int, image_tokens_per_layer: list[float]) -> int:
        """One 77-token chunk through the text tower (a question of up to 75 tokens) and its
        projection, the patches' projection, the relevance, the tokens' similarity matrix and the
        DPP's updates (sum over steps t of t N)."""
        text = FAMILIES[facts.family].text_tower_facts(self.clip)
        p, w = text.positions, text.width
        text_macs = text.layers * (4 * p * w * w + 2 * p * p * w + 2 * p * w * text.ffn) + w * text.projection
        n, t = n_image, self.tokens
        patches = n * facts.vision_hidden_size * text.projection + n * text.projection
        return text_macs + patches + n * n * facts.hidden_size + n * t * (t - 1) // 2

    @torch.no_grad()
    def pre_llm_question(self, projected: torch.Tensor, patch_embeds: torch.Tensor, text_embeds: list[torch.Tensor]) -> torch.Tensor:
        """[images, tokens, d] of the projected tokens [images, n, d], from the patches' and each
        image's question's embeddings in CLIP's joint space."""
        if self.tokens == projected.shape[1]:
            return projected  # every token: the greedy MAP's last steps would divide by rounding-size gains
        unit = (projected / projected.norm(dim=-1, keepdim=True)).float()
        similarity = unit @ unit.transpose(1, 2)
        patches = patch_embeds / patch_embeds.norm(dim=-1, keepdim=True)
        relevance = torch.stack([
            (-(patches[image] @ (text / text.norm(dim=-1, keepdim=True)).T)).mean(dim=-1) for image, text in enumerate(text_embeds)
        ])
        low, high = relevance.amin(dim=1, keepdim=True), relevance.amax(dim=1, keepdim=True)
        relevance = (relevance - low + 1e-6) / (high - low)
        kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
        chosen = greedy_map(kernel, self.tokens)
        return projected.gather(1, chosen.unsqueeze(-1).expand(-1, -1, projected.shape[-1]))
