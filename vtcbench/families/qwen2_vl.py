"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`):
a native-resolution ViT whose 2x2 patch merger is the projector, and a Qwen2 decoder with M-RoPE.

Facts read from transformers 5.24 (`models/qwen2_5_vl/modeling_qwen2_5_vl.py`, the same layout in
`qwen2_vl`) and checked on 5.5:
- parts: `model.model` is the multimodal model with `visual` (the tower; its `merger` is the
  projector, inside it) and `language_model` (the text model: `layers`, `norm`, `rotary_emb`);
- image tokens are `config.image_token_id` between `vision_start`/`vision_end`; an image of grid
  (t, h, w) patches gives t*h*w / merge^2 tokens (`image_grid_thw`), so every image has its own
  count (dynamic resolution);
- positions: `get_rope_index` gives M-RoPE ids `[3, batch, seq]` (temporal, height, width) on
  the whole prompt; `generate` hands the text model `[4, batch, seq]`, row 0 the text positions
  (used for masks; the layers receive it as `position_ids`), rows 1-3 the M-RoPE ids, and at
  decode adds `rope_deltas` to the step, never reading the (possibly pruned) cache length. The
  text model's rotary module merges the three sections into ordinary `[batch, seq, head_dim]`
  tables, so attention applies the usual rotate-half RoPE;
- attention: `input_layernorm`, then `q_proj`/`k_proj` with biases, no q/k norms.

Methods keep M-RoPE's original ids (as DART's and EffiVLM's Qwen ports do): the engine gathers
all rows of the kept tokens; `compact` (PyramidDrop's renumbering) has no M-RoPE form, so it
keeps the ids too; a pooled or merged token takes, per row, the floor of the mean of its
members' ids (LLaVolta's rule applied to each axis).

Through lmms-eval, `VtcbenchLMM` answers as lmms-eval 0.7.3's own class for the model type
(`LMMS_EVAL_CLASSES`): its pixel bounds, its image path (qwen2_vl and qwen2_5_vl: a JPEG data
URL; then `qwen_vl_utils.fetch_image`'s resize) and its answer rules. Checked answer for answer
against the `qwen2_5_vl` class in tests/test_qwen_lmms.py.
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from vtcbench.errors import VtcbenchError
from vtcbench.families.base import AnswerRules, ModelFacts, ModelFamily, decoder_facts
from vtcbench.families.qwen_processor import (
    DEFAULT_SYSTEM,
    LMMS_EVAL_PIXELS,
    build_local_qwen_processor,
    load_qwen_processor,
    pixel_bounds,
    qwen_chat_prompt,
)

#: the image `ModelFacts` describe when none is given: a 1024x768 photo (resized by the processor)
NOMINAL_IMAGE: tuple[int, int] = (1024, 768)


@dataclass(frozen=True)
class LmmsEvalClass:
    """What lmms-eval 0.7.3's own model class for one Qwen model type does around `generate`,
    read from `lmms_eval/models/simple/<model type>.py` (its defaults, one process, images only)."""

    #: its min_pixels / max_pixels defaults, given to `AutoProcessor.from_pretrained` and to
    #: `qwen_vl_utils` with every image
    pixels: tuple[int, int]
    #: images go as JPEG data URLs of this quality (`_encode_image_data_url`); None: as PIL images
    jpeg_quality: int | None
    #: `process_vision_info(image_patch_size=...)`: `fetch_image` resizes to multiples of twice it
    patch_size: int
    rules: AnswerRules


#: by `config.model_type`. qwen2_vl strips its answer and keeps every stop string; qwen2_5_vl and
#: qwen3_vl drop "\n\n" (lmms-eval's stop for tasks that set none) and return the text unstripped;
#: qwen2_5_vl generates up to 32768 tokens when the task sets no max_new_tokens (TextVQA, for one).
#: All three pass `eos_token_id=tokenizer.eos_token_id` to `generate`.
LMMS_EVAL_CLASSES: dict[str, LmmsEvalClass] = {
    "qwen2_vl": LmmsEvalClass((3136, 602112), 85, 14, AnswerRules(default_max_new_tokens=128, tokenizer_eos_only=True)),
    "qwen2_5_vl": LmmsEvalClass(
        LMMS_EVAL_PIXELS, 85, 14,
        AnswerRules(default_max_new_tokens=32768, ignored_stops=("\n\n",), strip=False, tokenizer_eos_only=True),
    ),
    "qwen3_vl": LmmsEvalClass(
        LMMS_EVAL_PIXELS, None, 16,
        AnswerRules(default_max_new_tokens=128, ignored_stops=("\n\n",), strip=False, tokenizer_eos_only=True),
    ),
}


def check_aspect_ratio(width: int, height: int) -> None:
    """The Qwen processor's one refusal: an aspect ratio over 200 (tiny images are upscaled)."""
    if max(width, height) / max(1, min(width, height)) > 200:
        raise VtcbenchError(f"an image of {width}x{height} has an aspect ratio over 200, which the Qwen processor refuses")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen image processor's resize (transformers `qwen2_vl.image_processing_qwen2_vl.smart_resize`):
    both sides multiples of `factor` (patch x merge), the area within [min_pixels, max_pixels],
    the aspect ratio kept as closely as that allows."""
    check_aspect_ratio(width, height)
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _fetch_image_rgb(image: Image.Image) -> Image.Image:
    """`qwen_vl_utils.to_rgb`: RGBA composited onto white, any other mode converted."""
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


class Qwen2VLFamily(ModelFamily):
    name: ClassVar[str] = "qwen2_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl", "qwen2_5_vl")
    description: ClassVar[str] = "Qwen2-VL / Qwen2.5-VL: native-resolution ViT, 2x2 merger, Qwen2 decoder with M-RoPE"
    position_rows: ClassVar[int] = 3
    decoder_name: ClassVar[str] = "Qwen2"  # for model cards
    fixed_image_grid: ClassVar[bool] = False
    dynamic_resolution: ClassVar[bool] = True
    unsupported_methods: ClassVar[dict[str, str]] = {
        "voco": "VoCo-LLaMA's prompt, mask and checkpoints are LLaVA's (vicuna_v1 with <voco> tokens)",
    }

    def model_class(self, config: Any) -> type:
        import transformers

        names = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
        return getattr(transformers, names[config.model_type])

    def local_processor(self, config: Any, words: tuple[str, ...]) -> Any:
        return build_local_qwen_processor(config, words)

    def load_processor(self, config: Any, source: str, **kwargs: Any) -> Any:
        return load_qwen_processor(config, source, **kwargs)

    # -- parts -----------------------------------------------------------------------------------
    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self.multimodal(model).visual

    def projector(self, model: nn.Module) -> nn.Module:
        return self.multimodal(model).visual.merger

    # -- ids and facts ---------------------------------------------------------------------------
    def image_token_id(self, config: Any) -> int:
        return config.image_token_id

    def video_token_id(self, config: Any) -> int | None:
        return config.video_token_id

    def card_parts(self, config: Any, facts: ModelFacts) -> tuple[str, str, str]:
        vision = config.vision_config
        _, h, w = self.image_grid(config)
        windows = getattr(vision, "window_size", None)
        attention = (f", attention in {windows}-pixel windows except in block(s) {list(vision.fullatt_block_indexes)}"
                     if windows else "")
        return (
            f"a {facts.vision_n_layers}-block ViT (hidden {facts.vision_hidden_size}, patch {facts.vision_patch_size}{attention}; "
            f"{w * facts.vision_patch_size}x{h * facts.vision_patch_size} px after the processor's resize: {h * w} patches)",
            f"the 2x2 patch merger ({facts.image_tokens} visual tokens)",
            f"a {facts.n_layers}-layer {self.decoder_name} decoder with M-RoPE (hidden {facts.hidden_size}, {facts.n_heads} heads, "
            f"MLP {facts.intermediate_size})",
        )

    def image_grid(self, config: Any, image_size: tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(t, h, w) patches of one image of `image_size` (width, height) after the processor's
        resize; default: the config's `vtcbench_image_size`, else `NOMINAL_IMAGE`."""
        vision = config.vision_config
        width, height = image_size or tuple(getattr(config, "vtcbench_image_size", NOMINAL_IMAGE))
        factor = vision.patch_size * vision.spatial_merge_size
        low, high = pixel_bounds(config)
        h_bar, w_bar = smart_resize(height, width, factor, low, high)
        return 1, h_bar // vision.patch_size, w_bar // vision.patch_size

    def _vision_widths(self, vision: Any) -> tuple[int, int, int]:
        """(embedding width, MLP width, MLP matrices) of a tower block."""
        if hasattr(vision, "embed_dim"):  # Qwen2-VL: fc1 / GELU / fc2 at mlp_ratio
            return vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio), 2
        return vision.hidden_size, vision.intermediate_size, 3  # Qwen2.5-VL: gated SwiGLU

    def _attention_spans(self, vision: Any, grid: tuple[int, int, int]) -> list[list[int]]:
        """Per tower block, the token count of each attention window (full attention: the image).

        Qwen2.5-VL attends inside windows of `window_size` pixels except at `fullatt_block_indexes`
        (transformers `vision_utils.get_vision_window_index`): the merged grid is cut into windows
        of window_size / merge / patch merged units, each holding merge^2 patches per unit."""
        t, h, w = grid
        merge = vision.spatial_merge_size
        full = [t * h * w]
        if not hasattr(vision, "window_size"):
            return [full] * vision.depth
        units = vision.window_size // merge // vision.patch_size
        rows, cols = h // merge, w // merge
        windows = [
            min(units, rows - r) * min(units, cols - c) * merge * merge
            for _ in range(t) for r in range(0, rows, units) for c in range(0, cols, units)
        ]
        return [full if block in vision.fullatt_block_indexes else windows for block in range(vision.depth)]

    def vision_macs(self, config: Any, grid: tuple[int, int, int]) -> tuple[int, int]:
        """(tower without the merger, merger) multiply-accumulates for one image of `grid` patches."""
        vision = config.vision_config
        d, m, matrices = self._vision_widths(vision)
        n = math.prod(grid)
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        blocks = sum(4 * n * d * d + sum(2 * s * s * d for s in spans) + matrices * n * d * m for spans in self._attention_spans(vision, grid))
        merged, width = n // vision.spatial_merge_size**2, d * vision.spatial_merge_size**2
        out = getattr(vision, "out_hidden_size", None) or vision.hidden_size
        merger = merged * (width * width + width * out)  # LayerNorm, Linear(width, width), GELU, Linear(width, out)
        deepstack = merger * len(getattr(vision, "deepstack_visual_indexes", ()))  # Qwen3-VL: one merger per level, in the tower
        return n * patch_dim * d + blocks + deepstack, merger

    def facts(self, config: Any, image_size: tuple[int, int] | None = None) -> ModelFacts:
        text, vision = config.text_config, config.vision_config
        grid = self.image_grid(config, image_size)
        d, m, _ = self._vision_widths(vision)
        tower, merger = self.vision_macs(config, grid)
        width = d * vision.spatial_merge_size**2
        out = getattr(vision, "out_hidden_size", None) or vision.hidden_size
        t, h, w = grid
        return ModelFacts(
            family=self.name,
            **decoder_facts(text),
            image_token_index=self.image_token_id(config),
            image_tokens=t * h * w // vision.spatial_merge_size**2,
            vision_n_layers=vision.depth,
            vision_hidden_size=d,
            vision_intermediate_size=m,
            vision_n_heads=vision.num_heads,
            vision_n_tokens=t * h * w,
            vision_patch_size=vision.patch_size,
            vision_crops=1,
            projector_in=width,
            projector_hidden=width,
            projector_out=out,
            vision_encoder_macs=tower,
            projector_macs=merger,
            image_size=(w * vision.patch_size, h * vision.patch_size),
        )

    def unit_order(self, config: Any, grid: tuple[int, int, int]) -> torch.Tensor:
        """Which merged unit (2x2 patches, raster order) each of the tower's merged positions holds.

        Qwen2.5-VL's tower runs its blocks and its merger on units permuted into windows
        (transformers `vision_utils.get_vision_window_index`, reproduced here) and undoes the
        permutation only after the merger; Qwen2-VL and Qwen3-VL keep raster order."""
        vision = config.vision_config
        t, h, w = grid
        merge = vision.spatial_merge_size
        rows, cols = h // merge, w // merge
        if not hasattr(vision, "window_size"):
            return torch.arange(t * rows * cols)
        units = vision.window_size // merge // vision.patch_size
        index = torch.arange(t * rows * cols).reshape(t, rows, cols)
        pad_h, pad_w = units - rows % units, units - cols % units
        padded = torch.nn.functional.pad(index, (0, pad_w, 0, pad_h), value=-100)
        windows = padded.reshape(t, (rows + pad_h) // units, units, (cols + pad_w) // units, units).permute(0, 1, 3, 2, 4)
        flat = windows.reshape(-1)
        return flat[flat != -100]

    def training_features(self, config: Any, tower: torch.Tensor, tokens: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The merger's input `[batch x patches, width]` and output `[batch x units, d]` (every
        image the nominal size), back in raster order: a unit's 4 patches stay consecutive."""
        raster = self.unit_order(config, self.image_grid(config)).argsort().to(tower.device)
        units = tokens.shape[0] // batch
        tower = tower.reshape(batch, units, -1, tower.shape[-1])[:, raster].flatten(1, 2)
        return tower, tokens.reshape(batch, units, -1)[:, raster]

    # -- prompts ---------------------------------------------------------------------------------
    def system_prompt(self, config: Any) -> str:
        return getattr(config, "vtcbench_system_prompt", DEFAULT_SYSTEM)

    def prompt(self, context: str, n_images: int, answer: str | None = None, system: str = DEFAULT_SYSTEM) -> str:
        return qwen_chat_prompt(context, n_images, answer, system)

    def image_token(self) -> str:
        return "<|image_pad|>"

    def follow_up(self, question: str) -> str:
        return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"

    def token_grid(self, pixels: dict[str, torch.Tensor], n_image: int) -> tuple[int, int] | None:
        """The merged grid of a still image: (h, w) patches / merge (its 2x2 units in raster order)."""
        t, h, w = (int(v) for v in pixels["image_grid_thw"][0])
        merge = math.isqrt(t * h * w // n_image)
        return None if t != 1 or (h // merge) * (w // merge) != n_image else (h // merge, w // merge)

    # -- answering through lmms-eval -----------------------------------------------------------------
    def lmms_eval_class(self, config: Any) -> LmmsEvalClass:
        """lmms-eval 0.7.3's own class for this model type."""
        return LMMS_EVAL_CLASSES[config.model_type]

    def evaluation_pixels(self, config: Any) -> tuple[int, int]:
        """(min_pixels, max_pixels) through lmms-eval: the defaults of lmms-eval's own class
        (qwen2_5_vl and qwen3_vl: 256*28*28 and 1605632; qwen2_vl: 3136 and 602112), which it
        gives to `AutoProcessor.from_pretrained` and to every image. The checkpoint's own bounds
        differ (the hub's 3136..12845056, the toys' 4..64 merged tokens) and would give the model
        other images, hence other visual tokens and other answers."""
        own = getattr(config, "vtcbench_pixel_bounds", None)  # a model trained at one resolution (vtc-tiny-qwen)
        return (int(own[0]), int(own[1])) if own is not None else self.lmms_eval_class(config).pixels

    def evaluation_processor(self, processor: Any, config: Any) -> Any:
        """A copy of `processor` whose image processor has `evaluation_pixels` as its bounds (a
        hub, folder or offline processor alike), as the class's `AutoProcessor.from_pretrained(
        ..., min_pixels=..., max_pixels=...)` sets them."""
        low, high = self.evaluation_pixels(config)
        image_processor = processor.image_processor
        settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("min_pixels", "max_pixels")}
        evaluated = copy.copy(processor)
        evaluated.image_processor = type(image_processor).from_dict(
            {**settings, "size": {"shortest_edge": low, "longest_edge": high}}
        )
        return evaluated

    def evaluation_images(self, images: list[Image.Image], config: Any) -> list[Image.Image]:
        """The images the class's processor receives, pixel for pixel: qwen2_vl and qwen2_5_vl
        send each as a JPEG data URL of quality 85 (lmms-eval's `encode_image_to_data_url`, RGB
        first), which `qwen_vl_utils.fetch_image` decodes; qwen3_vl hands the image itself, which
        `fetch_image` makes RGB (RGBA onto white). `fetch_image` then resizes it with PIL's default
        (bicubic) filter to `smart_resize` within the class's pixel bounds, in multiples of twice
        the class's patch size; the processor's own resize then keeps that size. Resizing the
        original image in the processor instead gives other pixels (the JPEG's loss, and
        torchvision's bicubic rounding differs from PIL's)."""
        spec = self.lmms_eval_class(config)
        low, high = self.evaluation_pixels(config)
        prepared = []
        for image in images:
            if spec.jpeg_quality is not None:
                from lmms_eval.models.model_utils.media_encoder import (
                    encode_image_to_bytes,
                )

                data = encode_image_to_bytes(image, image_format="JPEG", convert_rgb=True, quality=spec.jpeg_quality)
                image = Image.open(io.BytesIO(data))
            image = _fetch_image_rgb(image)
            height, width = smart_resize(image.height, image.width, 2 * spec.patch_size, low, high)
            prepared.append(image.resize((width, height)))
        return prepared

    def answer_rules(self, config: Any) -> AnswerRules:
        return self.lmms_eval_class(config).rules

    def collate_pixels(self, pixels: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Patches of every image in one sequence, with one grid row per image (the layout the
        processor gives a batch): `pixel_values` and `image_grid_thw` concatenated."""
        return {key: torch.cat([p[key] for p in pixels]) for key in pixels[0]}

    # -- profiling inputs --------------------------------------------------------------------------
    def synthetic_pixels(self, config: Any, batch: int, generator: torch.Generator) -> dict:
        vision = config.vision_config
        grid = self.image_grid(config)
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        n = math.prod(grid)
        return {
            "pixel_values": torch.randn(batch * n, patch_dim, generator=generator),
            "image_grid_thw": torch.tensor([grid] * batch),
        }

    def image_span(self, config: Any, n_tokens: int) -> list[int]:
        return [config.vision_start_token_id, *[config.image_token_id] * n_tokens, config.vision_end_token_id]

    def token_inputs(self, config: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`mm_token_type_ids` (1 image, 2 video, 0 text), which `get_rope_index` reads."""
        types = (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()
        return {"mm_token_type_ids": types}

    def check_image_size(self, width: int, height: int) -> None:
        check_aspect_ratio(width, height)

    def resize_config(self, config: Any, *, image_tokens: int | None, layers: int | None) -> None:
        if image_tokens is not None:
            side = math.isqrt(image_tokens)
            if side * side != image_tokens:
                raise VtcbenchError(f"--image-tokens {image_tokens} must be a square (the merged grid), e.g. 64, 256, 1024")
            vision = config.vision_config
            pixels = side * vision.spatial_merge_size * vision.patch_size
            config.vtcbench_image_size = (pixels, pixels)
        if layers is not None:
            config.text_config.num_hidden_layers = layers

    # -- positions -------------------------------------------------------------------------------
    def positions_in(self, position_ids: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """`[4, batch, seq]` (text row, then M-RoPE rows) or `[3, batch, seq]` as rows
        `[batch, seq, rows]`; 2-D or missing ids (a prompt without images) are one row."""
        if position_ids is None or position_ids.ndim == 2:
            return super().positions_in(position_ids, batch, length, device)
        return position_ids.expand(-1, batch, -1).permute(1, 2, 0)

    def positions_out(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[..., 0] if rows.shape[-1] == 1 else rows.permute(2, 0, 1)

    def layer_position_ids(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The text row when the model carries one (`[4, batch, seq]`); None otherwise, as the text
        model hands its layers."""
        return rows[..., 0] if rows.shape[-1] == 4 else None

    def scoring_tables(self, layer: nn.Module, tables: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers 5.5's rotary module returns `[3, batch, seq, head_dim]` and the attention
        merges the sections (`apply_multimodal_rotary_pos_emb`); 5.24's merges them itself."""
        if tables[0].ndim != 4:
            return tables
        sections = list(layer.self_attn.config.rope_parameters["mrope_section"]) * 2
        return tuple(torch.cat([part[i % 3] for i, part in enumerate(t.split(sections, dim=-1))], dim=-1) for t in tables)

    def rope(self, language_model: nn.Module, like: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mrope = rows[..., -3:] if rows.shape[-1] >= 3 else rows.expand(-1, -1, 3)
        return language_model.rotary_emb(like, mrope.permute(2, 0, 1))
