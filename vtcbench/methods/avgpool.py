"""Spatial average pooling before the language model: STF Table 5's pooling baseline, here
training-free.

STF (section 4.3, Table 5) compares its learned token fusion with plain k x k average pooling of
the 24 x 24 patch grid. We pool the projector's output (the embeddings the LLM reads), so the
language model sees averages of inputs it was trained on; the prompt then carries N / k^2 image
tokens with ordinary compact positions, as a model trained with pooling would see them.

Difference: STF trains with its pooling; this baseline applies it to a model trained without.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtcbench.methods.base import (
    Method,
    check_grid_kernel,
    check_positive,
    register,
)
from vtcbench.methods.kinds import PRE_LLM, MethodKind


@register
@dataclass
class AvgPool(Method):
    """STF's AvgPool baseline (section 4.3.3, Table 5), training-free: k x k average pooling of the
    projector's output. No official code: the released LLaVA-STF builds only STF's own projectors
    (`llava/model/multimodal_projector/builder.py`)."""

    kernel: int = 2

    name: ClassVar[str] = "avgpool"
    kind: ClassVar[MethodKind] = PRE_LLM
    description: ClassVar[str] = "k x k spatial average pooling of the image-token grid before the LLM"

    def __post_init__(self) -> None:
        check_positive(self.name, "kernel", self.kernel)

    def validate_for(self, n_image: int, n_layers: int) -> None:
        check_grid_kernel(self.name, self.kernel, n_image)

    budget_knobs: ClassVar[tuple[str, ...]] = ("kernel",)

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        return range(1, math.isqrt(n_image) + 1)

    def pre_llm_tokens(self, n_image: int) -> int:
        return n_image // self.kernel**2

    def pre_llm(self, image_features: torch.Tensor) -> torch.Tensor:
        images, n, dim = image_features.shape
        side = math.isqrt(n)
        grid = image_features.transpose(1, 2).reshape(images, dim, side, side)
        pooled = torch.nn.functional.avg_pool2d(grid, self.kernel)
        return pooled.flatten(2).transpose(1, 2)
