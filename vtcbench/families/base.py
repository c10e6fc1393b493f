"""The model-family protocol (docs/architecture.md#model-families): everything vtcbench asks of a
vision-language model's architecture, answered by one file per family.

The engine, the profilers, the lmms-eval model, the sweep and training never name a family's
modules, config fields or prompt format; they ask the family of the model in hand
(`vtcbench.families.family_of`). A family answers:

- where the parts are: the multimodal model (whose forward sees `input_ids`, pixels and the
  cache), the language model (the decoder stack with `layers`, `norm`, `rotary_emb`), the vision
  tower and the projector;
- the image-token id and the architecture facts FLOPs need (`ModelFacts`);
- its prompt (the conversation format its own lmms-eval model class builds) and an offline
  processor for random-weight models;
- the rest of what its own lmms-eval model class does to a request (the processor's settings,
  what happens to the images before the processor, how the answer is cut and stripped), so that
  runs through lmms-eval answer as that class does (`evaluation_processor`, `evaluation_images`,
  `answer_rules`);
- its positions: 1-D RoPE ids `[batch, seq]`, or M-RoPE ids `[3, batch, seq]`; the engine keeps
  position ids as `[rows, batch, seq]` and asks the family how to split what the layers are
  handed and how to rebuild the RoPE tables for a gathered sequence;
- the attention row used for scoring: the query of one token and the keys of a sequence, from a
  decoder layer's input, through that family's norms, projections and rotary embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from vtcbench.errors import VtcbenchError


@dataclass(frozen=True)
class ModelFacts:
    """Architecture numbers needed for FLOPs and token bookkeeping, derivable from a config alone.

    `image_tokens` is the visual tokens the language model sees for the family's nominal image
    (LLaVA-1.5: the fixed grid; LLaVA-NeXT: the 5-crop maximum, newline tokens not counted; Qwen:
    the image size the facts were computed for). `vision_encoder_macs` and `projector_macs` are
    the family's own counts for that image (a tower's shape differs per family: CLIP's CLS and
    crops, Qwen's windows and 2x2 merger).
    """

    family: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    image_token_index: int
    image_tokens: int
    vision_n_layers: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_n_heads: int
    vision_n_tokens: int  # tokens per crop inside the vision tower (CLIP: including CLS)
    vision_patch_size: int
    vision_crops: int  # vision-tower forward passes per image (LLaVA-NeXT: 1 + tiles)
    projector_in: int
    projector_hidden: int
    projector_out: int
    vision_encoder_macs: int  # the tower on the nominal image, every crop
    projector_macs: int  # the projector (merger) on the nominal image
    image_size: tuple[int, int] | None = None  # (width, height) the facts describe, where the count depends on it


@dataclass(frozen=True)
class AnswerRules:
    """How the family's own lmms-eval model class reads a generation request and returns its
    answer; `VtcbenchLMM` applies them so that its answers are that class's. The defaults are
    what vtcbench did before families had their own (and still does for LLaVA)."""

    default_max_new_tokens: int = 128  # when the task sets no max_new_tokens
    ignored_stops: tuple[str, ...] = ()  # task stop strings the class drops before generating
    strip: bool = True  # whether the answer is stripped of surrounding whitespace
    #: generation ends at the tokenizer's eos only (the class passes `eos_token_id`), not at
    #: every eos of the model's generation config (Qwen's lists <|endoftext|> too)
    tokenizer_eos_only: bool = False


def decoder_facts(text: Any) -> dict[str, int]:
    """The `ModelFacts` fields of a LLaMA-style decoder config (every family's text config)."""
    n_heads = text.num_attention_heads
    return dict(
        n_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        n_heads=n_heads,
        n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // n_heads,
        vocab_size=text.vocab_size,
    )


def query_rows(hidden: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Rows `query` ([batch] or [batch, m] columns) of `hidden` [batch, seq, d], as [batch, m, d]."""
    index = query[:, None] if query.ndim == 1 else query
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


@dataclass(frozen=True)
class TextSide:
    """A contrastive text tower aligned with a family's vision tower (CLIP's, for LLaVA's), for
    methods that score image tokens against the question (CDPruner)."""

    #: one text -> [chunks, dim]: its pooled, projected embeddings, one per 77-token chunk
    embed_text: Callable[[str], torch.Tensor]
    #: the tower's feature-layer patches [images, n, width] -> [images, n, dim] in the same space
    embed_patches: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TextTowerFacts:
    """The shape of a text tower, for analytic FLOPs: each 77-token chunk runs `layers` layers."""

    layers: int
    width: int
    ffn: int
    positions: int
    projection: int  # the joint embedding's dimension


class ModelFamily:
    """One model family. Subclasses are registered in `vtcbench.families.FAMILIES`."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # `config.model_type` values this family covers
    description: ClassVar[str] = ""
    #: rows of position ids: 1 (1-D RoPE, `[batch, seq]`) or 3 (M-RoPE, `[3, batch, seq]`)
    position_rows: ClassVar[int] = 1
    #: whether every image of the family has the same number of visual tokens (a fixed grid):
    #: pre-LLM pooling of that grid and batching by image count rely on it
    fixed_image_grid: ClassVar[bool] = True
    #: whether the processor takes images of any size (dynamic resolution); `--image-size` needs it
    dynamic_resolution: ClassVar[bool] = False
    #: methods that cannot run on this family, each with the one-line reason
    unsupported_methods: ClassVar[dict[str, str]] = {}
    #: whether the vision tower has a CLS token whose attention methods may read (VisionZip)
    tower_has_cls: ClassVar[bool] = False
    #: whether the vision tower has a contrastive text tower (CLIP's) that methods may load (CDPruner)
    has_text_side: ClassVar[bool] = False
    #: whether an image is several tower crops on a grid (LLaVA-NeXT's AnyRes) that a per-crop
    #: selection lays out as its official code does (`crop_layout`)
    anyres_crops: ClassVar[bool] = False

    # -- loading -------------------------------------------------------------------------------
    def model_class(self, config: Any) -> type:
        raise NotImplementedError  # abstract: every family names its transformers class

    def local_processor(self, config: Any, words: tuple[str, ...]) -> Any:
        """A processor built offline for `config` (random-weight models have no hub files)."""
        raise NotImplementedError  # abstract

    def load_processor(self, config: Any, source: str, **kwargs: Any) -> Any:
        """The processor saved with a checkpoint (hub id or folder); `kwargs` go to `from_pretrained`."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, **kwargs)

    # -- parts ---------------------------------------------------------------------------------
    def multimodal(self, model: nn.Module) -> nn.Module:
        """The module whose forward takes `input_ids`, the pixels and the cache (`model.model`)."""
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack: `layers` (a ModuleList), `norm`, `rotary_emb`."""
        stack = getattr(self.multimodal(model), "language_model", None)
        if not isinstance(getattr(stack, "layers", None), nn.ModuleList):
            raise VtcbenchError(f"cannot find the language model decoder in {type(model).__name__}")
        return stack

    def vision_tower(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError  # abstract

    def projector(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError  # abstract

    def tower_feature_layer(self, model: nn.Module, after: int = 0) -> nn.Module:
        """The vision-tower layer whose output the projector reads (methods that read the tower),
        or the layer `after` layers later (PruMerge+ reads the next layer's projections)."""
        raise VtcbenchError(f"the {self.name} family exposes no vision-tower layer to methods")

    def tower_layers_after_feature(self, config: Any) -> int:
        """How many tower layers follow the one whose output the projector reads."""
        raise VtcbenchError(f"the {self.name} family exposes no vision-tower layer to methods")

    def trim_tower_for_training(self, config: Any) -> None:
        """Drop from `config` (in place) the tower layers training from random weights cannot
        reach; none by default."""

    def clip_with_tower(self, model: nn.Module, text: dict[str, Any], projection_dim: int) -> nn.Module:
        """A `CLIPModel` around the model's tower plus one new layer (`vtcbench train-clip`)."""
        raise VtcbenchError(f"the {self.name} family's tower is not a CLIP vision model")

    def attach_clip_layer(self, model: nn.Module, clip: nn.Module) -> None:
        """Give the model's tower `clip`'s last layer, read after the projector's (`vtcbench train-clip`)."""
        raise VtcbenchError(f"the {self.name} family's tower is not a CLIP vision model")

    def tower_cls_attention(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From a tower layer's input [images, tokens, width]: CLS's softmax attention row per head
        `[images, heads, tokens]` and every key per head `[images, heads, tokens, head_dim]`."""
        raise VtcbenchError(f"the {self.name} family's vision tower has no CLS token")

    def tower_cls_query_keys(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A tower layer's CLS query `[images, 1, width]` and keys `[images, tokens, width]` at full
        width (no heads), from its input."""
        raise VtcbenchError(f"the {self.name} family exposes no vision-tower layer to methods")

    def text_side(self, model: nn.Module, source: str) -> TextSide:
        """The text tower of `source` (the checkpoint the vision tower comes from), on the model's device."""
        raise VtcbenchError(f"the {self.name} family's vision tower has no contrastive text tower")

    def text_tower_facts(self, source: str) -> TextTowerFacts:
        """The shape of `source`'s text tower, from its config (offline: the shipped one)."""
        raise VtcbenchError(f"the {self.name} family's vision tower has no contrastive text tower")

    def crop_grids(self, config: Any, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        """Per image, the (rows, columns) of its tiles after its base crop (`anyres_crops` only)."""
        raise VtcbenchError(f"the {self.name} family has no AnyRes crops")

    def crop_layout(self, config: Any, image_sizes: torch.Tensor, slots: torch.Tensor) -> list[torch.Tensor]:
        """Per image, the order of its kept tokens as a per-crop selection's official code lays
        them out, as indices into `slots.flatten()` ([crops of every image, kept per crop]: the
        patch each kept token came from, -1 for CLS, -2 for a merged token); families with
        `anyres_crops` only."""
        raise VtcbenchError(f"the {self.name} family has no AnyRes crops")

    def set_projector(self, model: nn.Module, projector: nn.Module) -> None:
        """Install a trained projector in place of the family's own (STF, TokenConcat)."""
        raise VtcbenchError(f"the {self.name} family has no replaceable projector")

    # -- ids and facts -------------------------------------------------------------------------
    def image_token_id(self, config: Any) -> int:
        raise NotImplementedError  # abstract

    def video_token_id(self, config: Any) -> int | None:
        return None

    def images_in_batch(self, inputs: dict) -> int | None:
        """How many images a prefill's model inputs carry, where the prompt's runs of image tokens
        may touch (the engine then checks that it told the images apart); None where every image's
        run is delimited by the prompt itself."""
        return None

    def facts(self, config: Any, image_size: tuple[int, int] | None = None) -> ModelFacts:
        raise NotImplementedError  # abstract

    def text_config(self, config: Any) -> Any:
        return config.text_config

    # -- prompts ---------------------------------------------------------------------------------
    def system_prompt(self, config: Any) -> str:
        """The system sentence the model was evaluated with (a config may override it:
        `vtcbench_system_prompt`, as vtc-tiny's, trained without one)."""
        raise NotImplementedError  # abstract

    def prompt(self, context: str, n_images: int, answer: str | None = None, system: str = "") -> str:
        """The single-turn prompt its own evaluation builds, with `n_images` image placeholders."""
        raise NotImplementedError  # abstract

    def image_token(self) -> str:
        """The text of the token the processor repeats once per visual token (`<image>`)."""
        raise NotImplementedError  # abstract

    def follow_up(self, question: str) -> str:
        """A later user turn of a multi-turn training conversation, up to the answer."""
        raise NotImplementedError  # abstract

    def token_grid(self, pixels: dict[str, torch.Tensor], n_image: int) -> tuple[int, int] | None:
        """(rows, columns) of one image's visual tokens in raster order (retention pictures), or
        None where they form no single grid."""
        return None

    def collate_pixels(self, pixels: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch's image inputs (`pixel_values` and the family's extra keys) from each
        prompt's own processor output, as the family's batched processor call would give them."""
        raise NotImplementedError  # abstract

    # -- answering through lmms-eval (`VtcbenchLMM`) ---------------------------------------------
    def evaluation_processor(self, processor: Any, config: Any) -> Any:
        """The processor set up as the family's own lmms-eval class sets up its own (default: as
        loaded). Returns a new processor; the one passed in is left as it was."""
        return processor

    def evaluation_images(self, images: list[Image.Image], config: Any) -> list[Image.Image]:
        """A request's images as the family's own lmms-eval class hands them to its processor
        (default: converted to RGB)."""
        return [image.convert("RGB") for image in images]

    def answer_rules(self, config: Any) -> AnswerRules:
        """How the family's own lmms-eval class reads a generation request and returns its answer."""
        return AnswerRules()

    # -- inputs for profiling ------------------------------------------------------------------
    def synthetic_pixels(self, config: Any, batch: int, generator: torch.Generator) -> dict:
        """Pixel inputs for `batch` images of the nominal size (random values), as the processor
        would hand them to the model (extra keys such as a grid description included)."""
        raise NotImplementedError  # abstract

    def synthetic_image_tokens(self, config: Any) -> int:
        """The placeholders `synthetic_pixels`' image takes in a prompt: the nominal count (LLaVA-NeXT
        adds its newline tokens)."""
        return self.facts(config).image_tokens

    def image_span(self, config: Any, n_tokens: int) -> list[int]:
        """The token ids one image of `n_tokens` visual tokens occupies in a prompt."""
        return [self.image_token_id(config)] * n_tokens

    def token_inputs(self, config: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token inputs besides the ids and the mask that the model reads (none by default)."""
        return {}

    def check_image_size(self, width: int, height: int) -> None:
        """Refuse, in one line, an image the family's processor cannot take (default: any size)."""

    def resize_config(self, config: Any, *, image_tokens: int | None, layers: int | None) -> None:
        """Edit `config` in place for `vtcbench profile --random-weights`: `image_tokens` visual
        tokens per image, `layers` decoder layers."""
        raise NotImplementedError  # abstract

    def training_features(self, config: Any, tower: torch.Tensor, tokens: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The projector's input and output as training's auxiliary losses read them:
        `[batch, patches, width]` and `[batch, image tokens, d]`, both in raster order of the image
        (several patches per token are consecutive). Default: as the projector sees them."""
        return tower, tokens

    # -- positions -------------------------------------------------------------------------------
    # The engine keeps positions as rows `[batch, seq, rows]` (one row for 1-D RoPE) so one
    # gather serves every family; these convert from and to what transformers passes.
    def positions_in(self, position_ids: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """The language model's `position_ids` (None: 0..length-1) as rows `[batch, length, rows]`."""
        if position_ids is None:
            position_ids = torch.arange(length, device=device)
        return position_ids.expand(batch, -1)[..., None]

    def positions_out(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `[batch, seq, rows]` as the language model takes its `position_ids`."""
        return rows[..., 0]

    def layer_position_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows as a decoder layer is handed its `position_ids`."""
        return rows[..., 0]

    def rope(self, language_model: nn.Module, like: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for position rows, from the model's own rotary module."""
        return language_model.rotary_emb(like, self.positions_out(rows))

    # -- what the language model adds inside its layer loop --------------------------------------
    def layer_additions(self, config: Any) -> int:
        """How many of the first decoder layers get something added to their output inside the
        language model's own loop (Qwen3-VL's DeepStack); 0 for most families."""
        return 0

    def take_layer_additions(self, kwargs: dict, embeds: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        """The language model's kwargs without those additions, and the additions as
        `[layers, batch, seq, d]` (zero where nothing is added), for the engine to apply to the
        tokens that survive; `(kwargs, None)` when there are none."""
        return kwargs, None

    # -- the scoring row -------------------------------------------------------------------------
    def query_key(self, layer: nn.Module, hidden: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From a decoder layer's input `hidden` [batch, seq, d]: the queries of columns `query`
        ([batch], or [batch, m] for several per row) as `[batch, heads, m, head_dim]` and every
        key as `[batch, kv_heads, seq, head_dim]`, both before RoPE. Default: a LLaMA-style block
        (`input_layernorm`, then `q_proj`/`k_proj`, biases included where the family has them);
        a family with q/k norms overrides it."""
        attention = layer.self_attn
        batch, length, _ = hidden.shape
        normed = layer.input_layernorm(hidden)
        head_dim = attention.head_dim
        picked = query_rows(normed, query)
        q = attention.q_proj(picked).view(batch, picked.shape[1], -1, head_dim).transpose(1, 2)
        k = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
        return q, k

    def scoring_tables(self, layer: nn.Module, tables: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables a layer was handed, as `[batch, seq, head_dim]` (a family whose rotary
        module leaves merging to the attention merges them here)."""
        return tables

    def apply_rope(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on `[batch, heads, seq, head_dim]` with tables `[batch, 1, seq, head_dim]` (the
        rotate-half form; a family with another layout overrides it)."""
        half = states.shape[-1] // 2
        rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
        return states * cos + rotated * sin

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_layout(self) -> tuple[tuple[str, str], ...] | None:
        """(module prefix in this transformers release, key prefix in the hub layout) pairs for
        `transformers_seam.save_checkpoint`, or None to save as `save_pretrained` does."""
        return None

    # -- model cards -----------------------------------------------------------------------------
    def card_parts(self, config: Any, facts: ModelFacts) -> tuple[str, str, str]:
        """(vision tower, projector, decoder) described in words for a trained model's card."""
        raise NotImplementedError  # abstract: only families vtcbench trains need it

    # -- checks ----------------------------------------------------------------------------------
    def refusal(self, method: Any) -> str | None:
        """Why this family cannot run `method` (a method or its class), or None."""
        if method.name in self.unsupported_methods:
            return self.unsupported_methods[method.name]
        if method.reads_tower_cls and not self.tower_has_cls:
            return "it reads the vision tower's CLS attention; this family's tower has no CLS token"
        if method.reads_text_side and not self.has_text_side:
            return "it scores image tokens against the question with the vision tower's CLIP text tower; this family's tower has none"
        if method.kind.needs_fixed_grid and not self.fixed_image_grid and not (self.anyres_crops and method.selects_per_crop):
            return "it works on a fixed grid of image tokens before the LLM; this family gives each image its own count"
        return None

    def check_method(self, method: Any) -> None:
        """Refuse a method this family cannot run, in one line, before weights load."""
        reason = self.refusal(method)
        if reason is not None:
            raise VtcbenchError(f"{method.name} cannot run on the {self.name} family: {reason}")
