"""The trained projectors of the fusing methods (STF's MBTF + STF, TokenConcat), which replace a
LLaVA model's MLP projector; `models.load_model` builds one for a folder marked
`vtcbench_projector`, and training installs one (`install_projector`). Specified in
`methods/stf.py` (the methods) and docs/methods.md."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of, model_facts


def unfold_tokens(features: torch.Tensor, kernel: int, fused_tokens: int = 1) -> torch.Tensor:
    """[images, n, c] on a square grid -> [images, n*E/k^2, k^2*c/E]: each k x k window's tokens
    concatenated with channel index c*k^2 + dy*k + dx (`Tensor.unfold`'s order, as the official
    `split_image_features`), then split into E tokens of consecutive channels."""
    images, n, channels = features.shape
    side = math.isqrt(n)
    grid = features.reshape(images, side, side, channels).unfold(1, kernel, kernel).unfold(2, kernel, kernel)
    windows = grid.reshape(images, (side // kernel) ** 2, channels * kernel * kernel)
    return windows.reshape(images, -1, channels * kernel * kernel // fused_tokens)


class STFProjector(nn.Module):
    """MBTF then STF, in place of LLaVA's projector: [images, n, L*C] -> [images, n*E/k^2, d]."""

    def __init__(self, vision_hidden: int, text_hidden: int, n_feature_layers: int, kernel: int, fused_tokens: int):
        super().__init__()
        c = vision_hidden
        self.kernel, self.fused_tokens = kernel, fused_tokens
        self.mbtf = nn.Sequential(nn.Linear(n_feature_layers * c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.stf = nn.Sequential(nn.Linear(kernel * kernel * c // fused_tokens, 16 * c), nn.GELU(), nn.Linear(16 * c, text_hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.stf(unfold_tokens(self.mbtf(features), self.kernel, self.fused_tokens))


class ConcatProjector(nn.Module):
    """TokenConcat (STF Table 5): k x k windows concatenated, then LLaVA's two-layer GELU MLP from
    k^2*C: [images, n, C] -> [images, n/k^2, d]."""

    def __init__(self, vision_hidden: int, text_hidden: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.fuse = nn.Sequential(nn.Linear(kernel * kernel * vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fuse(unfold_tokens(features, self.kernel))


def build_projector(config: Any) -> nn.Module:
    """The projector a config's `vtcbench_projector` names (random weights), sized from the config."""
    spec = config.vtcbench_projector
    facts = model_facts(config)
    vision, text = facts.vision_hidden_size, facts.hidden_size
    if spec["type"] == "stf":
        n_layers = len(family_of(config).feature_layers(config))
        return STFProjector(vision, text, n_layers, spec["kernel"], spec["fused_tokens"])
    if spec["type"] == "tokenconcat":
        return ConcatProjector(vision, text, spec["kernel"])
    raise VtcbenchError(f"unknown vtcbench_projector type {spec['type']!r}; valid: stf, tokenconcat")


def install_projector(model: nn.Module, method: Any) -> None:
    """Give a model (fresh, randomly initialised) the projector a fusing method was trained with:
    the config records it (`vtcbench_projector`, and for STF the MBTF feature layers), and the
    family's projector is replaced. Training starts from this."""
    config, family = model.config, family_of(model)
    layers = method.layers_for(config)
    config.vtcbench_projector = method.projector_spec()
    if layers is not None:
        family.set_feature_layers(config, layers)
    weight = next(family.projector(model).parameters())
    family.set_projector(model, build_projector(config).to(device=weight.device, dtype=weight.dtype))
