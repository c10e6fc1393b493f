"""The method protocol (docs/architecture.md#the-method-protocol) and the registry of methods by name.

A method is a dataclass whose fields are its hyperparameters, validated in `__post_init__`
(model-independent ranges) and `validate_for` (ranges that depend on the model's depth and
visual-token count); `check_before_loading` runs every check a model's config allows, once,
before any weight loads. Its kind (`kind`, `kinds.py`) says where it acts and owns whatever
differs between kinds (how it runs, its prompt, the options it takes); it implements only that:

- in-LLM methods give `plan(n_layers) -> {action_layer: score_layer | None}` and
  `select(ctx) -> Keep | Replace`; the engine calls `select` at the start of each action layer
  with the layer's input and, when a score layer is named, the last prompt token's attention
  over the image tokens computed from that layer's input. Samples of one batch may hold
  different numbers of image tokens; `LayerContext` gives each sample's counts.
- pre-LLM methods give `pre_llm(image_features)` and `pre_llm_tokens(n_image)`.

Every method gives `image_tokens_per_layer(n_image, n_layers)`, the analytic plan that FLOPs
counting uses without a model; the engine records what it actually applied and tests compare.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from vtcbench.errors import VtcbenchError, choices_error
from vtcbench.families import ModelFacts, family_of, model_facts
from vtcbench.methods.kinds import IN_LLM, NONE, PRE_LLM, MethodKind

PositionPolicy = Literal["keep", "compact", "pooled"]
#: what each policy does on M-RoPE (Qwen-VL: temporal, height, width ids), where the engine keeps
#: every row of a token's ids; a compacted 3-D numbering has no meaning, so compact keeps the ids
MROPE_POSITIONS: dict[str, str] = {
    "keep": "original 3-D ids",
    "compact": "original 3-D ids (no compacted M-RoPE)",
    "pooled": "floor of the members' mean, per axis",
}


@dataclass(frozen=True)
class Keep:
    """Keep these image tokens: indices into the current image tokens, shape [batch, k], ascending.

    `counts` (per sample) says how many leading entries of each row are real when samples keep
    different numbers (the rest is filler the engine ignores); None: every entry of every row.
    """

    indices: torch.Tensor
    counts: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Replace:
    """Substitute the current image tokens with new ones (pooling, merging).

    `hidden` [batch, k, d] are the new tokens, `position_ids` [batch, k, rows] their RoPE positions
    (one row for 1-D RoPE, three for M-RoPE: temporal, height, width) and
    `anchors` [batch, k] (ascending indices into the current image tokens) a representative
    original token of each, which fixes its place in the sequence and its attention-mask column.
    `groups` [batch, n] says which new token (0..k-1) each current image token was merged into
    (for pictures of what was kept; the computation does not read it). `counts` as in `Keep`:
    per sample, the real leading entries of `hidden`, `position_ids` and `anchors`.
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    anchors: torch.Tensor
    groups: torch.Tensor | None = None
    counts: tuple[int, ...] | None = None


@dataclass
class LayerContext:
    """What a method sees at the start of an action layer (all tensors in the current sequence).

    Samples of a batch may hold different numbers of image tokens (LLaVA-NeXT's AnyRes gives each
    image its own count): `image_index` is padded to the largest, and sample b's own tokens are
    the first `n_image_per_sample[b]` of its row (`image_valid` marks them). A method keeps, per
    sample, what it would keep for that sample alone.
    """

    layer: int
    hidden_states: torch.Tensor  # [batch, seq, d], the layer's input
    image_index: torch.Tensor  # [batch, n] sequence indices of the current image tokens (rows padded)
    position_ids: torch.Tensor  # [batch, seq, rows]: one row for 1-D RoPE, the family's rows for M-RoPE
    n_image_per_sample: list[int]  # current image tokens of each sample
    n_image_original_per_sample: list[int]  # N0 of each sample: its image tokens before any compression
    n_layers: int
    keys_fn: Callable[[], list[int]]  # a stable per-sample key (hash of the prompt's token ids), on demand
    scores_fn: Callable[[], torch.Tensor] | None = None
    valid: torch.Tensor | None = None  # [batch, seq] bool: not padding
    query: torch.Tensor | None = None  # [batch]: the last prompt token's column
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None  # the language model's last norm
    #: the score layer's input, read on demand (vtcbench/engine.py `_ScoreLayer`): `keys()` (DART),
    #: `attention_rows(columns)` and `rope_dot(columns)` (SparseVLM's raters); None without one
    score_layer: Any = None
    index0: torch.Tensor | None = None  # [batch, seq]: each current column's column in the layer-0 sequence
    embeddings0: torch.Tensor | None = None  # [batch, seq0, d]: the language model's input embeddings
    #: [images, grid] bool, batch order: the real tokens of each image's run after a tower
    #: selection whose count depends on the image (`ADAPTIVE_PRE_LLM`); None otherwise
    tower_kept: torch.Tensor | None = None
    #: at layer 0, the engine's `image_runs` on demand (None after layer 0)
    runs_fn: Callable[[], list[list[int]] | None] | None = None
    #: at layer 0, a per-crop selection's tokens of each image (batch order) laid out as its
    #: official AnyRes code lays them out (`family.crop_layout`); None otherwise
    crop_tokens: list[torch.Tensor] | None = None
    _scores: torch.Tensor | None = field(default=None, repr=False)

    @property
    def image_runs(self) -> list[list[int]] | None:
        """At layer 0, per sample, each image's token count in order; None where two images'
        placeholders touch (or after layer 0)."""
        return None if self.runs_fn is None else self.runs_fn()

    @property
    def sample_keys(self) -> list[int]:
        """One key per sample, the same alone or in a batch (seeds random draws)."""
        return self.keys_fn()

    @property
    def n_image(self) -> int:
        """Image tokens per row of `image_index`: the largest sample's count."""
        return self.image_index.shape[1]

    @property
    def uniform(self) -> bool:
        """Whether every sample holds `n_image` image tokens (no row is padded)."""
        return all(n == self.n_image for n in self.n_image_per_sample)

    @property
    def image_valid(self) -> torch.Tensor:
        """[batch, n] bool: which entries of `image_index` are the sample's own image tokens."""
        counts = torch.tensor(self.n_image_per_sample, device=self.image_index.device)
        return torch.arange(self.n_image, device=counts.device) < counts[:, None]

    def keep_counts(self, count: Callable[[int, int], int]) -> list[int]:
        """Per sample, `count(n_current, n_original)`: what the method keeps of that sample alone."""
        return [count(n, n0) for n, n0 in zip(self.n_image_per_sample, self.n_image_original_per_sample)]

    @property
    def scores(self) -> torch.Tensor:
        """Head-averaged attention of the last prompt token to each image token, [batch, n]."""
        if self.scores_fn is None:
            raise RuntimeError(f"layer {self.layer}: the method's plan names no score layer")
        if self._scores is None:
            self._scores = self.scores_fn()
        return self._scores

    def score_keys(self) -> torch.Tensor:
        """The score layer's rotated keys of every token, [batch, kv_heads, seq, head_dim]."""
        if self.score_layer is None:
            raise RuntimeError(f"layer {self.layer}: the method's plan names no score layer")
        return self.score_layer.keys()

    def image_hidden(self) -> torch.Tensor:
        """Hidden states of the current image tokens, [batch, n, d]."""
        index = self.image_index.unsqueeze(-1).expand(-1, -1, self.hidden_states.shape[-1])
        return self.hidden_states.gather(1, index)

    def image_positions(self) -> torch.Tensor:
        """Position rows of the current image tokens, [batch, n, rows]."""
        index = self.image_index.unsqueeze(-1).expand(-1, -1, self.position_ids.shape[-1])
        return self.position_ids.gather(1, index)


@dataclass
class TowerFeatures:
    """What a method selecting before the projector sees of the vision tower's feature layer
    (the layer whose output the projector reads): its output with CLS first, and on demand CLS's
    attention row and every key, from that layer's own projections (`family.tower_cls_attention`)."""

    output: torch.Tensor  # [images, 1 + patches, width]: CLS, then the patches
    attention_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    #: the next tower layer's CLS query and keys of `output` at full width (`family.tower_cls_query_keys`)
    next_layer_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    _attention: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._attention is None:
            self._attention = self.attention_fn()
        return self._attention

    @property
    def cls_attention(self) -> torch.Tensor:
        """[images, heads, 1 + patches]: CLS's softmax attention over every token, per head."""
        return self._read()[0]

    @property
    def keys(self) -> torch.Tensor:
        """[images, heads, 1 + patches, head_dim]: the layer's keys."""
        return self._read()[1]

    def next_layer_cls_query_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([images, 1, width] CLS's query, [images, 1 + patches, width] keys): the next tower
        layer's projections of `output`, at full width."""
        if self.next_layer_fn is None:
            raise RuntimeError("no tower layer follows the feature layer")
        return self.next_layer_fn()


@dataclass
class Method:
    """Base of all methods. Subclasses are dataclasses registered with `@register`."""

    name: ClassVar[str]
    kind: ClassVar[MethodKind] = NONE  # where it acts, and how that runs (`kinds.py`)
    position_policy: ClassVar[PositionPolicy] = "keep"
    description: ClassVar[str] = ""
    trainable: ClassVar[bool] = True  # the engine's hooks keep gradients to the kept tokens
    #: reads the vision tower's CLS attention (`pre_projector`); families without CLS refuse it
    reads_tower_cls: ClassVar[bool] = False
    #: selects within each vision-tower crop, so that on LLaVA-NeXT's AnyRes crops it keeps its
    #: count per crop, laid out as its official code lays them out (`family.crop_layout`)
    selects_per_crop: ClassVar[bool] = False
    #: whether `--keep-indices` can record which patches it keeps: the engine's hooks see the
    #: language model's tokens, which for a selection before the LLM are not the grid's patches
    records_kept_patches: ClassVar[bool] = True
    #: scores image tokens against each prompt's question with the family's text side (CDPruner);
    #: families whose tower has no contrastive text tower refuse it
    reads_text_side: ClassVar[bool] = False
    #: the hyperparameters a budget chooses (`budget_candidates`), or () with the reason in
    #: `budget_refusal` (vtcbench/budgets.py)
    budget_knobs: ClassVar[tuple[str, ...]] = ()
    budget_refusal: ClassVar[str] = "it keeps every visual token"
    #: why the visual-token count depends on the image (PruMerge+), or None: its FLOPs then come
    #: from the counts a run records, not from `image_tokens_per_layer`
    adaptive: ClassVar[str | None] = None
    #: what a checkpoint must hold for this method (one line), or None for a training-free method;
    #: `check_model` refuses a model without it
    needs_weights: ClassVar[str | None] = None

    # -- trained weights ---------------------------------------------------------------------
    def check_model(self, model: Any) -> None:
        """Refuse a model (or its config) this method cannot run on, before any weights load.

        A training-free method runs on any model except one whose projector was trained for a
        method (`vtcbench_projector` in its config): that projector already fuses image tokens,
        so only its own method builds the matching prompt. Methods with `needs_weights` override
        this to check that the checkpoint holds what they need.
        """
        trained_for = projector_method(model)
        if trained_for is not None and trained_for != self.name:
            raise VtcbenchError(
                f"{self.name}: this model's projector was trained for {trained_for} (its image tokens are already "
                f"fused); run it with --method {trained_for}"
            )

    def check_loaded(self, model: Any, processor: Any) -> None:
        """Refuse a loaded checkpoint for what its config cannot show (voco: the tokenizer's
        token); runs before a run writes anything. Default: nothing more to check."""

    # -- in-LLM protocol -------------------------------------------------------------------
    def plan(self, n_layers: int) -> dict[int, int | None]:
        """{action layer: layer whose input gives the attention scores (or None)}."""
        return {}

    def select(self, ctx: LayerContext) -> Keep | Replace:
        raise TypeError(f"{self.name} does not act inside the language model")

    # -- pre-LLM protocol ------------------------------------------------------------------
    def pre_llm(self, image_features: torch.Tensor) -> torch.Tensor:
        """Map projector output [images, n, d] to [images, pre_llm_tokens(n), d]."""
        return image_features

    def pre_llm_tokens(self, n_image: int) -> int:
        return n_image

    def pre_projector(self, tower: TowerFeatures) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The projector's input from the tower's feature layer (methods with `reads_tower_cls`):
        [images, n', width] in place of the n patch features; a method keeping a count that
        depends on the image (`ADAPTIVE_PRE_LLM`) returns each image's selection padded to
        [images, n, width] and the [images, n] bool of its real tokens."""
        raise TypeError(f"{self.name} does not select inside the vision tower")

    # -- methods that change the prompt and the attention mask (voco) -------------------------
    def prompt(self, question: str, system: str) -> str | None:
        """The method's own single-turn prompt with one image, or None for the model's (vicuna_v1)."""
        return None

    def prepare_training(self, model, processor) -> None:
        """Adapt a model before training with this method (voco adds its token; STF and TokenConcat
        install their projector); default: nothing."""

    def training_inputs(self, model, tokenizer, inputs: dict) -> dict | None:
        """Inputs of a teacher-forced training forward that carries its own attention mask, or
        None to train under the compression engine."""
        return None

    # -- analytic plan and validation --------------------------------------------------------
    def image_tokens_per_layer(self, n_image: int, n_layers: int, crops: int = 1) -> list[int]:
        """Visual tokens entering each decoder layer, per image-bearing sample; a method that
        selects per crop (`selects_per_crop`) keeps its count in each of the image's `crops`
        crops of n_image / crops tokens (LLaVA-NeXT's nominal image: 5 of 576)."""
        crops = crops if self.selects_per_crop else 1
        self.validate_for(n_image // crops, n_layers)
        plan = self.plan(n_layers)
        counts, current = [], crops * self.pre_llm_tokens(n_image // crops)
        for layer in range(n_layers):
            if layer in plan:
                current = self.action_count(layer, current, n_image, n_layers)
            counts.append(current)
        return counts

    def action_count(self, layer: int, n_current: int, n_image_original: int, n_layers: int) -> int:
        """Image tokens left by this layer's action: what `select` returns, for FLOPs without a model."""
        raise NotImplementedError  # abstract: every in-LLM method defines it

    def score_layer_macs(self, facts: ModelFacts, n: int, text_tokens: int) -> int:
        """What reading a score layer of n tokens costs: the last token's attention row (q_proj
        on one token, k_proj on the sequence, q.K over heads)."""
        d = facts.hidden_size
        return d * d + n * d * facts.n_kv_heads * facts.head_dim + n * d

    def selection_macs(self, facts: ModelFacts, n_image: int, image_tokens_per_layer: list[int]) -> int:
        """The method's own work besides its score layers (matrix products only, as the op
        counter counts): k-means' distances, a pre-LLM selection's similarities. Default: none."""
        return 0

    def projector_tokens(self, n_image: int) -> int:
        """Tokens the projector maps (a method that selects before the projector maps fewer)."""
        return n_image

    def budget_values(self, n_image: int, n_layers: int) -> Iterable:
        """Every value of the one `budget_knobs` entry a budget chooses among (none by default)."""
        return ()

    def budget_candidates(self, n_image: int, n_layers: int) -> Iterator[Method]:
        """Every setting of `budget_knobs` (the other hyperparameters as they are), for a budget
        to choose among; settings a model cannot run are left to `validate_for` to reject. One
        knob: its `budget_values`; a method with several overrides this."""
        if not self.budget_knobs:
            return iter(())
        (knob,) = self.budget_knobs
        return (dataclasses.replace(self, **{knob: value}) for value in self.budget_values(n_image, n_layers))

    def validate_for(self, n_image: int, n_layers: int) -> None:
        """Check hyperparameters against a model's depth and visual-token count."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _check_layer(self, key: str, layer: int, n_layers: int, low: int = 0) -> None:
        if not low <= layer < n_layers:
            raise VtcbenchError(
                f"{self.name}: {key}={layer} is outside this model's decoder layers; "
                f"valid range: {low}..{n_layers - 1}"
            )


class ScoredDrop(Method):
    """Drop image tokens by a per-token score: top-k per sample, original order kept (kvpress's
    ScorerPress analogue). Subclasses give the schedule (`plan`, `action_count`) and the score."""

    kind: ClassVar[MethodKind] = IN_LLM

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.scores

    def select(self, ctx: LayerContext) -> Keep:
        ks = ctx.keep_counts(lambda n, n0: self.action_count(ctx.layer, n, n0, ctx.n_layers))
        scores = self.score(ctx)
        if ctx.uniform and len(set(ks)) == 1:
            top = scores.topk(ks[0], dim=-1, sorted=False).indices
            return Keep(top.sort(dim=-1).values)
        # per sample: its own top k_b among its own tokens (padding scores -inf), ascending, then filler
        top = scores.masked_fill(~ctx.image_valid, float("-inf")).topk(max(ks), dim=-1).indices
        real = torch.arange(top.shape[1], device=top.device) < torch.tensor(ks, device=top.device)[:, None]
        indices = torch.where(real, top, ctx.n_image).sort(dim=-1).values
        return Keep(torch.where(real, indices, 0), counts=tuple(ks))


class TowerSelection(Method):
    """Select (and merge) the tower's feature-layer tokens from CLS's attention, before the
    projector (VisionZip, VisPruner): the projector maps only what is kept, and the prompt is
    shortened to it; on LLaVA-NeXT each crop is selected alone and the kept tokens replace each
    image's tokens at the language model's input, laid out as the official code lays them out.
    Subclasses give `select_patches` and `pre_llm_tokens`."""

    kind: ClassVar[MethodKind] = PRE_LLM
    reads_tower_cls: ClassVar[bool] = True
    trainable: ClassVar[bool] = False  # the selection reads the tower under no_grad hooks
    records_kept_patches: ClassVar[bool] = False
    selects_per_crop: ClassVar[bool] = True
    position_policy: ClassVar[PositionPolicy] = "compact"  # (on crops) as the shortened prompt

    def select_patches(self, tower: TowerFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """([crops, T, width] the projector's input, [crops, T] the patch each token came from:
        -1 for CLS, -2 for a merged token)."""
        raise NotImplementedError  # abstract

    def pre_projector(self, tower: TowerFeatures) -> torch.Tensor:
        return self.select_patches(tower)[0]

    def select(self, ctx: LayerContext) -> Replace:
        return crop_replacement(ctx)

    def pre_llm(self, image_features: torch.Tensor) -> torch.Tensor:
        return image_features  # the selection happened before the projector

    def projector_tokens(self, n_image: int) -> int:
        return self.pre_llm_tokens(n_image)

    def cls_row_macs(self, facts: ModelFacts) -> int:
        """CLS's query, the feature layer's keys and CLS's attention row."""
        n, c = facts.vision_n_tokens, facts.vision_hidden_size
        return c * c + n * c * c + n * c


def crop_replacement(ctx: LayerContext) -> Replace:
    """Layer 0 on AnyRes crops: each sample's image tokens replaced by its images' laid-out
    selections (`ctx.crop_tokens`), in the first slots of its run, positions compacted after."""
    if ctx.image_runs is None:
        raise VtcbenchError("a per-crop selection lays out each image alone, and two images' placeholders touch in this "
                            "batch's prompts; separate them with text")
    if ctx.crop_tokens is None:
        raise RuntimeError("the tower hooks recorded no per-crop selection before the language model")
    images = iter(ctx.crop_tokens)
    rows = [torch.cat([next(images) for _ in runs]) for runs in ctx.image_runs]
    counts = [len(row) for row in rows]
    for count, runs in zip(counts, ctx.image_runs):
        if count > sum(runs):
            raise VtcbenchError(
                f"the per-crop selection keeps {count} tokens of images whose prompt holds {sum(runs)} placeholders "
                "(unpadding removed the rest); keep fewer tokens per crop"
            )
    width = max(counts)
    anchors = torch.arange(width, device=ctx.image_index.device).expand(len(rows), -1)
    hidden = torch.stack([torch.nn.functional.pad(row, (0, 0, 0, width - len(row))) for row in rows])
    positions = ctx.image_positions()[:, :width]
    return Replace(hidden.to(ctx.hidden_states.dtype), positions, anchors, counts=None if len(set(counts)) == 1 else tuple(counts))


# -- trained-weights helpers ---------------------------------------------------------------------


def projector_method(model: Any) -> str | None:
    """The method a model's projector was trained for (config `vtcbench_projector["type"]`), or None."""
    config = getattr(model, "config", model)
    projector = getattr(config, "vtcbench_projector", None)
    return projector.get("type") if isinstance(projector, dict) else None


# -- the checks before loading -------------------------------------------------------------------


def check_before_loading(
    method: Method, config: Any, *, fidelity: bool = False, keep_indices: int = 0, train: bool = False
) -> ModelFacts:
    """Every refusal a model's config allows, in one place and once per run, before any weight
    loads or anything is written (`run`, `generate`, `profile`): the family runs the method, its
    kind takes the run options, the checkpoint holds the weights it needs, its hyperparameters fit
    the model's depth and visual tokens. Returns the model's facts."""
    family_of(config).check_method(method)
    if train and not method.trainable:
        trainable = ", ".join(name for name, cls in sorted(METHODS.items()) if cls.trainable)
        raise VtcbenchError(
            f"--train: {method.name} cannot be trained (its selection has no gradient path); trainable: {trainable}"
        )
    method.kind.check_options(method, fidelity=fidelity, keep_indices=keep_indices, train=train)
    method.check_model(config)
    facts = model_facts(config)
    method.validate_for(facts.image_tokens // (facts.vision_crops if method.selects_per_crop else 1), facts.n_layers)
    return facts


# -- validation helpers --------------------------------------------------------------------------


def check_ratio(method: str, key: str, value: float, *, low_open: bool = False, high_closed: bool = False) -> None:
    """Ratios live in [0, 1) by default (a drop ratio of 1 would remove every image token)."""
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value <= 1 if high_closed else value < 1
    if not (low_ok and high_ok):
        valid = f"{'(' if low_open else '['}0, 1{']' if high_closed else ')'}"
        raise VtcbenchError(f"{method}: {key}={value} is out of range; valid range: {valid}")


def check_grid_kernel(method: str, kernel: int, n_image: int) -> None:
    """A k x k window must tile the square grid of `n_image` tokens (spatial pooling and fusion)."""
    side = math.isqrt(n_image)
    if side * side != n_image or side % kernel:
        divisors = [d for d in range(1, side + 1) if side % d == 0] if side * side == n_image else []
        valid = ", ".join(map(str, divisors)) or "none (the image tokens do not form a square grid)"
        raise VtcbenchError(f"{method}: kernel={kernel} does not tile the {n_image} image tokens; valid kernels: {valid}")


def check_positive(method: str, key: str, value: int) -> None:
    if value < 1:
        raise VtcbenchError(f"{method}: {key}={value} is out of range; valid: an integer >= 1")


# -- registry ----------------------------------------------------------------------------------------

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise choices_error("method", name, list(METHODS))
    return METHODS[name]


def get_method(name: str, **params: Any) -> Method:
    """Build a method by name; `params` may be typed values or the CLI's strings."""
    cls = method_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in params:
        if key not in fields:
            valid = ", ".join(fields) or "(this method has no hyperparameters)"
            raise VtcbenchError(f"{name}: unknown hyperparameter {key!r}; valid: {valid}")
    hints = typing.get_type_hints(cls)
    typed = {key: _coerce(name, key, value, hints[key]) for key, value in params.items()}
    return cls(**typed)


def parse_set_options(options: list[str]) -> dict[str, str]:
    """Parse repeated `--set key=value` options into a dict of strings."""
    parsed: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise VtcbenchError(f"--set {option!r} is not of the form key=value (e.g. --set layer=2)")
        parsed[key.strip()] = value.strip()
    return parsed


def _coerce(method: str, key: str, value: Any, hint: Any) -> Any:
    if not isinstance(value, str):
        return tuple(value) if typing.get_origin(hint) is tuple else value
    try:
        if typing.get_origin(hint) is tuple:
            (item, *_) = typing.get_args(hint)
            return tuple(item(v) for v in value.split(",") if v.strip())
        if hint is bool:
            if value.lower() not in {"true", "false", "1", "0"}:
                raise ValueError(value)
            return value.lower() in {"true", "1"}
        if isinstance(hint, type):
            return hint(value)
        if isinstance(hint, types.UnionType):
            return next(t(value) for t in typing.get_args(hint) if t is not type(None))
    except ValueError:
        pass
    kind = getattr(hint, "__name__", str(hint))
    raise VtcbenchError(f"{method}: {key}={value!r} is not a valid {kind}")
