"""VoCo-LLaMA (Ye et al., CVPR 2025): the LLM compresses the image into K VoCo tokens by attention.

Paper section 3.2 (Eq. 2-3) and supplement sections 1.2-2.3; official code Yxxxb/VoCo-LLaMA
(`llava/model/language_model/llava_llama_1stg.py`: `make_voco_mask_llava` and the sdpa branch of
`LlamaModel.forward`; `llava/eval/model_vqa_loader.py`: the prompt). The mechanics live in
`vtcbench/voco.py`, which says what follows the paper and what follows the code. From the code:
prompt `<image>\\n<voco>xK\\n` then the text; tokens after the last VoCo token see neither the image
nor anything before the first VoCo token (BOS, separator); the VoCo tokens see everything before
them; positions run over the whole prompt. The official code only masks: its evaluation generates
over the whole prompt with every KV entry kept. vtcbench's inference instead keeps only the VoCo
tokens' KV entries after a first forward and answers against them, reusing a compressed image
across questions: vtcbench's own equivalent of the mask, after the supplement's two forward passes
and its caching of the VoCo tokens (section 2.3.1: "In such cases, it is possible to cache the VoCo
tokens obtained from the first request.").

It needs trained weights: a checkpoint whose tokenizer has `<voco>` and whose model learnt to
compress into it (`token_id`). No official checkpoint exists; `vtcbench train --method voco
--init vtc-tiny` fine-tunes one at small scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtcbench.methods.base import Method, check_positive, register
from vtcbench.methods.kinds import CACHE, MethodKind


@register
@dataclass
class Voco(Method):
    """VoCo-LLaMA (section 3.2, Eq. 2-3; official code `Yxxxb/VoCo-LLaMA`,
    `llava/model/language_model/llava_llama_1stg.py`): the text reads the image only through K
    trained VoCo tokens (mechanics and what follows the code: `vtcbench/voco.py`)."""

    voco_tokens: int = 2

    name: ClassVar[str] = "voco"
    kind: ClassVar[MethodKind] = CACHE
    description: ClassVar[str] = "VoCo-LLaMA: the text sees only K VoCo tokens' cache entries, which attended to the image"
    budget_refusal: ClassVar[str] = "its number of VoCo tokens is the one it was trained with"
    needs_weights: ClassVar[str | None] = "a VoCo-trained checkpoint (its tokenizer has <voco>): vtcbench train --method voco"

    def __post_init__(self) -> None:
        check_positive(self.name, "voco_tokens", self.voco_tokens)

    def image_tokens_per_layer(self, n_image: int, n_layers: int, crops: int = 1) -> list[int]:
        """The papers' convention, per question once the image is compressed: every layer's text
        attends to K VoCo entries instead of N image tokens. The compression pass itself (N image
        tokens + K VoCo tokens through all layers, see `compression_pass_tokens`) runs once per
        image and is not counted here, as the supplement's Table 7 counts a cached image."""
        return [self.voco_tokens] * n_layers

    def compression_pass_tokens(self, n_image: int) -> int:
        """Visual-side tokens of the one-off first forward per image: the image and the VoCo tokens."""
        return n_image + self.voco_tokens

    def token_id(self, model, tokenizer) -> int:
        """The VoCo token's id; raises VtcbenchError (one line) for a checkpoint without it (the
        token lives in the tokenizer, so this runs once the checkpoint is loaded)."""
        from vtcbench.voco import voco_token_id

        return voco_token_id(tokenizer, model)

    def check_loaded(self, model, processor) -> None:
        self.token_id(model, processor.tokenizer)

    def prompt(self, question: str, system: str) -> str:
        from vtcbench.voco import voco_prompt

        return voco_prompt(question, self.voco_tokens, system)

    def prepare_training(self, model, processor) -> None:
        """Add `<voco>` and its embedding row (a LLaVA fine-tuned into VoCo-LLaMA, as train.py does)."""
        from vtcbench.voco import add_voco_token

        add_voco_token(model, processor)

    def training_inputs(self, model, tokenizer, inputs: dict) -> dict:
        """The masked single pass over prompt + teacher-forced answers, VoCo-LLaMA's training forward."""
        from vtcbench.voco import attention_mask, check_attention, position_ids

        check_attention(model)
        token = self.token_id(model, tokenizer)
        padding = inputs["attention_mask"]
        mask = attention_mask(inputs["input_ids"], padding, token, self.voco_tokens, model.dtype)
        return dict(inputs, attention_mask=mask, position_ids=position_ids(padding))
