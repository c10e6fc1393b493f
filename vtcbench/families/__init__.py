"""Model families, one file each (docs/architecture.md#model-families), and the lookups the rest
of vtcbench uses instead of naming a family's modules: `family_of(model or config)`,
`model_facts`, `language_model`, `decoder_layers`."""

from __future__ import annotations

from typing import Any

from torch import nn

from vtcbench.errors import choices_error
from vtcbench.families.base import ModelFacts, ModelFamily, TextSide, TextTowerFacts
from vtcbench.families.llava import LlavaFamily
from vtcbench.families.llava_next import LlavaNextFamily
from vtcbench.families.qwen2_vl import Qwen2VLFamily
from vtcbench.families.qwen3_vl import Qwen3VLFamily

FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (LlavaFamily(), LlavaNextFamily(), Qwen2VLFamily(), Qwen3VLFamily())
}
_BY_MODEL_TYPE: dict[str, ModelFamily] = {t: family for family in FAMILIES.values() for t in family.model_types}
MODEL_TYPES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)

__all__ = [
    "FAMILIES", "MODEL_TYPES", "ModelFacts", "ModelFamily", "TextSide", "TextTowerFacts", "decoder_layers", "family_of",
    "language_model", "model_facts",
]


def family_of(config_or_model: Any) -> ModelFamily:
    """The family of a model, its config, or a `model_type` string; one line listing the valid
    model types for anything else."""
    if isinstance(config_or_model, str):
        model_type = config_or_model
    else:
        config = config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model
        model_type = getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise choices_error("model family", model_type, MODEL_TYPES)
    return family


def model_facts(config_or_model: Any, image_size: tuple[int, int] | None = None) -> ModelFacts:
    """Facts from a config or a loaded model (its `.config`); no weights needed."""
    config = config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model
    return family_of(config).facts(config, image_size)


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (`layers`, `norm`, `rotary_emb`) of a model of any family."""
    return family_of(model).language_model(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's `ModuleList` of transformer blocks."""
    return language_model(model).layers
