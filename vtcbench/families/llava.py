"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP ViT tower, MLP projector, LLaMA decoder.

Facts read from transformers 5.5-5.24 (`models/llava/modeling_llava.py`): the multimodal model is
`model.model` with `vision_tower`, `multi_modal_projector` and `language_model` (a `LlamaModel`);
image placeholders are `config.image_token_index`, expanded by the processor to one token per
patch (`vision_feature_select_strategy="default"` drops CLS). 1-D RoPE; the decoder layer's
attention has `q_proj`/`k_proj` after `input_layernorm`, no q/k norms. Prompts follow the LLaVA
repo's `conv_vicuna_v1`, as lmms-eval's `llava_hf` builds them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vtcbench.errors import VtcbenchError
from vtcbench.families.base import (
    ModelFacts,
    ModelFamily,
    TextSide,
    TextTowerFacts,
    decoder_facts,
)

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER = "<image>"

#: the llava-hf hub checkpoint layout (`llava-hf/llava-1.5-7b-hf`), which every transformers
#: release reads: (module prefix as this release names it, key prefix in the hub layout), first match
CHECKPOINT_LAYOUT: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),  # CLIPVisionModel with its wrapper (5.5)
    ("model.vision_tower.", "vision_tower.vision_model."),  # without it (5.23+)
)


#: llava-hf key prefixes of each part (what `convert_stf` writes an original-layout checkpoint to)
HUB_LANGUAGE_MODEL, HUB_LM_HEAD, HUB_PROJECTOR, HUB_TOWER = (
    dict(CHECKPOINT_LAYOUT)[prefix] for prefix in ("model.language_model.", "lm_head.", "model.multi_modal_projector.", "model.vision_tower.")
)


def vicuna_v1_prompt(context: str, n_images: int, answer: str | None = None, system: str = VICUNA_V1_SYSTEM) -> str:
    """LLaVA's `conv_vicuna_v1`: system prompt, `USER: <image>\\n...`, `ASSISTANT:`."""
    if IMAGE_PLACEHOLDER not in context and n_images:
        context = "\n".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + context
    prompt = f"{system} USER: {context} ASSISTANT:" if system else f"USER: {context} ASSISTANT:"
    return prompt if answer is None else f"{prompt} {answer}"


#: the text tower of the CLIP checkpoint LLaVA-1.5's tower comes from (its config.json:
#: text_config 12 layers, hidden 768, ffn 3072, 77 positions; projection_dim 768), so that
#: `vtcbench flops` costs CDPruner offline
CLIP_TEXT_TOWERS: dict[str, TextTowerFacts] = {
    "openai/clip-vit-large-patch14-336": TextTowerFacts(layers=12, width=768, ffn=3072, positions=77, projection=768),
}


#: CLIP checkpoints shipped in the package, by the name `--set clip=` takes
SHIPPED_CLIPS = {"vtc-tiny-clip": Path(__file__).resolve().parents[1] / "weights" / "vtc-tiny-clip"}


def clip_source(source: str) -> str:
    """Where a CLIP checkpoint loads from: a shipped one's folder, else `source` itself."""
    return str(SHIPPED_CLIPS.get(source, source))


@functools.cache
def _clip_text_parts(source: str, device: str) -> tuple[Any, nn.Module]:
    """(tokenizer, CLIPModel without its vision model) of `source`, in float32 on `device`, once
    per process: the text tower, `text_projection` and `visual_projection` (CDPruner's official
    `load_text_tower` loads the same parts, in float32)."""
    from transformers import AutoTokenizer, CLIPModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(clip_source(source))
        clip = CLIPModel.from_pretrained(clip_source(source), dtype=torch.float32)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VtcbenchError(f"cannot load the CLIP checkpoint {source!r} (its text tower and visual projection): "
                            f"{first.rstrip('.')}; shipped with vtcbench: {', '.join(SHIPPED_CLIPS)}") from None
    clip.vision_model = None  # the LLaVA model's own tower gives the patches
    return tokenizer, clip.eval().requires_grad_(False).to(device)


def clip_tokenizer(words: Iterable[str]) -> Any:
    """A word-level tokenizer of `words` that wraps a text in start and end tokens as CLIP's does
    (words it does not know are `<unk>`; `!`, CLIP's padding id 0, pads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(dict.fromkeys(["!", "<unk>", *words]))}
    start, end = vocab.setdefault("<|startoftext|>", len(vocab)), vocab.setdefault("<|endoftext|>", len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", start), ("<|endoftext|>", end)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="!")


def write_random_clip(
    folder: Any, tower_width: int, *, layers: int = 2, width: int = 32, heads: int = 2, ffn: int = 64, projection: int = 16
) -> str:
    """A random-weight CLIP checkpoint in `folder` (tests and benchmarks, offline) whose visual
    projection reads a tower of `tower_width`, with a `clip_tokenizer` of a few question words:
    CDPruner's text side."""
    from transformers import CLIPConfig, CLIPModel

    words = "how many what is are there the in of color shape image picture a circle circles square triangle red blue green ? , .".split()
    tokenizer = clip_tokenizer(words)
    tokenizer.save_pretrained(folder)
    vocab, start, end = tokenizer.get_vocab(), tokenizer.bos_token_id, tokenizer.eos_token_id
    text = dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, eos_token_id=end, bos_token_id=start, pad_token_id=0)
    vision = dict(hidden_size=tower_width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=7)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)).save_pretrained(folder)
    return str(folder)


def image_processor_classes() -> tuple[type, type]:
    """(CLIP-style, LLaVA-NeXT) image processor classes.

    transformers 5.x makes `CLIPImageProcessor` the torchvision backend and falls back (with a
    warning) to `CLIPImageProcessorPil` when torchvision is missing; pick the PIL classes
    explicitly in that case.
    """
    import transformers

    if importlib.util.find_spec("torchvision") is None:
        clip = getattr(transformers, "CLIPImageProcessorPil", None)
        nxt = getattr(transformers, "LlavaNextImageProcessorPil", None)
        if clip is not None and nxt is not None:
            return clip, nxt
    return transformers.CLIPImageProcessor, transformers.LlavaNextImageProcessor


class LlavaFamily(ModelFamily):
    name: ClassVar[str] = "llava"
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    description: ClassVar[str] = "LLaVA-1.5: CLIP tower, MLP projector, LLaMA decoder; a fixed grid of image tokens"
    tower_has_cls: ClassVar[bool] = True
    has_text_side: ClassVar[bool] = True

    def model_class(self, config: Any) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    # -- offline processor ---------------------------------------------------------------------
    def _processor_parts(self, config: Any, words: tuple[str, ...]) -> tuple[dict, dict]:
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        from vtcbench.models import build_local_tokenizer

        text, vision = config.text_config, config.vision_config
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = getattr(text, "pad_token_id", None)
        tokenizer = build_local_tokenizer(text.vocab_size, config.image_token_index, pad, words)
        size = vision.image_size
        image = dict(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD),
            do_convert_rgb=True,
        )
        processor = dict(
            tokenizer=tokenizer,
            patch_size=vision.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            image_token=IMAGE_PLACEHOLDER,
        )
        return image, processor

    def local_processor(self, config: Any, words: tuple[str, ...]) -> Any:
        """An offline `LlavaProcessor`: `<image>` expands to exactly the model's image-token count
        because the processor gets the patch size, the select strategy and
        `num_additional_image_tokens=1` (CLIP's CLS, which "default" then drops)."""
        from transformers import LlavaProcessor

        image, processor = self._processor_parts(config, words)
        clip, _ = image_processor_classes()
        return LlavaProcessor(image_processor=clip(**image), **processor)

    # -- parts -----------------------------------------------------------------------------------
    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self.multimodal(model).vision_tower

    def clip_transformer(self, model: nn.Module) -> nn.Module:
        """The tower's CLIP transformer (embeddings, layers, `post_layernorm`), with or without the
        `CLIPVisionModel` wrapper around it (transformers 5.5 / 5.23+)."""
        tower = self.vision_tower(model)
        return getattr(tower, "vision_model", tower)

    def projector(self, model: nn.Module) -> nn.Module:
        return self.multimodal(model).multi_modal_projector

    def set_projector(self, model: nn.Module, projector: nn.Module) -> None:
        self.multimodal(model).multi_modal_projector = projector

    def tower_feature_layer(self, model: nn.Module, after: int = 0) -> nn.Module:
        """The CLIP layer whose output is `hidden_states[vision_feature_layer]` (layer 22 of 24 for
        LLaVA-1.5's -2), or the one `after` layers later; the tower is `CLIPVisionModel` with or
        without its wrapper (5.5 / 5.23+)."""
        (index, *more) = self.feature_layers(model.config)
        layers = self.clip_transformer(model).encoder.layers
        position = index % (len(layers) + 1)  # hidden_states[0] is the embeddings
        if more or position == 0:
            raise VtcbenchError(f"vision_feature_layer={model.config.vision_feature_layer}: a method reading the tower needs one CLIP layer's output")
        if position + after > len(layers):
            raise VtcbenchError(
                f"vision_feature_layer={model.config.vision_feature_layer}: the method reads the CLIP layer {after} after it, "
                f"and the tower has {len(layers)} layers"
            )
        return layers[position - 1 + after]

    def text_side(self, model: nn.Module, source: str) -> TextSide:
        """CLIP's text tower: a text is tokenised whole, zero-padded to a multiple of 77 and run as
        77-token chunks, each giving its pooled, projected embedding; the patches go through the
        LLaVA tower's own `post_layernorm`, then CLIP's `visual_projection`, in float32 (CDPruner's
        `clip_encoder.py`)."""
        tokenizer, clip = _clip_text_parts(source, str(model.device))
        post_layernorm = self.clip_transformer(model).post_layernorm
        if clip.visual_projection.in_features != post_layernorm.normalized_shape[0]:
            raise VtcbenchError(
                f"the CLIP checkpoint {source!r} projects a vision width of {clip.visual_projection.in_features}, this model's "
                f"tower has {post_layernorm.normalized_shape[0]}; give the checkpoint its tower comes from"
            )
        positions = clip.config.text_config.max_position_embeddings

        def embed_text(text: str) -> torch.Tensor:
            inputs = tokenizer(text=[text], return_tensors="pt")
            length = inputs["input_ids"].shape[1]
            padding = positions * ((length - 1) // positions + 1) - length
            chunks = {key: torch.cat([value, value.new_zeros(1, padding)], dim=1).reshape(-1, positions).to(model.device)
                      for key, value in inputs.items() if key in ("input_ids", "attention_mask")}
            return clip.text_projection(clip.text_model(**chunks).pooler_output)

        def embed_patches(patches: torch.Tensor) -> torch.Tensor:
            return clip.visual_projection(post_layernorm(patches).float())

        return TextSide(embed_text, embed_patches)

    def text_tower_facts(self, source: str) -> TextTowerFacts:
        if source in CLIP_TEXT_TOWERS:
            return CLIP_TEXT_TOWERS[source]
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(clip_source(source))
        except OSError:
            raise VtcbenchError(f"cannot read the CLIP checkpoint {source!r}'s config (offline, only a local folder or the hub's cache)") from None
        text = config.text_config
        return TextTowerFacts(text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.max_position_embeddings,
                              config.projection_dim)

    def tower_layers_after_feature(self, config: Any) -> int:
        (index, *_) = self.feature_layers(config)
        layers = config.vision_config.num_hidden_layers
        return layers - index % (layers + 1)

    def trim_tower_for_training(self, config: Any) -> None:
        """The layers after the projector's feature layer get no gradient from `vtcbench train`'s
        losses (LLaVA-1.5's come from CLIP's own training; `vtcbench train-clip` trains vtc-tiny's
        that way), so a model trained from scratch is built without them and reads its last layer."""
        after = self.tower_layers_after_feature(config)
        if after and isinstance(config.vision_feature_layer, int):
            config.vision_config.num_hidden_layers -= after
            config.vision_feature_layer = -1

    def clip_with_tower(self, model: nn.Module, text: dict[str, Any], projection_dim: int) -> nn.Module:
        """A `CLIPModel` (CLIP's initialisation under the caller's seed) whose vision model is
        `model`'s tower, its weights copied and frozen, plus one trainable layer after it, and
        whose text tower has the `CLIPTextConfig` fields `text`."""
        from transformers import CLIPConfig, CLIPModel

        tower = self.clip_transformer(model)
        vision = model.config.vision_config.to_dict()
        vision["num_hidden_layers"] += 1
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
        missing, unexpected = clip.vision_model.load_state_dict(tower.state_dict(), strict=False)
        new_layer = f"encoder.layers.{vision['num_hidden_layers'] - 1}."
        if unexpected or not all(name.startswith(new_layer) for name in missing):
            raise VtcbenchError(f"the tower's weights do not fit a CLIP vision model: missing {missing}, unexpected {unexpected}")
        for module in (clip.vision_model.embeddings, clip.vision_model.pre_layrnorm, *clip.vision_model.encoder.layers[:-1]):
            module.requires_grad_(False)
        return clip

    def attach_clip_layer(self, model: nn.Module, clip: nn.Module) -> None:
        """`model`'s tower gains `clip`'s last vision layer and its `post_layernorm`, and is read at
        layer -2: the projector's features are those it read at -1 before."""
        tower = self.clip_transformer(model)
        tower.encoder.layers.append(clip.vision_model.encoder.layers[-1])
        tower.post_layernorm.load_state_dict(clip.vision_model.post_layernorm.state_dict())
        model.config.vision_config.num_hidden_layers = len(tower.encoder.layers)
        model.config.vision_feature_layer = -2

    def tower_cls_query_keys(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's `q_proj` of CLS and `k_proj` of every token (biases included, before the
        attention's `scale`) of `layer_norm1` of the layer's input."""
        normed = layer.layer_norm1(hidden)
        return layer.self_attn.q_proj(normed[:, :1]), layer.self_attn.k_proj(normed)

    def tower_cls_attention(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's eager attention row of CLS (`layer_norm1`, `q_proj`/`k_proj` with biases, `scale`,
        softmax in float32 as `eager_attention_forward`), recomputed so any backend works."""
        attention = layer.self_attn
        images, length, _ = hidden.shape
        normed = layer.layer_norm1(hidden)
        q = attention.q_proj(normed[:, :1]).view(images, 1, -1, attention.head_dim).transpose(1, 2)
        k = attention.k_proj(normed).view(images, length, -1, attention.head_dim).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) * attention.scale
        return logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)[:, :, 0], k

    def feature_layers(self, config: Any) -> tuple[int, ...]:
        """The tower's hidden-state indices the projector reads (a list: concatenated, MBTF)."""
        layers = config.vision_feature_layer
        return (layers,) if isinstance(layers, int) else tuple(layers)

    def set_feature_layers(self, config: Any, layers: tuple[int, ...]) -> None:
        config.vision_feature_layer = list(layers)

    # -- ids and facts ---------------------------------------------------------------------------
    def image_token_id(self, config: Any) -> int:
        return config.image_token_index

    def crops(self, config: Any) -> int:
        """Vision-tower passes per image: one for LLaVA-1.5."""
        return 1

    def facts(self, config: Any, image_size: tuple[int, int] | None = None) -> ModelFacts:
        text, vision = config.text_config, config.vision_config
        per_side = vision.image_size // vision.patch_size
        vision_tokens = per_side * per_side + 1  # + CLS
        per_crop = vision_tokens - 1 if config.vision_feature_select_strategy == "default" else vision_tokens
        crops = self.crops(config)
        projector_in = vision.hidden_size * len(self.feature_layers(config))
        n, d, m = vision_tokens, vision.hidden_size, vision.intermediate_size
        patch_dim = 3 * vision.patch_size**2
        # CLIP over every crop: patch embedding plus all layers (HF runs them all, even when the
        # features come from layer -2); the two-layer MLP projector on every image token
        vision_macs = crops * ((n - 1) * patch_dim * d + vision.num_hidden_layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m))
        image_tokens = per_crop * crops
        return ModelFacts(
            family=self.name,
            **decoder_facts(text),
            image_token_index=config.image_token_index,
            image_tokens=image_tokens,
            vision_n_layers=vision.num_hidden_layers,
            vision_hidden_size=vision.hidden_size,
            vision_intermediate_size=vision.intermediate_size,
            vision_n_heads=vision.num_attention_heads,
            vision_n_tokens=vision_tokens,
            vision_patch_size=vision.patch_size,
            vision_crops=crops,
            projector_in=projector_in,
            projector_hidden=text.hidden_size,
            projector_out=text.hidden_size,
            vision_encoder_macs=vision_macs,
            projector_macs=image_tokens * (projector_in * text.hidden_size + text.hidden_size * text.hidden_size),
        )

    # -- prompts ---------------------------------------------------------------------------------
    def card_parts(self, config: Any, facts: ModelFacts) -> tuple[str, str, str]:
        side = config.vision_config.image_size
        return (
            f"a {facts.vision_n_layers}-layer CLIP-style vision tower (hidden {facts.vision_hidden_size}, {side} px images, "
            f"patch {facts.vision_patch_size}, so {facts.vision_n_tokens - 1} visual tokens)",
            "LLaVA's 2-layer GELU projector",
            f"a {facts.n_layers}-layer LLaMA decoder (hidden {facts.hidden_size}, {facts.n_heads} heads, MLP {facts.intermediate_size})",
        )

    def system_prompt(self, config: Any) -> str:
        return getattr(config, "vtcbench_system_prompt", VICUNA_V1_SYSTEM)

    def prompt(self, context: str, n_images: int, answer: str | None = None, system: str = VICUNA_V1_SYSTEM) -> str:
        return vicuna_v1_prompt(context, n_images, answer, system)

    def image_token(self) -> str:
        return IMAGE_PLACEHOLDER

    def follow_up(self, question: str) -> str:
        """A later turn of a multi-turn conversation (after `</s>`), as vicuna_v1 writes it."""
        return f"USER: {question} ASSISTANT:"

    def token_grid(self, pixels: dict[str, torch.Tensor], n_image: int) -> tuple[int, int] | None:
        """The square patch grid (after a pre-LLM pooling, the pooled one)."""
        side = math.isqrt(n_image)
        return (side, side) if side * side == n_image else None

    def images_in_batch(self, inputs: dict) -> int | None:
        """One row of `pixel_values` per image (LLaVA-NeXT: its crops in the second dimension), or
        one encoded image each where `generate` encoded them first."""
        from vtcbench import transformers_seam as seam

        return seam.images_in_inputs(inputs)

    def collate_pixels(self, pixels: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch's image inputs from each prompt's processor output: pixel values stacked;
        LLaVA-NeXT's AnyRes crops zero-padded to the most crops, with `image_sizes` (which the
        model reads to unpad them)."""
        values = [p["pixel_values"] for p in pixels]
        batch = {}
        if "image_sizes" in pixels[0]:
            crops = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 0, 0, crops - v.shape[1])) for v in values]
            batch["image_sizes"] = torch.cat([p["image_sizes"] for p in pixels])
        batch["pixel_values"] = torch.cat(values)
        return batch

    # -- profiling inputs --------------------------------------------------------------------------
    def synthetic_pixels(self, config: Any, batch: int, generator: torch.Generator) -> dict:
        size = config.vision_config.image_size
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}

    def resize_config(self, config: Any, *, image_tokens: int | None, layers: int | None) -> None:
        from vtcbench.errors import VtcbenchError

        if image_tokens is not None:
            side = math.isqrt(image_tokens)
            if side * side != image_tokens:
                raise VtcbenchError(f"--image-tokens {image_tokens} must be a square (the patch grid), e.g. 64, 144, 576")
            config.vision_config.image_size = side * config.vision_config.patch_size
        if layers is not None:
            config.text_config.num_hidden_layers = layers

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint_layout(self) -> tuple[tuple[str, str], ...]:
        return CHECKPOINT_LAYOUT


# -- checkpoints converted from LLaVA's original layout (vtcbench convert-stf) --------------------


def converted_config(text: dict[str, Any], vision: dict[str, Any], *, image_token: int, feature_layers: list[int], select_strategy: str):
    """The llava-hf `LlavaConfig` of a checkpoint converted from LLaVA's original layout: the
    language model `text`, the CLIP tower `vision`, `<image>` as `image_token`, the tower's
    `feature_layers` (a list: LLaVA-STF's MBTF reads several), LLaVA's GELU projector."""
    from transformers import LlavaConfig

    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_token,
        vision_feature_layer=feature_layers,
        vision_feature_select_strategy=select_strategy,
        projector_hidden_act="gelu",
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        tie_word_embeddings=False,
        pad_token_id=text["pad_token_id"],
    )


def converted_image_processor(config):
    """CLIP's preprocessing at the tower's resolution (resize the short side, centre-crop, OpenAI
    CLIP mean and std), after LLaVA's `expand2square` when the config says
    `vtcbench_image_aspect_ratio: pad`: `LlavaImageProcessor(do_pad=True)` pads centred in
    `tuple(int(x * 255) for x in image_mean)`, the official background colour."""
    import transformers
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    # without torchvision (the CPU install) transformers 5 falls back to the PIL backend with a warning
    pil = importlib.util.find_spec("torchvision") is None and hasattr(transformers, "LlavaImageProcessorPil")
    cls = transformers.LlavaImageProcessorPil if pil else transformers.LlavaImageProcessor
    size = config.vision_config.image_size
    return cls(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True,
        do_pad=getattr(config, "vtcbench_image_aspect_ratio", "square") == "pad",
    )


def converted_processor(config, tokenizer):
    """The `LlavaProcessor` of a converted checkpoint: `tokenizer` (with `<image>`) and
    `converted_image_processor(config)`."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=converted_image_processor(config), tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
        image_token=IMAGE_PLACEHOLDER,
    )
