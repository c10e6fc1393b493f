"""Kinds of method (docs/architecture.md#the-method-protocol): what differs between where methods
act, owned by the kind (`Method.kind`) so that no caller switches on it.

A kind says which run options and families it can take, how the engine applies it (hooks,
prompt shortening, the prefill's check), how a prompt is written and batched for it, how a loaded
model answers prompts with it (`session`) and what `vtcbench profile` measures. Seven kinds:

- `NONE` (vanilla) and `IN_LLM` (drops and merges inside the language model): the engine's hooks
  around transformers' `generate`;
- `PRE_LLM` (pooling or fusing before the LLM): the engine also maps the projector's output and
  shortens each image's run of placeholders; it needs a fixed grid of image tokens, except for a
  selection per crop on LLaVA-NeXT's AnyRes crops (a layer-0 replacement, `PreLLMKind`);
- `QUESTION_PRE_LLM` (a pre-LLM selection conditioned on each prompt's question through the
  tower's text side, CDPruner): as `PRE_LLM`, with the question and the tower's patches;
- `ADAPTIVE_PRE_LLM` (a selection before the projector whose count depends on the image,
  PruMerge+): the prompt keeps its placeholders and a layer-0 action keeps each image's count;
- `PROJECTED_SELECTION` (a selection among each image's projected tokens, DivPrune): made by a
  layer-0 action on the language model's input, which holds exactly the projector's output, so
  it runs on every family, whatever each image's count;
- `CACHE` (VoCo-LLaMA): its own prompt and its compressed-cache generation (`vtcbench/voco.py`),
  outside the engine; it keeps no image tokens, so fidelity, kept indices and a timed training
  step under the engine do not apply.

The engine and every runtime module import the methods, so a kind reaches the code that runs it
(`vtcbench.generation`, the profilers) when called, not when imported.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.families import model_facts
from vtcbench.models import image_token_mask

if TYPE_CHECKING:
    from PIL import Image
    from torch import nn
    from torch.utils.hooks import RemovableHandle

    from vtcbench.engine import CompressionEngine
    from vtcbench.families import ModelFamily
    from vtcbench.generation import Session
    from vtcbench.methods.base import Method
    from vtcbench.profilers.session import ProfileRecord, Shape
    from vtcbench.profilers.voco import VocoProfile


@dataclass(frozen=True)
class MethodKind:
    """A kind whose methods run under the compression engine (vanilla and in-LLM methods as is)."""

    name: str  # shown by `vtcbench methods` ("acts"); the run folder records the method, not its kind
    #: acts inside the language model (its input included), where its work is part of the
    #: language model's cost and its tokens take positions by the method's policy
    in_llm: bool = False
    #: the tokens it keeps take positions by the method's `position_policy` (a layer action)
    positions: bool = False
    #: works on one fixed grid of image tokens per image (families that size each image refuse it)
    needs_fixed_grid: bool = False

    # -- before loading ------------------------------------------------------------------------
    def check_options(self, method: Method, *, fidelity: bool = False, keep_indices: int = 0, train: bool = False) -> None:
        """Refuse, in one line, a run option this kind cannot honour (`--fidelity`, `--keep-indices`,
        `profile --train`); under the engine every option applies, except `--keep-indices` for a
        selection before the LLM (the engine sees its tokens, not the patches they came from)."""
        if keep_indices and not method.records_kept_patches:
            raise VtcbenchError(
                f"--keep-indices: {method.name} selects before the LLM, whose hooks see the selected tokens, not the patches "
                "they came from; drop --keep-indices"
            )

    # -- the engine (vtcbench/engine.py) ----------------------------------------------------------
    def check_engine(self, method: Method) -> None:
        """Refuse to be applied by the engine's hooks."""

    def engine_hooks(self, engine: CompressionEngine) -> list[RemovableHandle]:
        """Hooks the engine adds, beyond the language model's, while it is entered."""
        return []

    def plan(self, engine: CompressionEngine) -> dict[int, int | None]:
        """The engine's layer actions: the method's own plan."""
        return engine.method.plan(engine.n_layers)

    def validation_counts(self, engine: CompressionEngine, n_image: list[int]) -> set[int]:
        """The visual-token counts a prefill's samples check the method's settings against."""
        return set(n_image)

    def prepare(self, engine: CompressionEngine, inputs: dict) -> dict:
        """The model inputs under this method (`engine.prepare`): unchanged for in-LLM methods."""
        return dict(inputs)

    def check_prefill(self, engine: CompressionEngine, image_mask: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
        """Refuse a prefill whose image tokens this kind cannot take."""

    # -- prompts and answers ---------------------------------------------------------------------
    def prompt(self, method: Method, family: ModelFamily, question: str, n_images: int, answer: str | None, system: str) -> str:
        """The prompt of one request (and its answer, for log-likelihoods): the family's own."""
        return family.prompt(question, n_images, answer, system=system)

    def batch_key(self, family: ModelFamily, images: list[Image.Image]) -> Hashable:
        """What requests batched together must share besides task and generation settings: the
        number of images on a fixed grid (a pre-LLM method shortens each image's run of tokens
        alike), else only whether there are images (the engine takes any counts)."""
        return len(images) if family.fixed_image_grid else bool(images)

    def session(self, model: nn.Module, processor: Any, method: Method) -> Session:
        """The method on a loaded model, answering batches of prompts: the engine around `generate`."""
        from vtcbench.generation import EngineSession

        return EngineSession(model, processor, method)

    def profile(
        self, model: nn.Module, name: str, method: Method, processor: Any, shape: Shape, *, warmup: int, iterations: int,
        min_seconds: float, train: bool,
    ) -> ProfileRecord | VocoProfile:
        """`vtcbench profile`: latency per phase, memory, energy and FLOPs on synthetic inputs of
        `shape` (`profilers/session.py`), with a timed training step when `train`."""
        from vtcbench.methods.base import get_method
        from vtcbench.profilers.session import profile

        return profile(model, name, method, shape, warmup=warmup, iterations=iterations, min_seconds=min_seconds,
                       train=train, vanilla=get_method("vanilla"))


@dataclass(frozen=True)
class PreLLMKind(MethodKind):
    """Methods that map the projector's output [images, n, d] to fewer tokens [images, n', d]
    (`Method.pre_llm`): the prompt then carries n' placeholders per image.

    On AnyRes crops (LLaVA-NeXT, methods that select per crop): the model's processor writes the
    prompt and packs the projected crops itself, so the prompt keeps its placeholders; the hooks
    select in each crop and lay the kept tokens out per image as the official code does
    (`engine.crop_tokens`, `family.crop_layout`), and a layer-0 action puts them in place of
    each image's tokens with compacted positions (`methods.base.crop_replacement`)."""

    needs_fixed_grid: bool = True

    def plan(self, engine: CompressionEngine) -> dict[int, int | None]:
        return {0: None} if _on_crops(engine) else {}

    def validation_counts(self, engine: CompressionEngine, n_image: list[int]) -> set[int]:
        """On crops: each crop's patches (the count per crop is the setting)."""
        return {engine.facts.image_tokens // engine.facts.vision_crops} if _on_crops(engine) else set(n_image)

    def engine_hooks(self, engine: CompressionEngine) -> list[RemovableHandle]:
        method = engine.method
        projector = engine.family.projector(engine.model)
        if _on_crops(engine):
            return [_image_sizes_hook(engine), *_tower_hooks(engine, projector)]

        def after_projector(module, args, output):
            with engine.overhead():
                return method.pre_llm(output)

        hooks = [projector.register_forward_hook(after_projector)]
        if method.reads_tower_cls:
            hooks += _tower_hooks(engine, projector)
        return hooks

    def prepare(self, engine: CompressionEngine, inputs: dict) -> dict:
        """Shrink each image's run of placeholder tokens to what the method outputs: pooling
        before the LLM makes the prompt itself shorter (on crops: unchanged, its `image_sizes`
        recorded, as `generate` may cut the crops before the model's own forward)."""
        if _on_crops(engine):
            engine.image_sizes = inputs.get("image_sizes")
            return dict(inputs)
        per_image = engine.facts.image_tokens
        kept = engine.method.pre_llm_tokens(per_image)
        input_ids = inputs["input_ids"]
        is_image = image_token_mask(input_ids, engine.image_token_id)
        rank_in_image = (is_image.cumsum(dim=1) - 1) % per_image
        keep = ~is_image | (rank_in_image < kept)
        counts = keep.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise VtcbenchError("every prompt in a batch must hold the same number of images")
        out = dict(inputs)
        for key in ("input_ids", "attention_mask", "labels"):
            if key in inputs and inputs[key] is not None:
                out[key] = inputs[key][keep].reshape(input_ids.shape[0], -1)
        return out

    def check_prefill(self, engine: CompressionEngine, image_mask: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
        """A prompt that still carries the full runs of placeholders was not prepared."""
        pooled = engine.method.pre_llm_tokens(engine.facts.image_tokens)
        if pixel_values is not None and not _on_crops(engine) and int(image_mask.sum()) != pixel_values.shape[0] * pooled:
            raise VtcbenchError(
                f"{engine.method.name} shortens the prompt to {pooled} image tokens per image; "
                "pass the inputs through engine.prepare(inputs) first"
            )


@dataclass(frozen=True)
class QuestionPreLLMKind(PreLLMKind):
    """Pre-LLM selections of the projected tokens conditioned on each prompt's question (CDPruner):
    the tower's feature-layer patches and the question go through the family's text side
    (`family.text_side`), and `Method.pre_llm_question(projected, patch_embeds, text_embeds)`
    keeps a fixed count per image, so the prompt is shortened as for any pre-LLM method. The
    images are matched to their prompts' questions by the prompt counts `prepare` records (a
    `generate` may encode the images before the model's own forward sees the prompt)."""

    def prepare(self, engine: CompressionEngine, inputs: dict) -> dict:
        is_image = image_token_mask(inputs["input_ids"], engine.image_token_id)
        if _on_crops(engine):  # each image's run is its own: count the runs
            from vtcbench.engine import count_image_runs

            engine.images_per_prompt = [len(runs) for runs in count_image_runs(is_image)]
        else:
            engine.images_per_prompt = (is_image.sum(dim=1) // engine.facts.image_tokens).tolist()
        return super().prepare(engine, inputs)

    def engine_hooks(self, engine: CompressionEngine) -> list[RemovableHandle]:
        from vtcbench import transformers_seam as seam

        family, method, model = engine.family, engine.method, engine.model
        layer, projector = family.tower_feature_layer(model), family.projector(model)
        side = family.text_side(model, method.clip)
        seen: dict[str, torch.Tensor] = {}
        crops = _on_crops(engine)

        def read_layer(module, args, output):
            seen["output"] = seam.layer_output(output)

        def after_projector(module, args, output):
            patches = seen.pop("output")[:, 1:]
            if patches.shape[:2] != output.shape[:2]:
                raise VtcbenchError(
                    f"{method.name}: the projector maps {tuple(output.shape[:2])} tokens, not the feature layer's patches "
                    f"{tuple(patches.shape[:2])} (a select strategy other than 'default'?)"
                )
            with engine.overhead():
                counts = engine.images_per_prompt
                per_image = [1] * output.shape[0]
                if crops:
                    per_image = [1 + rows * cols for rows, cols in family.crop_grids(model.config, _image_sizes(engine))]
                questions = [q for q, n in zip(_prompt_questions(engine, len(counts)), counts) for _ in range(n)]
                if len(questions) != len(per_image):
                    raise VtcbenchError(f"{method.name}: {len(per_image)} images reached the projector for prompts holding "
                                        f"{len(questions)}; pass the inputs through engine.prepare(inputs) first")
                texts = [side.embed_text(method.query(question)) for question in questions]
                slots = method.question_slots(output, side.embed_patches(patches), texts, per_image)
                kept = output.gather(1, slots.unsqueeze(-1).expand(-1, -1, output.shape[-1]))
                if not crops:
                    return kept
                tokens = kept.flatten(0, 1)  # on crops the model packs every patch; the kept ones go in at layer 0
                engine.crop_tokens = [tokens[order] for order in family.crop_layout(model.config, _image_sizes(engine), slots)]
                return None

        hooks = [layer.register_forward_hook(read_layer), projector.register_forward_hook(after_projector)]
        return [_image_sizes_hook(engine), *hooks] if crops else hooks


def _prompt_questions(engine: CompressionEngine, batch: int) -> list[str]:
    """The question of each of a batch's prompts (`engine.questions`, else `engine.QUESTIONS`), one line if none."""
    from vtcbench.engine import QUESTIONS

    questions = engine.questions if engine.questions is not None else [QUESTIONS.get()] * batch
    if len(questions) != batch or any(q is None for q in questions):
        raise VtcbenchError(
            f"{engine.method.name} scores the image against each prompt's question: give the engine one question per "
            "prompt (`engine.questions`, or `vtcbench.engine.QUESTIONS` around synthetic inputs)"
        )
    return questions


@dataclass(frozen=True)
class AdaptivePreLLMKind(MethodKind):
    """Methods that select, before the projector, a number of tokens that depends on the image
    (PruMerge+'s outliers of CLS attention). The prompt is written before the tower runs, so it
    keeps every placeholder: the projector maps each image's selection padded to the grid
    (`Method.pre_projector` gives the real tokens), and the engine's layer-0 action (the
    method's `plan`) keeps each image's real tokens with compacted positions, which computes
    what a prompt shortened per image computes."""

    needs_fixed_grid: bool = True

    def engine_hooks(self, engine: CompressionEngine) -> list[RemovableHandle]:
        return _tower_hooks(engine, engine.family.projector(engine.model))


def _tower_hooks(engine: CompressionEngine, projector: nn.Module) -> list[RemovableHandle]:
    """Read the tower's feature layer (its input and its output, CLS included) and hand the
    projector what the method selects from it (`Method.pre_projector`) instead of the patches;
    a per-image count goes to `engine.tower_kept` for the layer-0 action."""
    from vtcbench import transformers_seam as seam
    from vtcbench.methods.base import TowerFeatures

    family, method, model = engine.family, engine.method, engine.model
    layer = family.tower_feature_layer(model)
    seen: dict[str, torch.Tensor] = {}
    crops = _on_crops(engine)

    def read_layer(module, args, kwargs, output):
        seen["input"], seen["output"] = seam.hidden_states(args, kwargs), seam.layer_output(output)

    def before_projector(module, args):
        output, hidden = seen.pop("output"), seen.pop("input")
        if tuple(args[0].shape) != (output.shape[0], output.shape[1] - 1, output.shape[2]):
            raise VtcbenchError(
                f"{method.name}: the projector reads {tuple(args[0].shape)}, not the feature layer's patches "
                f"{tuple(output[:, 1:].shape)} (a select strategy other than 'default'?)"
            )
        with engine.overhead():
            tower = TowerFeatures(output, lambda: family.tower_cls_attention(layer, hidden),
                                  lambda: family.tower_cls_query_keys(family.tower_feature_layer(model, after=1), output))
            if crops:  # the model packs every crop's patches: the selection goes first, padded, its slots kept
                selected, seen["slots"] = method.select_patches(tower)
                selected = torch.cat([selected, selected.new_zeros(args[0].shape[0], args[0].shape[1] - selected.shape[1], selected.shape[2])], dim=1)
            else:
                selected = method.pre_projector(tower)
        if isinstance(selected, tuple):
            selected, engine.tower_kept = selected
        return (selected, *args[1:])

    def after_projector(module, args, output):
        slots = seen.pop("slots")
        with engine.overhead():
            tokens = output[:, : slots.shape[1]].flatten(0, 1)
            engine.crop_tokens = [tokens[order] for order in family.crop_layout(model.config, _image_sizes(engine), slots)]

    hooks = [layer.register_forward_hook(read_layer, with_kwargs=True), projector.register_forward_pre_hook(before_projector)]
    return hooks + [projector.register_forward_hook(after_projector)] if crops else hooks


def _on_crops(engine: CompressionEngine) -> bool:
    """Whether a per-crop selection runs on AnyRes crops (LLaVA-NeXT) rather than one fixed grid."""
    return engine.method.selects_per_crop and engine.family.anyres_crops


def _image_sizes(engine: CompressionEngine) -> torch.Tensor:
    """The crops' image sizes of the prefill under way, or one line saying how to give them."""
    if engine.image_sizes is None:
        raise VtcbenchError(f"{engine.method.name} selects in each AnyRes crop: pass the inputs, with their "
                            "image_sizes, through engine.prepare(inputs) first")
    return engine.image_sizes


def _image_sizes_hook(engine: CompressionEngine) -> RemovableHandle:
    """Record each prefill's `image_sizes` (the crops the model cuts each image into)."""

    def hook(module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            engine.image_sizes = kwargs.get("image_sizes")

    return engine.multimodal.register_forward_pre_hook(hook, with_kwargs=True)


@dataclass(frozen=True)
class CacheKind(MethodKind):
    """Methods that compress the image into the KV cache of their own tokens and answer from
    that cache (VoCo-LLaMA, `vtcbench/voco.py`): their own prompt, their own generation."""

    def check_options(self, method: Method, *, fidelity: bool = False, keep_indices: int = 0, train: bool = False) -> None:
        if train:
            raise VtcbenchError(
                f"--train: {method.name} trains with its masked single pass; time it with `vtcbench train --method {method.name}`"
            )
        if fidelity or keep_indices:
            raise VtcbenchError(
                f"{method.name} keeps no image tokens and answers from its own prompt; drop --fidelity and --keep-indices"
            )

    def check_engine(self, method: Method) -> None:
        raise VtcbenchError(
            f"{method.name} acts on the KV cache, not through the engine's hooks; "
            "generate with vtcbench.voco.generate (as `vtcbench run` and `generate` do)"
        )

    def prompt(self, method: Method, family: ModelFamily, question: str, n_images: int, answer: str | None, system: str) -> str:
        """The method's own single-image prompt (`Method.prompt`), the request's `<image>` removed."""
        if n_images != 1:
            raise VtcbenchError(f"{method.name} compresses one image per prompt; this request has {n_images}")
        prompt = method.prompt(question.replace("<image>", "").strip(), system)
        return prompt if answer is None else f"{prompt} {answer}"

    def batch_key(self, family: ModelFamily, images: list[Image.Image]) -> Hashable:
        """The image sizes: the compression pass takes one image-token count per batch."""
        return tuple(image.size for image in images)

    def session(self, model: nn.Module, processor: Any, method: Method) -> Session:
        """Compressed-cache generation, with a store of compressed images kept for the session."""
        from vtcbench.generation import CacheSession

        return CacheSession(model, processor, method)

    def profile(
        self, model: nn.Module, name: str, method: Method, processor: Any, shape: Shape, *, warmup: int, iterations: int,
        min_seconds: float, train: bool,
    ) -> VocoProfile:
        """Two questions about one image, the second answered from the compressed image the first
        stored (`profilers/voco.py`: the supplement's breakdown); `shape`'s text and new tokens."""
        from vtcbench.profilers.voco import VocoProfile, profile_voco

        # random weights have no trained VoCo token: the last vocabulary id stands in (timings do not depend on it)
        token = model_facts(model).vocab_size - 1 if processor is None else method.token_id(model, processor.tokenizer)
        return VocoProfile(profile_voco(model, name, method, voco_id=token, text_tokens=shape.text_tokens,
                                        new_tokens=shape.new_tokens, iterations=iterations, warmup=warmup))


NONE = MethodKind("none")
IN_LLM = MethodKind("in_llm", in_llm=True, positions=True)
PRE_LLM = PreLLMKind("pre_llm")
QUESTION_PRE_LLM = QuestionPreLLMKind("pre_llm")
ADAPTIVE_PRE_LLM = AdaptivePreLLMKind("pre_llm", positions=True)
#: the method's `plan` acts at layer 0 (`{0: None}`) and its `select` chooses per image
#: (`LayerContext.image_runs`); the prompt keeps every placeholder (any family's processor writes it)
PROJECTED_SELECTION = MethodKind("pre_llm", in_llm=True, positions=True)
CACHE = CacheKind("cache")
KINDS: tuple[MethodKind, ...] = (NONE, IN_LLM, PRE_LLM, QUESTION_PRE_LLM, ADAPTIVE_PRE_LLM, PROJECTED_SELECTION, CACHE)
