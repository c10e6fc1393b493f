"""Analytic FLOPs (docs/flops.md#conventions), instantly, from a method's plan and a model's config.

Units: multiply-accumulates, which the papers call "FLOPs" (PyramidDrop Eq. 2, LLaVolta,
ViCo): one decoder layer on n tokens costs 4nd^2 + 2n^2d + 3ndm (q, k, v, o projections;
QK^T and AV; the gated MLP's three matrices). The papers' convention counts the image tokens
only, summed over layers; we also count the full sequence (image + text) with grouped-query
projections (2nd^2 + 2nd*d_kv), the vision encoder, the projector, the LM head for the next
token, and the method's own scoring. Additions (pooling, softmax, norms) are not counted, as in
the papers and in matmul-based op counters.

Two conventions (`Convention`): "macs" (the default, above) and "flops", calflops' count as STF
reports it (section 4.2, Tables 2-5): 2 FLOPs per multiply-accumulate, the same parts. STF's 7.6
TFLOPs for LLaVA-1.5-7B on 576 tokens (1.9 on 144) is twice the image-token figure: its calflops
run counted the decoder on the visual tokens and not the vision tower, projector or LM head (each
would move the 576-token figure to 7.7 or above).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from vtcbench.errors import choices_error
from vtcbench.families import ModelFacts
from vtcbench.methods.base import Method
from vtcbench.methods.stf import STF, FusingMethod, default_feature_layers

TERA = 1e12
Convention = Literal["macs", "flops"]
CONVENTIONS: dict[str, int] = {"macs": 1, "flops": 2}  # operations counted per multiply-accumulate


def layer_macs(n: int, facts: ModelFacts, *, grouped_query: bool = True) -> int:
    """One decoder layer on n tokens. `grouped_query=False` is the papers' 4nd^2 (MHA) form."""
    d, m = facts.hidden_size, facts.intermediate_size
    d_kv = facts.n_kv_heads * facts.head_dim if grouped_query else d
    return 2 * n * d * d + 2 * n * d * d_kv + 2 * n * n * d + 3 * n * d * m


def vision_encoder_macs(facts: ModelFacts) -> int:
    """The vision tower on the facts' image, as its family counts it (CLIP: patch embedding plus
    every layer of every crop, as HF runs them all even when the features come from layer -2;
    Qwen: patch embedding, windowed and full-attention blocks, DeepStack mergers)."""
    return facts.vision_encoder_macs


def projector_macs(facts: ModelFacts) -> int:
    """The projector (LLaVA's two-layer MLP, Qwen's 2x2 merger) on every image token (a method
    that selects before the projector scales it by `Method.projector_tokens`)."""
    return facts.projector_macs


def fused_projector_macs(method: FusingMethod, facts: ModelFacts, n_image: int) -> int:
    """A trained fusing projector in place of LLaVA's: STF's MBTF on every patch (L*C -> 4C -> C;
    L from the model's feature layers, or for a single-layer LLaVA the method's rule from layer -2)
    and its fusion on the fused tokens (k^2*C/E -> 16C -> d); TokenConcat's k^2*C -> d -> d."""
    c, d = facts.vision_hidden_size, facts.hidden_size
    n_out = method.pre_llm_tokens(n_image)
    window = c * method.kernel**2 // method.fused_tokens
    if not isinstance(method, STF):
        return n_out * (window * d + d * d)
    layers = facts.projector_in // c
    if layers == 1:
        layers = len(method.feature_layers or default_feature_layers(facts.vision_n_layers, -2))
    return n_image * (layers * c * 4 * c + 4 * c * c) + n_out * (window * 16 * c + 16 * c * d)


def method_overhead_macs(
    method: Method, facts: ModelFacts, n_image: int, image_tokens_per_layer: list[int], text_tokens: int
) -> int:
    """The method's own cost: reading each score layer (`Method.score_layer_macs`: the last
    token's attention row, or DART's keys) and its selection (`Method.selection_macs`)."""
    total = 0
    for score_layer in (s for s in method.plan(facts.n_layers).values() if s is not None):
        # the score layer's input, before any action at that layer (PyramidDrop scores, then drops)
        entering = image_tokens_per_layer[score_layer - 1] if score_layer else method.pre_llm_tokens(n_image)
        total += method.score_layer_macs(facts, entering + text_tokens, text_tokens)
    # a selection per crop is costed by the method from one crop's patches, times the nominal crops
    per_crop = facts.image_tokens // facts.vision_crops if method.selects_per_crop else n_image
    return total + method.selection_macs(facts, per_crop, image_tokens_per_layer)


def _projected(method: Method, facts: ModelFacts, n_image: int) -> int:
    """Tokens the projector maps: on AnyRes crops every crop's patches, as the model packs them
    all (a per-crop selection hands it its selection padded), else `Method.projector_tokens`."""
    return n_image if method.selects_per_crop and facts.vision_crops > 1 else method.projector_tokens(n_image)


@dataclass(frozen=True)
class FlopsReport:
    model: str
    method: str
    convention: Convention  # "macs": tflops_* are 10^12 multiply-accumulates; "flops": 10^12 FLOPs (2 per MAC)
    params: dict
    n_layers: int
    image_tokens: int
    text_tokens: int
    image_tokens_per_layer: list[int]
    visual_token_total: int
    compression_ratio: float  # LLaVolta: N*L / sum of visual tokens over layers
    tflops_image: float  # papers' convention: image tokens only, MHA projections
    tflops_total: float  # decoder layers on image + text tokens, grouped-query-aware
    tflops_lm_head: float  # logits of the next token
    tflops_vision_encoder: float
    tflops_projector: float  # LLaVA's MLP, or a fusing method's trained projector (STF, TokenConcat)
    tflops_method_overhead: float
    #: the decoder on every token, the LM head and the method's work inside the decoder (what the
    #: op counter attributes to the language model; a pre-LLM selection is not part of it)
    tflops_language_model: float

    def to_dict(self) -> dict:
        return asdict(self)


def analytic_flops(
    method: Method,
    facts: ModelFacts,
    *,
    model: str,
    image_tokens: int | None = None,
    text_tokens: int = 64,
    convention: Convention = "macs",
    image_tokens_per_layer: list[float] | None = None,
) -> FlopsReport:
    """Every FLOPs figure of one method on one model shape (per sample, prefill), in `convention`;
    `image_tokens_per_layer`: the counts a run measured (a method whose count adapts to each
    image has no analytic plan), else the method's plan."""
    if convention not in CONVENTIONS:
        raise choices_error("FLOPs convention", convention, list(CONVENTIONS))
    n_image = facts.image_tokens if image_tokens is None else image_tokens
    if image_tokens_per_layer is None:
        # a selection per crop keeps its count in each of the nominal crops, whatever the prompt's
        # placeholders (LLaVA-NeXT's newline tokens among them)
        per_crop = method.selects_per_crop and facts.vision_crops > 1
        counts = method.image_tokens_per_layer(facts.image_tokens if per_crop else n_image, facts.n_layers, facts.vision_crops)
    else:
        counts = image_tokens_per_layer
    visual_total = sum(counts)
    tera = TERA / CONVENTIONS[convention]
    total = sum(layer_macs(n + text_tokens, facts) for n in counts) / tera
    lm_head = facts.hidden_size * facts.vocab_size / tera
    overhead = method_overhead_macs(method, facts, n_image, counts, text_tokens) / tera
    return FlopsReport(
        model=model,
        method=method.name,
        convention=convention,
        params={k: list(v) if isinstance(v, tuple) else v for k, v in method.params().items()},
        n_layers=facts.n_layers,
        image_tokens=n_image,
        text_tokens=text_tokens,
        image_tokens_per_layer=counts,
        visual_token_total=visual_total,
        compression_ratio=n_image * facts.n_layers / visual_total if visual_total else float("inf"),
        tflops_image=sum(layer_macs(n, facts, grouped_query=False) for n in counts) / tera,
        tflops_total=total,
        tflops_lm_head=lm_head,
        tflops_vision_encoder=vision_encoder_macs(facts) / tera,
        tflops_projector=(
            fused_projector_macs(method, facts, n_image) if isinstance(method, FusingMethod)
            else projector_macs(facts) * _projected(method, facts, n_image) // n_image
        ) / tera,
        tflops_method_overhead=overhead,
        tflops_language_model=total + lm_head + (overhead if method.kind.in_llm else 0),
    )
