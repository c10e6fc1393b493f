"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA-1.5's parts with AnyRes.

Facts read from transformers 5.5-5.24 (`models/llava_next/modeling_llava_next.py`): the same
module layout as LLaVA-1.5; each image is a base crop plus the tiles of its best grid in
`image_grid_pinpoints`, one CLIP pass each, and the processor inserts one newline token per row,
so an image's token count depends on its size. The nominal count (`ModelFacts.image_tokens`) is
the 5-crop maximum without newline tokens, the figure PyramidDrop's Table 1 uses.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.families.llava import LlavaFamily, image_processor_classes


class LlavaNextFamily(LlavaFamily):
    name: ClassVar[str] = "llava_next"
    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    description: ClassVar[str] = "LLaVA-NeXT: LLaVA's parts with AnyRes crops; each image has its own token count"
    fixed_image_grid: ClassVar[bool] = False

    def model_class(self, config: Any) -> type:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def local_processor(self, config: Any, words: tuple[str, ...]) -> Any:
        from transformers import LlavaNextProcessor

        image, processor = self._processor_parts(config, words)
        _, next_cls = image_processor_classes()
        return LlavaNextProcessor(
            image_processor=next_cls(image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints], **image), **processor
        )

    def token_grid(self, pixels: dict[str, torch.Tensor], n_image: int) -> tuple[int, int] | None:
        """AnyRes crops and newline tokens form no single grid."""
        return None

    def crops(self, config: Any) -> int:
        size = config.vision_config.image_size
        tiles = max(math.ceil(h / size) * math.ceil(w / size) for h, w in config.image_grid_pinpoints)
        return 1 + tiles

    def synthetic_pixels(self, config: Any, batch: int, generator: torch.Generator) -> dict:
        raise VtcbenchError("profile builds synthetic inputs for a fixed image grid; llava_next's AnyRes count varies per image")
