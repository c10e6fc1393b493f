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
    anyres_crops: ClassVar[bool] = True

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

    def crop_grids(self, config: Any, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        """The model's own tiles per image (`get_anyres_image_grid_shape`, checked against the
        crop count `get_image_features` splits by, `image_size_to_num_patches`)."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        size, grids = config.vision_config.image_size, []
        for image_size in image_sizes.tolist():
            rows, cols = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, size)
            crops = image_size_to_num_patches(image_size, config.image_grid_pinpoints, size)
            if crops != 1 + rows * cols:
                raise VtcbenchError(f"an image of size {image_size} has {crops} crops, not 1 + its {rows}x{cols} tiles")
            grids.append((rows, cols))
        return grids

    def crop_layout(self, config: Any, image_sizes: torch.Tensor, slots: torch.Tensor) -> list[torch.Tensor]:
        """The layout of the official per-crop selections (VisionZip's `restore_image_features_sorted`,
        VisPruner's and CDPruner's `prepare_inputs_labels_for_multimodal`, all without unpadding or
        newline tokens): the base crop's tokens as selected, then the tiles' kept patches in raster
        order over the whole tile grid (a row runs across the tiles), then each tile's CLS, then
        each tile's merged tokens. The crops of each image are the model's own
        (`image_size_to_num_patches`, `get_anyres_image_grid_shape`)."""
        side = config.vision_config.image_size // config.vision_config.patch_size
        per_crop, layouts, start = slots.shape[1], [], 0
        for rows, cols in self.crop_grids(config, image_sizes):
            crops = 1 + rows * cols
            base = torch.arange(start * per_crop, (start + 1) * per_crop)
            tiles = slots[start + 1 : start + crops].cpu()  # [tiles, per crop], tiles in row-major order
            tile = torch.arange(rows * cols)[:, None].expand_as(tiles)
            row = (tile // cols) * side + tiles.clamp(min=0) // side
            column = (tile % cols) * side + tiles.clamp(min=0) % side
            # patches first by their raster place on the tile grid, then CLS, then merged tokens, tile by tile
            raster = row * cols * side + column
            after = rows * cols * side * side + (-1 - tiles) * tiles.numel() + tile * per_crop + torch.arange(per_crop)
            key = torch.where(tiles >= 0, raster, after)
            order = key.flatten().argsort() + (start + 1) * per_crop
            layouts.append(torch.cat([base, order]).to(slots.device))
            start += crops
        return layouts

    def crops(self, config: Any) -> int:
        size = config.vision_config.image_size
        tiles = max(math.ceil(h / size) * math.ceil(w / size) for h, w in config.image_grid_pinpoints)
        return 1 + tiles

    def _nominal_image(self, config: Any) -> tuple[int, int]:
        """(height, width) of the pinpoint with the most tiles: the nominal image's 5 crops."""
        size = config.vision_config.image_size
        return tuple(max(config.image_grid_pinpoints, key=lambda p: math.ceil(p[0] / size) * math.ceil(p[1] / size)))

    def synthetic_pixels(self, config: Any, batch: int, generator: torch.Generator) -> dict:
        """The nominal image (a pinpoint with the most tiles): its crops and its size."""
        size, (height, width) = config.vision_config.image_size, self._nominal_image(config)
        return {
            "pixel_values": torch.randn(batch, self.crops(config), 3, size, size, generator=generator),
            "image_sizes": torch.tensor([[height, width]] * batch),
        }

    def synthetic_image_tokens(self, config: Any) -> int:
        """The nominal image's placeholders: the base crop, then its tiles' rows as the model packs
        them (transformers' own `unpad_image`; a pinpoint needs no unpadding), a newline each."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        side = config.vision_config.image_size // config.vision_config.patch_size
        (rows, cols), = self.crop_grids(config, torch.tensor([self._nominal_image(config)]))
        height, width = unpad_image(torch.zeros(1, rows * side, cols * side), torch.tensor(self._nominal_image(config))).shape[1:]
        return side * side + height * (width + 1)
