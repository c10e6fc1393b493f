"""The compression engine (docs/architecture.md#the-engine): applies a method's plan to a model of any family.

`with compress(model, method) as engine:` attaches forward pre-hooks and removes them on exit;
no transformers class is patched. Three hook points:

- the multimodal model (the family's, e.g. `LlavaModel`): locates image tokens from `input_ids ==`
  the family's image-token id and decides prefill (no cache yet) or decode (a cache that already
  holds the prompt);
- the language model (the decoder stack): records the prompt's positions and padding, applies a
  layer-0 action to the embeddings (so the model builds its masks and caches in the compressed
  space), and during decode slices the 2-D padding mask to the kept columns;
- the decoder layers from the first planned one on: apply an action at its layer, and give each
  layer the attention mask, position ids and RoPE tables of the sequence it actually sees.

Bookkeeping is in "spaces": a space is the token sequence as some layers see it, stored as
indices into the layer-0 sequence (`index0`), plus positions, padding and image flags. Samples
may hold different numbers of image tokens (LLaVA-NeXT's AnyRes) and keep different numbers;
after an action each row is left-padded with filler slots to the longest, and the fillers'
mask columns are masked (prefill and decode), so each sample computes what it would alone. The model
builds one mask and one RoPE table for layer 0; every later space gathers its rows/columns from
them at prefill, and at decode gathers the columns of its cached tokens plus the new ones. Per
layer the KV cache therefore holds only that layer's tokens. New tokens continue from the
prompt's last position in each space (for FastV/LLaVolta that is the original length; for
PyramidDrop's compacted positions, the compacted length, as an uncached rerun would give).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache

from vtcbench import transformers_seam as seam
from vtcbench.errors import VtcbenchError
from vtcbench.families import ModelFamily, family_of
from vtcbench.methods.base import Keep, LayerContext, Method, Replace
from vtcbench.models import image_token_mask

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2")
#: the question of prompts that carry none of their own (a profile's synthetic inputs), for every
#: engine without `questions`: `token = QUESTIONS.set("..."); ...; QUESTIONS.reset(token)`
QUESTIONS: ContextVar[str | None] = ContextVar("questions", default=None)


@dataclass
class Space:
    """The sequence as a run of layers sees it; all tensors [batch, seq] unless noted."""

    index0: torch.Tensor  # indices into the layer-0 sequence (mask columns)
    position_ids: torch.Tensor  # [batch, seq, rows]: one row for 1-D RoPE, the family's rows for M-RoPE
    valid: torch.Tensor  # bool: not padding
    is_image: torch.Tensor  # bool
    shift: torch.Tensor  # [batch, rows]: layer-0 position of the last prompt token minus ours
    query: torch.Tensor  # [batch]: column of the scoring query (the last prompt token)
    image_counts: list[int]  # image tokens per sample
    lengths: list[int]  # slots per sample that are not filler
    #: bool: slots added (at the front) to pad a shorter sample to the batch's longest; their mask
    #: columns are masked and they are never valid. None: no sample is padded by the engine
    filler: torch.Tensor | None = None
    #: [n, batch, seq, d]: what the model adds to the output of its first n layers (Qwen3-VL's
    #: DeepStack features at the visual tokens), taken over by the engine so it follows the tokens
    additions: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # the attention mask in this space (prefill)
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    decode_memo: tuple = field(default=(), repr=False)  # (mask_in, position_ids_in, mask_out, pos_out, emb_out)

    @property
    def image_index(self) -> torch.Tensor:
        """[batch, most image tokens]: each sample's image columns, then (if it has fewer) others."""
        return _row_nonzero(self.is_image, max(self.image_counts))


@dataclass
class _Request:
    """One forward's state, created at prefill and kept for the decode steps that follow."""

    image_mask: torch.Tensor  # [batch, seq] in the original prompt
    input_ids: torch.Tensor
    valid: torch.Tensor  # [batch, seq] bool: not padding
    n_image: list[int]  # N0 of each sample
    grid: int | None = None  # image tokens per image on a fixed grid (splits runs of several images)
    images: int | None = None  # images the inputs carry, where their runs may touch (else None)
    video_mask: torch.Tensor | None = None  # [batch, seq] the video tokens among the image tokens, if any
    original_length: int = 0  # padded prompt length before any compression
    lm_index: torch.Tensor | None = None  # layer-0 space in original indices, if layer 0 acted
    lm_filler: torch.Tensor | None = None  # its filler slots (columns masked at decode), if any
    decode_width: int = 0  # during a decode step: the layer-0 space's mask width (cache + new tokens)
    decode_positions: torch.Tensor | None = None  # during a decode step: layer 0's positions [batch, new, rows]
    space0: Space | None = None
    space: Space | None = None  # current space while the prefill runs through the layers
    layer_space: dict[int, Space] = field(default_factory=dict)
    scores: dict[int, _ScoreLayer] = field(default_factory=dict)  # action layer -> its score layer's input
    embeddings0: torch.Tensor | None = None  # the language model's input embeddings at prefill (layer-0 space)
    decoding: bool = False
    _sample_keys: list[int] | None = None
    _image_runs: list[list[int]] | None = None
    _image_runs_done: bool = False

    def image_runs(self) -> list[list[int]] | None:
        """Per sample, each image's token count in order (None where two images' runs touch),
        computed on first use: it copies the mask to the host, so only methods that read it pay."""
        if not self._image_runs_done:
            self._image_runs, self._image_runs_done = count_image_runs(self.image_mask, self.grid, self.images), True
        return self._image_runs

    def sample_keys(self) -> list[int]:
        """A stable key per sample (CRC-32 of its unpadded prompt ids), computed on first use:
        it copies the prompt to the host, so only methods that read it (random) pay for it."""
        if self._sample_keys is None:
            self._sample_keys = _sample_keys(self.input_ids, self.valid)
        return self._sample_keys


class CompressionEngine:
    """Reversible context manager that applies `method` to `model` (any family in `vtcbench.families`)."""

    def __init__(self, model: nn.Module, method: Method):
        self.model = model
        self.method = method
        self.family = family_of(model)
        self.multimodal = self.family.multimodal(model)
        self.language_model = self.family.language_model(model)
        self.layers = self.language_model.layers
        self.n_layers = len(self.layers)
        self.facts = self.family.facts(model.config)
        self.image_token_id = self.family.image_token_id(model.config)
        #: videos' tokens are visual tokens too: the engine compresses them as image tokens
        self.video_token_id = self.family.video_token_id(model.config)
        # the method against this model, once per engine: its family, its kind, and (where every
        # image has one grid) its hyperparameters; a prefill checks each new visual-token count once
        self.family.check_method(method)
        method.kind.check_engine(method)
        self._validated: set[int] = set()
        if self.family.fixed_image_grid:
            self._validate(self.facts.image_tokens)
        #: M-RoPE has no compacted form: a `compact` method keeps original positions there
        self.compact = method.position_policy == "compact" and self.family.position_rows == 1
        self.plan = method.kind.plan(self)
        self.score_layers = {score: action for action, score in self.plan.items() if score is not None}
        #: per sample, the visual tokens (an image's or a video's) that entered each decoder layer
        #: at the last prefill, and of them the video tokens (zeros without a video)
        self.applied_image_tokens_per_sample: list[list[int]] = []
        self.applied_video_tokens_per_sample: list[list[int]] = []
        #: set `record_kept = True` to have each prefill record, per layer where the kept image
        #: tokens change (0: all of them), which ones each sample keeps, as ranks among its
        #: original image tokens (raster order); a pooling method's pooled tokens appear as their
        #: anchors. It copies indices to the host, so it is off by default.
        self.record_kept = False
        self.kept_image_tokens: dict[int, list[list[int]]] = {}
        #: with `record_kept`, per layer where a method merged tokens (pooling, k-means), per
        #: sample, the original ranks each new token merged (what a picture of "kept" must show)
        self.merged_image_tokens: dict[int, list[list[list[int]]]] = {}
        self.original_image_tokens: list[int] = []  # per sample, what the ranks count (a layer-0 action replaces layer 0's entry)
        self._handles: list = []
        self._request: _Request | None = None
        #: [images, grid] bool: the real tokens of each image's padded run after a tower selection
        #: whose count depends on the image (PruMerge+), set by the tower hooks at each prefill
        self.tower_kept: torch.Tensor | None = None
        #: a per-crop selection on AnyRes crops (LLaVA-NeXT), set by the kind's hooks at each
        #: prefill: the prefill's `image_sizes`, and each image's kept tokens as the method lays them out
        self.image_sizes: torch.Tensor | None = None
        self.crop_tokens: list[torch.Tensor] | None = None
        #: each prompt's question, for methods that score the image against it (CDPruner): set by
        #: the caller per batch (a `Session` from its prompts), else read from `QUESTIONS`
        self.questions: list[str] | None = None
        #: images of each prompt of the last prepared batch (`engine.prepare`, question-conditioned methods)
        self.images_per_prompt: list[int] = []
        #: wraps the method's own work (scoring, selection, rebuilding the sequence); a profiler
        #: may set it to a timer, e.g. `engine.overhead = lambda: timer.phase("method_overhead")`
        self.overhead: Callable[[], AbstractContextManager] = nullcontext
        #: for teacher-forced training, where the forward carries the answer after the prompt: the
        #: number of (left-padded) prompt columns. Scores then come from the last prompt token, as
        #: PyramidDrop's training code ranks by the last instruction token, and ignore the answer.
        self.prompt_length: int | None = None

    @property
    def applied_image_tokens_per_layer(self) -> list[int]:
        """The first sample's `applied_image_tokens_per_sample` (every sample's when their image
        tokens are equal in number, as in a LLaVA-1.5 batch)."""
        return self.applied_image_tokens_per_sample[0] if self.applied_image_tokens_per_sample else []

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> CompressionEngine:
        attention = self.model.config._attn_implementation
        if attention not in SUPPORTED_ATTENTION:
            raise VtcbenchError(
                f"attention backend {attention!r} is not supported by the engine; valid: {', '.join(SUPPORTED_ATTENTION)}"
            )
        try:  # a kind that cannot attach (CDPruner's CLIP checkpoint missing) leaves no hook behind
            self._attach()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _attach(self) -> None:
        hook = self._handles.append
        hook(self.multimodal.register_forward_pre_hook(self._on_multimodal, with_kwargs=True))
        self._handles.extend(self.method.kind.engine_hooks(self))
        if self.plan:
            hook(self.language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True))
            for index in self._hooked_layers():
                hook(self.layers[index].register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
            for index in self._addition_layers():
                hook(self.layers[index].register_forward_hook(self._addition_hook(index)))

    def _hooked_layers(self) -> range:
        """The decoder layers whose pre-hook applies the plan (none without one)."""
        if not self.plan:
            return range(0)
        first = min([*self.plan, *self.score_layers])
        # a layer-0 action (and its scoring) runs in the language model's hook, on the embeddings;
        # layer 0 is hooked only to score for an action at layer 1 (FastV with K=1)
        return range(first + 1 if 0 in self.plan else first, self.n_layers)

    def _addition_layers(self) -> range:
        """The decoder layers after which the model adds features (DeepStack; none without a plan)."""
        return range(self.family.layer_additions(self.model.config) if self.plan else 0)

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.forget()

    def forget(self) -> None:
        """Drop the last prefill's bookkeeping (`__exit__` does; a resumed prefill scored without
        a decode, which would enter the engine, must)."""
        self._request = None

    # -- inputs ------------------------------------------------------------------------------------
    def prepare(self, inputs: dict) -> dict:
        """The inputs as the method's kind needs them (`MethodKind.prepare`): unchanged for in-LLM
        methods; a pre-LLM method (pooling before the LLM) makes the prompt itself shorter, so
        the prompt must carry the pooled count of `<image>` tokens."""
        return self.method.kind.prepare(self, inputs)

    def _validate(self, n_image: int) -> None:
        """`method.validate_for` at this visual-token count, once per count."""
        if n_image not in self._validated:
            self.method.validate_for(n_image, self.n_layers)
            self._validated.add(n_image)

    # -- hooks -----------------------------------------------------------------------------------
    def _on_multimodal(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if seam.is_decode_step(kwargs, input_ids):
            if self._request is not None:
                self._request.decoding = True
            return
        self._request = None
        if input_ids is None:
            if self.plan:
                raise VtcbenchError("the engine locates image tokens from input_ids; pass input_ids, not inputs_embeds")
            return
        image_mask = image_token_mask(input_ids, self.image_token_id)
        video_mask = None if self.video_token_id is None else input_ids == self.video_token_id
        if video_mask is not None and bool(video_mask.any()):
            image_mask = image_mask | video_mask
        else:
            video_mask = None
        n_image = image_mask.sum(dim=1).tolist()
        self.applied_image_tokens_per_sample = [[n] * self.n_layers for n in n_image]
        n_video = [0] * len(n_image) if video_mask is None else video_mask.sum(dim=1).tolist()
        self.applied_video_tokens_per_sample = [[n] * self.n_layers for n in n_video]
        if not any(n_image):
            return
        self.method.kind.check_prefill(self, image_mask, kwargs.get("pixel_values"))
        if self.record_kept:
            self.kept_image_tokens = {0: [list(range(n)) for n in n_image]}
            self.merged_image_tokens = {}
            self.original_image_tokens = n_image
        if not self.plan:
            return
        if not all(n_image):
            raise VtcbenchError(f"{self.method.name} needs image tokens in every prompt of a batch, or in none; got {n_image}")
        for n in sorted(self.method.kind.validation_counts(self, n_image)):
            self._validate(n)
        attention_mask = kwargs.get("attention_mask")
        valid = torch.ones_like(image_mask) if attention_mask is None else attention_mask.bool()
        grid = self.facts.image_tokens if self.family.fixed_image_grid else None
        self._request = _Request(image_mask=image_mask, input_ids=input_ids, valid=valid, n_image=n_image, grid=grid,
                                 images=self.family.images_in_batch(kwargs), video_mask=video_mask)
        if self.prompt_length is not None:  # a teacher-forced answer must not change a sample's key (random's draw)
            self._request._sample_keys = _sample_keys(input_ids[:, : self.prompt_length], valid[:, : self.prompt_length])
        return

    def _on_language_model(self, module, args, kwargs):
        request = self._request
        if request is None:
            return None
        if request.decoding:
            return args, self._language_model_decode(request, kwargs)
        embeds = seam.language_model_embeddings(kwargs)
        batch, length = embeds.shape[:2]
        kwargs, additions = self.family.take_layer_additions(kwargs, embeds)
        attention_mask = kwargs.get("attention_mask")
        valid = request.image_mask.new_ones(batch, length) if attention_mask is None else attention_mask.bool()
        position_ids = self.family.positions_in(kwargs.get("position_ids"), batch, length, embeds.device)
        request.original_length = length
        request.embeddings0 = embeds
        query = length - 1 if self.prompt_length is None else self.prompt_length - 1
        space = Space(
            index0=torch.arange(length, device=embeds.device).expand(batch, -1),
            position_ids=position_ids,
            valid=valid,
            is_image=request.image_mask,
            shift=position_ids.new_zeros(batch, position_ids.shape[-1]),
            query=torch.full((batch,), query, device=embeds.device),
            image_counts=request.n_image,
            lengths=[length] * batch,
            additions=additions,
        )
        if 0 in self.plan:
            if self.plan[0] == 0:
                cos_sin = self.family.rope(self.language_model, embeds, position_ids)
                request.scores[0] = _ScoreLayer(self.family, self.layers[0], embeds, cos_sin, space)
            with self.overhead():
                space, embeds = self._act(request, 0, space, embeds)
            request.lm_index, request.lm_filler = space.index0, space.filler
            kwargs = dict(kwargs, inputs_embeds=embeds, position_ids=self.family.positions_out(space.position_ids))
            # a padding mask always: fillers are padding, and without a mask transformers may read
            # positions with gaps (kept tokens keep their ids) as packed sequences
            kwargs["attention_mask"] = space.valid.to(torch.long if attention_mask is None else attention_mask.dtype)
            width = space.index0.shape[1]
            space = Space(
                index0=torch.arange(width, device=embeds.device).expand(batch, -1),
                position_ids=space.position_ids,
                valid=space.valid,
                is_image=space.is_image,
                shift=space.shift,
                query=space.query,
                image_counts=space.image_counts,
                lengths=[width] * batch,
                additions=space.additions,
            )
        else:
            kwargs = dict(kwargs, position_ids=self.family.positions_out(position_ids))
        request.space0 = request.space = space
        return args, kwargs

    def _language_model_decode(self, request: _Request, kwargs: dict) -> dict:
        """Explicit positions for the new tokens, and the padding mask of layer 0's cache."""
        embeds = seam.language_model_embeddings(kwargs)
        batch, new = embeds.shape[:2]
        space0 = request.space0
        cached0 = seam.find_cache(kwargs).get_seq_length()  # layer 0 is in the layer-0 space
        request.decode_width = cached0 + new
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            start = request.original_length + cached0 - space0.index0.shape[1]
            position_ids = torch.arange(start, start + new, device=embeds.device).expand(batch, -1)
        rows = self.family.positions_in(position_ids, batch, new, embeds.device) - space0.shift[:, None]
        request.decode_positions = rows
        kwargs = dict(kwargs, position_ids=self.family.positions_out(rows))
        attention_mask = kwargs.get("attention_mask")
        if request.lm_filler is not None and attention_mask is None:  # fillers need a padding mask
            width = request.original_length + request.decode_width - space0.index0.shape[1]
            attention_mask = request.lm_filler.new_ones(batch, width, dtype=torch.long)
        if request.lm_index is not None and attention_mask is not None and attention_mask.ndim == 2:
            columns = _decode_columns(request.lm_index, request.original_length, attention_mask.shape[1])
            attention_mask = attention_mask.gather(1, columns)
            if request.lm_filler is not None:
                attention_mask = seam.hide_keys(attention_mask, _pad_right(request.lm_filler, attention_mask.shape[1]))
            kwargs["attention_mask"] = attention_mask
        return kwargs

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            request = self._request
            if request is None or request.space is None:
                return None
            if request.decoding:
                space = request.layer_space.get(index, request.space0)
                if space is request.space0:
                    return None
                return args, self._decode_kwargs(request, space, kwargs)
            hidden = seam.hidden_states(args, kwargs)
            space = request.space
            # this layer's input, read when the action layer's method asks (`LayerContext`): before
            # this layer's own action when it scores for itself (PyramidDrop ranks, then drops),
            # after it when it scores for a later one (SparseVLM's consecutive pruning layers)
            action = self.score_layers.get(index)
            if action == index:
                embeddings = seam.rope_tables(self._prefill_kwargs(request, space, kwargs))
                request.scores[action] = _ScoreLayer(self.family, module, hidden, embeddings, space)
            if index in self.plan:
                with self.overhead():
                    space, hidden = self._act(request, index, space, hidden)
                request.space = space
                args, kwargs = seam.with_hidden_states(args, kwargs, hidden)
            if action is not None and action != index:
                embeddings = seam.rope_tables(self._prefill_kwargs(request, space, kwargs))
                request.scores[action] = _ScoreLayer(self.family, module, hidden, embeddings, space)
            request.layer_space[index] = space
            return args, self._prefill_kwargs(request, space, kwargs)

        return hook

    def _addition_hook(self, index: int):
        """After layer `index` at prefill: add what the model would add there (DeepStack), for
        the tokens of that layer's space."""

        def hook(module, args, output):
            request = self._request
            if request is None or request.decoding or request.space0 is None:
                return None
            space = request.layer_space.get(index, request.space0)
            if space.additions is None or index >= space.additions.shape[0]:
                return None
            hidden = seam.layer_output(output)
            hidden = hidden + space.additions[index].to(hidden.dtype)
            return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

        return hook

    # -- prefill -----------------------------------------------------------------------------------
    def _act(self, request: _Request, layer: int, space: Space, hidden: torch.Tensor) -> tuple[Space, torch.Tensor]:
        """Run the method at `layer` and build the space (and hidden states) that follow.

        Each row keeps its text (and prompt padding) and its chosen image tokens in order; rows
        left shorter than the longest are left-padded with filler slots, which copy the row's
        first kept slot (so the mask rows they gather are ordinary ones) and are masked as keys.
        """
        image_index = space.image_index
        scoring = request.scores.pop(layer, None)
        ctx = LayerContext(
            layer=layer,
            hidden_states=hidden,
            image_index=image_index,
            position_ids=space.position_ids,
            n_image_per_sample=space.image_counts,
            n_image_original_per_sample=request.n_image,
            n_layers=self.n_layers,
            keys_fn=request.sample_keys,
            scores_fn=None if scoring is None else (lambda: scoring.attention().gather(1, image_index)),
            score_layer=scoring,
            index0=space.index0,
            embeddings0=request.embeddings0,
            tower_kept=self.tower_kept,
            runs_fn=request.image_runs if layer == 0 else None,
            crop_tokens=self.crop_tokens if layer == 0 else None,
            valid=space.valid,
            query=space.query,
            final_norm=self.language_model.norm,
        )
        action = self.method.select(ctx)
        chosen = action.indices if isinstance(action, Keep) else action.anchors
        batch, length = space.is_image.shape
        counts = [chosen.shape[1]] * batch if action.counts is None else list(action.counts)
        kept_image = image_index.gather(1, chosen)
        real = None
        if action.counts is not None:  # a row's entries past its count point past the sequence's end
            real = torch.arange(chosen.shape[1], device=chosen.device) < torch.tensor(counts, device=chosen.device)[:, None]
            kept_image = kept_image.masked_fill(~real, length)
        keep = ~space.is_image if space.filler is None else ~space.is_image & ~space.filler
        keep = torch.cat([keep, keep.new_zeros(batch, 1)], dim=1).scatter(1, kept_image, torch.ones_like(kept_image, dtype=torch.bool))[:, :length]
        lengths = [n - old + new for n, old, new in zip(space.lengths, space.image_counts, counts)]
        width = max(lengths)
        columns = torch.arange(length, device=keep.device)
        order = torch.where(keep, columns, -1).sort(dim=1).values[:, length - width :]
        filler = None
        if min(lengths) < width:
            filler = order < 0
            first = order.gather(1, torch.tensor([width - n for n in lengths], device=order.device)[:, None])
            order = torch.where(filler, first, order)
        is_image = space.is_image.gather(1, order)
        valid = space.valid.gather(1, order)
        if filler is not None:
            is_image, valid = is_image & ~filler, valid & ~filler
        hidden = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        additions = None
        if space.additions is not None:
            additions = space.additions.gather(2, order[None, :, :, None].expand(space.additions.shape[0], -1, -1, space.additions.shape[-1]))
        rows = space.position_ids.shape[-1]
        position_ids = space.position_ids.gather(1, order[..., None].expand(-1, -1, rows))
        if isinstance(action, Replace):
            new_hidden, new_positions = (action.hidden, action.position_ids) if real is None else (action.hidden[real], action.position_ids[real])
            hidden = hidden.masked_scatter(is_image.unsqueeze(-1), new_hidden.to(hidden.dtype))
            position_ids = position_ids.masked_scatter(is_image[..., None].expand(-1, -1, rows), new_positions.to(position_ids.dtype))
            if additions is not None:
                merged = _merged_additions(space.additions, image_index, ctx.image_valid, action)
                additions = additions.masked_scatter(is_image[None, ..., None].expand_as(additions), merged if real is None else merged[:, real])
        if self.compact:
            position_ids = ((valid.cumsum(dim=1) - 1) * valid).to(position_ids.dtype)[..., None]
        reference = request.space0 or space  # layer 0's space (or this one, when layer 0 acts)
        is_query = order == space.query[:, None]
        new_space = Space(
            index0=space.index0.gather(1, order),
            position_ids=position_ids,
            valid=valid,
            is_image=is_image,
            shift=reference.position_ids[:, -1] - position_ids[:, -1],
            query=(is_query if filler is None else is_query & ~filler).int().argmax(dim=1),
            image_counts=counts,
            lengths=lengths,
            filler=filler,
            additions=additions,
        )
        for applied, count in zip(self.applied_image_tokens_per_sample, counts):
            applied[layer:] = [count] * (self.n_layers - layer)
        if request.video_mask is not None:  # a merged token counts as its anchor's modality
            original = new_space.index0 if request.lm_index is None else request.lm_index.gather(1, new_space.index0)
            videos = (request.video_mask.gather(1, original) & new_space.is_image).sum(dim=1).tolist()
            for applied, count in zip(self.applied_video_tokens_per_sample, videos):
                applied[layer:] = [count] * (self.n_layers - layer)
        if self.record_kept:
            self.kept_image_tokens[layer] = self._image_ranks(request, new_space)
            if isinstance(action, Replace) and action.groups is not None:
                ranks = self._image_ranks(request, space)
                self.merged_image_tokens[layer] = [
                    [[r for r, g in zip(row_ranks, row_groups) if g == k] for k in range(count)]
                    for row_ranks, row_groups, count in zip(ranks, action.groups.tolist(), counts)
                ]
        return new_space, hidden

    @staticmethod
    def _image_ranks(request: _Request, space: Space) -> list[list[int]]:
        """Per sample, the ranks among its original image tokens of the image tokens in `space`."""
        original = space.index0 if request.lm_index is None else request.lm_index.gather(1, space.index0)
        rank = request.image_mask.long().cumsum(dim=1) - 1
        ranks = rank.gather(1, original)
        return [row[image].tolist() for row, image in zip(ranks, space.is_image)]

    def _prefill_kwargs(self, request: _Request, space: Space, kwargs: dict) -> dict:
        """The layer kwargs of `space`, derived once from the model's layer-0 kwargs."""
        if space is request.space0:
            return kwargs
        if space.position_embeddings is None:
            space.mask = seam.select_mask(kwargs.get("attention_mask"), space.index0, rows=True)
            if space.filler is not None:
                if space.mask is None:  # nothing was padded, so the model passed none: build one
                    causal = space.index0[:, None, :] <= space.index0[:, :, None]
                    space.mask = seam.explicit_mask(self.model.config._attn_implementation, causal)
                space.mask = seam.hide_keys(space.mask, space.filler)
            cos, _ = seam.rope_tables(kwargs)
            space.position_embeddings = self.family.rope(self.language_model, cos, space.position_ids)
        return dict(
            kwargs,
            attention_mask=space.mask,
            position_ids=self.family.layer_position_ids(space.position_ids),
            position_embeddings=space.position_embeddings,
        )

    # -- branching -------------------------------------------------------------------------------
    def resume(self, layer: int, inputs: dict, trunk: Trunk, cache: Cache | None) -> ResumedPrefill:
        """The prefill of `inputs` under this method, resumed at `layer` from a vanilla trunk.

        Layers below the method's first action see the same inputs as vanilla's, so their
        outputs (and KV caches) are the trunk's: only `layer` onwards runs, on the trunk's input
        to it, with this engine's hook functions called around each layer as a whole forward
        under the method would have them called. `cache` holds the trunk's prompt entries of
        layers < `layer` and receives the rest. The hooks are called, not registered, so that
        the prefills of several engines can share their layers' calls (`run_together`): resume
        outside the engine's `with`, and enter it afterwards to let `generate` continue from `cache`.
        """
        if self._handles:
            raise RuntimeError("a resumed prefill calls the engine's hooks itself: resume outside `with engine`")
        first = min([*self.plan, *self.score_layers], default=self.n_layers)
        if not 0 < layer <= first:
            raise VtcbenchError(f"{self.method.name} acts from layer {first}; a branch can resume at 1..{first}, not {layer}")
        self._on_multimodal(self.multimodal, (), {k: inputs.get(k) for k in ("input_ids", "attention_mask", "pixel_values")})
        self._on_language_model(self.language_model, (), trunk.language_model_kwargs)
        args, kwargs = trunk.layer_inputs[layer]
        return ResumedPrefill(self, layer, args, kwargs if cache is None else seam.with_cache(kwargs, cache))

    # -- decode ------------------------------------------------------------------------------------
    def _decode_kwargs(self, request: _Request, space: Space, kwargs: dict) -> dict:
        """Mask columns of this layer's cached tokens plus the new ones; positions shifted."""
        mask, position_ids = kwargs.get("attention_mask"), request.decode_positions
        memo = space.decode_memo
        if not memo or memo[0] is not mask or memo[1] is not position_ids:
            mask_out = None
            if mask is not None or space.filler is not None:
                prompt_length0 = request.space0.index0.shape[1]
                width = request.decode_width if mask is None else mask.shape[-1]
                columns = _decode_columns(space.index0, prompt_length0, width)
                mask_out = seam.select_mask(mask, columns, rows=False)
            if space.filler is not None:
                if mask_out is None:  # nothing was padded, so the model passed none: build one
                    new = position_ids.shape[1]
                    after = torch.arange(columns.shape[1], device=columns.device) - space.index0.shape[1]
                    causal = after <= torch.arange(width - prompt_length0 - new, width - prompt_length0, device=columns.device)[:, None]
                    mask_out = seam.explicit_mask(self.model.config._attn_implementation, causal.expand(columns.shape[0], -1, -1))
                mask_out = seam.hide_keys(mask_out, _pad_right(space.filler, columns.shape[1]))
            pos_out = position_ids - space.shift[:, None]
            cos, _ = seam.rope_tables(kwargs)
            emb_out = self.family.rope(self.language_model, cos, pos_out)
            memo = space.decode_memo = (mask, position_ids, mask_out, self.family.layer_position_ids(pos_out), emb_out)
        return dict(kwargs, attention_mask=memo[2], position_ids=memo[3], position_embeddings=memo[4])


class ResumedPrefill:
    """A prefill resumed at some layer (`CompressionEngine.resume`), one decoder layer at a time."""

    def __init__(self, engine: CompressionEngine, layer: int, args: tuple, kwargs: dict):
        self.engine = engine
        self.next_layer = layer
        self._args, self._kwargs = args, kwargs
        self._hooked, self._added = engine._hooked_layers(), engine._addition_layers()
        self.hidden = seam.hidden_states(args, kwargs)  # the last layer's output once `done`

    @property
    def done(self) -> bool:
        return self.next_layer == self.engine.n_layers

    def layer_call(self) -> tuple[tuple, dict]:
        """The next layer's (args, kwargs), after the engine's pre-hook (which may act there)."""
        engine, index = self.engine, self.next_layer
        args, kwargs = seam.with_hidden_states(self._args, self._kwargs, self.hidden)
        if index in self._hooked:
            changed = engine._layer_hook(index)(engine.layers[index], args, kwargs)
            if changed is not None:
                args, kwargs = changed
        return args, kwargs

    def finish_layer(self, args: tuple, hidden: torch.Tensor) -> None:
        """Take the next layer's output hidden states, after the engine's post-hook (DeepStack)."""
        engine, index = self.engine, self.next_layer
        if index in self._added:
            added = engine._addition_hook(index)(engine.layers[index], args, hidden)
            hidden = hidden if added is None else added
        self.hidden = hidden
        self.next_layer += 1


def run_together(prefills: list[ResumedPrefill], pack: bool = True) -> None:
    """Run resumed prefills (a sweep's branches) to their ends, layer by layer: at each decoder
    layer, the prefills that have reached it run it as one call with their sequences packed in
    one row (`transformers_seam.packed_layer`: a matrix product on every sequence's tokens at
    once runs faster per token than on each sequence alone), or one after another where they
    cannot be packed (or `pack` is off). Each sequence attends only to its own keys and gets its
    own cache entries."""
    while not all(prefill.done for prefill in prefills):
        index = min(prefill.next_layer for prefill in prefills if not prefill.done)
        ready = [prefill for prefill in prefills if prefill.next_layer == index]
        layer = ready[0].engine.layers[index]
        calls = [prefill.layer_call() for prefill in ready]
        if pack and seam.can_pack(layer, calls):
            outputs = seam.packed_layer(layer, calls)
        else:
            outputs = [seam.layer_output(layer(*args, **kwargs)) for args, kwargs in calls]
        for prefill, (args, _), hidden in zip(ready, calls, outputs):
            prefill.finish_layer(args, hidden)


class Trunk:
    """Records, during one vanilla prefill, what branches resumed at `layers` need.

    `with Trunk(model, {8, 16}) as trunk: model.generate(...)` keeps the language model's
    kwargs, each listed layer's input (args and kwargs) and, at that point, the KV cache entries
    of the layers below it, all by reference; only the first forward (the prefill) is recorded.
    """

    def __init__(self, model: nn.Module, layers: set[int]):
        self.model = model
        self.language_model = family_of(model).language_model(model)
        self.layers = sorted(layers)
        self.language_model_kwargs: dict | None = None
        self.layer_inputs: dict[int, tuple[tuple, dict]] = {}
        self.cache_prefix: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        #: perf_counter() when the prefill reached each layer (after a CUDA sync): what a separate
        #: run of a branch at that layer spends before it
        self.reached: dict[int, float] = {}
        self._handles: list = []

    def __enter__(self) -> Trunk:
        self._handles.append(self.language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True))
        for index in self.layers:
            layer = self.language_model.layers[index]
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_language_model(self, module, args, kwargs):
        if self.language_model_kwargs is None:
            self.language_model_kwargs = dict(kwargs)

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            if index in self.layer_inputs:
                return
            self.layer_inputs[index] = (args, dict(kwargs))
            self.reached[index] = clock()
            cache = seam.find_cache(kwargs)
            if cache is not None:
                self.cache_prefix[index] = seam.cache_prefix(cache, index)

        return hook

    def branch_cache(self, layer: int) -> Cache | None:
        """A cache for a branch at `layer`: the trunk's prompt entries of the layers below it."""
        if layer not in self.cache_prefix:
            return None
        return seam.branch_cache(self.model.config, self.cache_prefix[layer])


def clock() -> float:
    """perf_counter() once the GPU's queued work is done (wall time of what was launched so far)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def compress(model: nn.Module, method: Method) -> CompressionEngine:
    """`with compress(model, method) as engine: model.generate(**engine.prepare(inputs))`."""
    return CompressionEngine(model, method)


# -- tensor helpers ------------------------------------------------------------------------------------


def _row_nonzero(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Per row, the columns where `mask` is True, ascending, then (a row with fewer than `count`)
    columns where it is False: [batch, count]. A stable sort, so no host sync."""
    return (~mask).to(torch.uint8).argsort(dim=1, stable=True)[:, :count]


def count_image_runs(image_mask: torch.Tensor, grid: int | None = None, images: int | None = None) -> list[list[int]] | None:
    """Per sample, the token count of each image: its runs of consecutive image tokens, a run of
    whole `grid`s split into images of one grid each (a fixed grid); None when the batch holds
    `images` images and the runs count otherwise (two images' placeholders touch)."""
    edges = torch.diff(torch.nn.functional.pad(image_mask.int(), (1, 1)), dim=1).cpu()
    runs = []
    for row in edges:
        lengths = ((row == -1).nonzero() - (row == 1).nonzero()).flatten().tolist()
        runs.append([part for n in lengths for part in ([grid] * (n // grid) if grid and n % grid == 0 else [n])])
    return None if images is not None and sum(map(len, runs)) != images else runs


def _sample_keys(input_ids: torch.Tensor, valid: torch.Tensor) -> list[int]:
    """CRC-32 of each sample's unpadded ids (host copies)."""
    return [zlib.crc32(ids[ok].cpu().numpy().tobytes()) for ids, ok in zip(input_ids, valid)]


def _merged_additions(additions: torch.Tensor, image_index: torch.Tensor, image_valid: torch.Tensor, action: Replace) -> torch.Tensor:
    """[n, batch, k, d]: each new token's additions, the mean of its members' (as pooling and
    k-means average the hidden states), from `action.groups`."""
    if action.groups is None:
        raise VtcbenchError("a method that merges tokens must say which tokens each new one merged (Replace.groups) on a model with DeepStack features")
    n, _, _, width = additions.shape
    members = additions.gather(2, image_index[None, :, :, None].expand(n, -1, -1, width))
    k = action.hidden.shape[1]
    weights = torch.nn.functional.one_hot(action.groups.clamp(0, k - 1), k).to(additions.dtype) * image_valid[..., None]
    sums = torch.einsum("lbnd,bnk->lbkd", members, weights)
    return sums / weights.sum(dim=1).clamp(min=1)[None, :, :, None]


def _pad_right(flags: torch.Tensor, width: int) -> torch.Tensor:
    """Bool flags [batch, n] extended with False to `width` columns (the tokens after the prompt)."""
    return torch.nn.functional.pad(flags, (0, width - flags.shape[1]), value=False)


def _decode_columns(kept: torch.Tensor, prompt_length: int, total: int) -> torch.Tensor:
    """Columns [kept prompt tokens, every token after the prompt] of a mask of width `total`."""
    new = torch.arange(prompt_length, total, device=kept.device).expand(kept.shape[0], -1)
    return torch.cat([kept, new], dim=1)


@dataclass
class _ScoreLayer:
    """A score layer's input, kept until its action layer's method reads what it needs: the
    last prompt token's attention row (computed once), attention rows of other queries, or
    every token's rotated keys."""

    family: ModelFamily
    layer: nn.Module
    hidden: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    space: Space
    _attention: torch.Tensor | None = None

    def attention(self) -> torch.Tensor:
        """[batch, seq]: the last prompt token's head-averaged attention."""
        if self._attention is None:
            self._attention = self.attention_rows(self.space.query[:, None]).mean(dim=1)[:, 0]
        return self._attention

    def attention_rows(self, columns: torch.Tensor) -> torch.Tensor:
        """[batch, heads, m, seq]: the attention of the queries at `columns` [batch, m] over every
        key, per head: padding keys and keys after the query (causal; a teacher-forced answer
        after the last prompt token) masked."""
        positions = torch.arange(self.hidden.shape[1], device=self.hidden.device)
        visible = self.space.valid[:, None, :] & (positions <= columns[:, :, None])
        return attention_rows(self.family, self.layer, self.hidden, self.position_embeddings, columns, visible)

    def _tables(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's RoPE tables as `[batch, 1, seq, head_dim]` (as apply_rotary_pos_emb takes them)."""
        cos, sin = self.family.scoring_tables(self.layer, self.position_embeddings)
        return cos.expand(batch, -1, -1).unsqueeze(1), sin.expand(batch, -1, -1).unsqueeze(1)

    @torch.no_grad()
    def keys(self) -> torch.Tensor:
        """[batch, kv_heads, seq, head_dim]: every token's key after RoPE, as the layer's attention forms it."""
        _, key = self.family.query_key(self.layer, self.hidden, self.space.query)
        return self.family.apply_rope(key, *self._tables(key.shape[0]))

    @torch.no_grad()
    def rope_dot(self, columns: torch.Tensor) -> torch.Tensor:
        """[batch, m, seq]: RoPE(1) at `columns` . RoPE(1) at every position / sqrt(head_dim), the
        positional part of a q.k product of all-ones vectors (SparseVLM+'s gravity term)."""
        cos, sin = self._tables(columns.shape[0])
        rotated = self.family.apply_rope(torch.ones_like(cos), cos, sin)  # [batch, 1, seq, head_dim]
        index = columns[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])
        return (rotated.gather(2, index) @ rotated.transpose(-1, -2))[:, 0] / cos.shape[-1] ** 0.5


@torch.no_grad()
def query_attention(
    family: ModelFamily,
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query: torch.Tensor,
    visible: torch.Tensor,
    past_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q . K * scaling) of one query per sample (column `query` [batch]), averaged over
    heads, [batch, keys]; `attention_rows` for one row, `visible` [batch, keys]."""
    return attention_rows(family, layer, hidden, position_embeddings, query[:, None], visible[:, None], past_keys).mean(dim=1)[:, 0]


@torch.no_grad()
def attention_rows(
    family: ModelFamily,
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    columns: torch.Tensor,
    visible: torch.Tensor,
    past_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q . K * scaling) of the queries at `columns` [batch, m], per head, [batch, heads, m, keys].

    The rows eager attention would return, recomputed from the decoder layer's input `hidden`
    [batch, new, d] so any attention backend works: the family's norms and projections
    (`family.query_key`: the `columns` only, every key), its RoPE (`position_embeddings`: the
    tables the layer is handed for the new tokens), keys repeated for grouped-query heads, the
    attention's `scaling`. The keys are `past_keys` (a layer's KV cache, already rotated,
    [batch, kv_heads, cached, head_dim]) then the new tokens' own; `visible` [batch, m, cached + new]
    masks the rest.
    """
    q, key = family.query_key(layer, hidden, columns)
    cos, sin = (table.expand(hidden.shape[0], -1, -1).unsqueeze(1) for table in family.scoring_tables(layer, position_embeddings))
    index = columns[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])
    q = family.apply_rope(q, cos.gather(2, index), sin.gather(2, index))
    key = family.apply_rope(key, cos, sin)
    if past_keys is not None:
        key = torch.cat([past_keys.to(key.dtype), key], dim=-2)
    key = key.repeat_interleave(q.shape[1] // key.shape[1], dim=1)  # grouped-query heads (transformers' repeat_kv)
    logits = (q @ key.transpose(-1, -2)).float() * layer.self_attn.scaling  # [batch, heads, m, keys]
    return logits.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)
