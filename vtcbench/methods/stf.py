"""STF: Spatial Token Fusion with Multi-Block Token Fusion (Tang et al., "Learning Compact Vision
Tokens for Efficient Large Multimodal Models", sections 3.3-3.4, Fig. 2; official code
github.com/visresearch/LLaVA-STF, `llava/model/llava_arch.py` `encode_images` and
`split_image_features`, `llava/model/multimodal_projector/builder.py`).

A trained projector replaces LLaVA's:
- MBTF (section 3.3, the official `mm_projector_crosslayer`): the CLIP hidden states of several
  layers (the paper's -2, 21, 18, 15, 12, 9, 6, 3 of a 24-layer tower), CLS dropped, concatenated
  along channels (L*C) -> Linear 4C -> GELU -> Linear C (the paper's two 1x1 convolutions).
- STF (section 3.4, the official `mm_projector`): each k x k window of the patch grid concatenated
  into one token (the official `unfold`, channel order c*k^2 + dy*k + dx) -> Linear 16C -> GELU ->
  Linear d. With E fused tokens per window (Table 4), the k^2*C channels split into E tokens of
  k^2*C/E channels each, as the official `k_split_image_features` reshapes them.
The multi-layer selection is transformers' own: the LLaVA config's feature layer as a list makes
`get_image_features` concatenate those hidden states (CLS dropped) before the projector, so MBTF is
the config plus `vtcbench/projectors.py`. The prompt carries N*E/k^2 image tokens (engine `prepare`); `pre_llm`
is the identity, because the projector already fused.

Differences: the official code hard-codes 8 layers of a 24-layer tower; here the layer list is a
hyperparameter (`feature_layers`) whose default rule gives the paper's list for 24 layers and a
proportional one for shallower towers (`default_feature_layers`). The official builder fixes the
STF hidden width at 16C for E = 1; we keep 16C for every E.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of, model_facts
from vtcbench.methods.base import (
    Method,
    check_grid_kernel,
    check_positive,
    projector_method,
    register,
)
from vtcbench.methods.kinds import PRE_LLM, MethodKind

PAPER_FEATURE_LAYERS: tuple[int, ...] = (-2, 21, 18, 15, 12, 9, 6, 3)  # 24-layer CLIP ViT-L


def default_feature_layers(depth: int, own_layer: int) -> tuple[int, ...]:
    """The model's own feature layer, then every s-th hidden state from depth - s down to 1, with
    s = max(1, round(depth / 8)), the paper's spacing scaled to the depth: (-2, 21, 18, ..., 3) for
    24 layers and LLaVA's -2, (-2, 10, 8, 6, 4, 2) for 12, (-2, 2, 1) for vtc-tiny's 4 layers and -2
    (hidden-state index i is the output of layer i, 0 the patch embeddings; the own layer is not
    repeated)."""
    stride = max(1, round(depth / 8))
    own = own_layer % (depth + 1)
    return (own_layer, *(index for index in range(depth - stride, 0, -stride) if index != own))


class FusingMethod(Method):
    """A pre-LLM method whose trained projector fuses k x k windows (STF, TokenConcat)."""

    kind: ClassVar[MethodKind] = PRE_LLM
    budget_refusal: ClassVar[str] = "its kernel is the one its projector was trained with"
    kernel: int
    fused_tokens: int = 1

    def projector_spec(self) -> dict[str, Any]:
        return {"type": self.name, "kernel": self.kernel, "fused_tokens": self.fused_tokens}

    def validate_for(self, n_image: int, n_layers: int) -> None:
        check_grid_kernel(self.name, self.kernel, n_image)

    def pre_llm_tokens(self, n_image: int) -> int:
        return n_image * self.fused_tokens // self.kernel**2

    def prepare_training(self, model, processor) -> None:
        """Install this method's projector, from random weights (the paper trains it from scratch)."""
        from vtcbench.projectors import install_projector

        install_projector(model, self)

    def layers_for(self, config: Any) -> tuple[int, ...] | None:
        """The vision feature layers the projector reads (None: the model's own single layer)."""
        return None

    def check_model(self, model: Any) -> None:
        config = getattr(model, "config", model)
        if projector_method(config) != self.name:
            raise VtcbenchError(
                f"{self.name} needs a checkpoint with its trained projector ({self.needs_weights}); this model has "
                f"{projector_method(config) or 'a plain LLaVA projector'} (convert LLaVA-STF with `vtcbench convert-stf`, "
                f"or train one: vtcbench train --method {self.name} --init vtc-tiny)"
            )
        trained = {key: config.vtcbench_projector.get(key) for key in ("kernel", "fused_tokens")}
        asked = {"kernel": self.kernel, "fused_tokens": self.fused_tokens}
        if trained != asked:
            raise VtcbenchError(f"{self.name}: this checkpoint's projector was trained with {trained}; asked for {asked}")


@register
@dataclass
class STF(FusingMethod):
    """STF with MBTF (sections 3.3-3.4, Table 4; official code `visresearch/LLaVA-STF`,
    `llava/model/llava_arch.py`): a trained projector fuses k x k windows into E tokens each."""

    kernel: int = 2
    fused_tokens: int = 1
    feature_layers: tuple[int, ...] = ()  # MBTF's CLIP layers when training; () = `default_feature_layers`

    name: ClassVar[str] = "stf"
    description: ClassVar[str] = "trained MBTF (multi-layer CLIP features) + spatial token fusion of k x k windows before the LLM"
    needs_weights: ClassVar[str | None] = "the STF projector (MBTF + STF), e.g. LLaVA-STF converted by `vtcbench convert-stf`"

    def __post_init__(self) -> None:
        check_positive(self.name, "kernel", self.kernel)
        check_positive(self.name, "fused_tokens", self.fused_tokens)
        if (self.kernel * self.kernel) % self.fused_tokens:
            valid = ", ".join(str(e) for e in range(1, self.kernel**2 + 1) if self.kernel**2 % e == 0)
            raise VtcbenchError(f"{self.name}: fused_tokens={self.fused_tokens} does not divide kernel^2={self.kernel**2}; valid: {valid}")

    def layers_for(self, config: Any) -> tuple[int, ...]:
        """MBTF's hidden-state indices for a model (checked against its tower's depth)."""
        depth = model_facts(config).vision_n_layers
        layers = self.feature_layers or default_feature_layers(depth, family_of(config).feature_layers(config)[0])
        bad = [layer for layer in layers if not -depth - 1 <= layer <= depth]
        if bad:
            raise VtcbenchError(f"{self.name}: feature_layers {bad} outside the tower's hidden states; valid: {-depth - 1}..{depth}")
        return tuple(layers)

    def check_loaded(self, model: Any, processor: Any) -> None:
        """A converted LLaVA-STF model pads images to a square (`vtcbench_image_aspect_ratio: pad`,
        `families/llava.py` `converted_image_processor`); refuse a processor that would centre-crop them instead."""
        if getattr(model.config, "vtcbench_image_aspect_ratio", None) == "pad" and not getattr(
            getattr(processor, "image_processor", None), "do_pad", False
        ):
            raise VtcbenchError(
                f"{self.name}: this checkpoint pads images to a square (vtcbench_image_aspect_ratio: pad) but its "
                "processor does not (do_pad); reconvert it with `vtcbench convert-stf --overwrite`"
            )

    def check_model(self, model: Any) -> None:
        super().check_model(model)
        config = getattr(model, "config", model)
        trained = family_of(config).feature_layers(config)
        if self.feature_layers and list(self.feature_layers) != list(trained):
            raise VtcbenchError(
                f"{self.name}: feature_layers={','.join(map(str, self.feature_layers))} differ from this checkpoint's "
                f"MBTF layers {list(trained)}; omit the setting at inference"
            )
