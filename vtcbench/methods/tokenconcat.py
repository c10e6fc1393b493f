"""TokenConcat: STF's Table 5 fusion baseline (Tang et al., "Learning Compact Vision Tokens for
Efficient Large Multimodal Models", section 4.3.3): each 2 x 2 window of the patch grid is
concatenated into one token and a trained projector maps it (4C channels) to the language model's
width, so the prompt carries N/4 image tokens.

The paper gives no code for it; we read "simply concatenates adjacent 2 x 2 vision tokens as one
token" as the official STF unfold (channel order c*k^2 + dy*k + dx, `stf.unfold_tokens`) on the
model's own feature layer, followed by LLaVA-1.5's projector shape (Linear 4C -> d, GELU,
Linear d -> d); it differs from STF by having no MBTF and no 16C-wide fusion layer.
"""

from dataclasses import dataclass
from typing import ClassVar

from vtcbench.methods.base import check_positive, register
from vtcbench.methods.stf import FusingMethod


@register
@dataclass
class TokenConcat(FusingMethod):
    """STF's TokenConcat baseline (section 4.3.3, Table 5): k x k windows concatenated, then a
    trained projector. No official code: the released LLaVA-STF builds only STF's own projectors
    (`llava/model/multimodal_projector/builder.py`)."""

    kernel: int = 2

    name: ClassVar[str] = "tokenconcat"
    description: ClassVar[str] = "k x k windows concatenated into one token, mapped by a trained projector (STF Table 5)"
    needs_weights: ClassVar[str | None] = "a TokenConcat projector (k^2*C -> d), e.g. from `vtcbench train --method tokenconcat`"

    def __post_init__(self) -> None:
        check_positive(self.name, "kernel", self.kernel)
