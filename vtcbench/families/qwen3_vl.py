"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2.5-VL's layout with three differences.

Facts read from transformers 5.24 (`models/qwen3_vl/modeling_qwen3_vl.py`) and checked on 5.5:
- attention: per-head RMS norms `q_norm`/`k_norm` on the projected queries and keys, before RoPE;
- interleaved M-RoPE: the text rotary module interleaves the temporal, height and width
  frequencies (`recomposition_frequencies`) and returns ordinary `[batch, seq, head_dim]` tables;
- DeepStack: the vision tower also emits features from `deepstack_visual_indexes` of its blocks
  (each through its own merger); the text model adds the i-th to the hidden states at the visual
  positions after decoder layer i (`_deepstack_process`, inside its own loop). A method that drops
  or merges tokens before those layers would break that addition, so the engine takes it over
  (`take_layer_additions`): each surviving visual token gets its own features, and a pooled or
  merged token the mean of its members' (as its hidden state is their mean).
- vision tower: patch 16 (images resized to multiples of 32), a gated-free GELU MLP
  (`linear_fc1`/`linear_fc2`), full attention in every block, learned position embeddings.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from vtcbench.families.base import query_rows
from vtcbench.families.qwen2_vl import Qwen2VLFamily


class Qwen3VLFamily(Qwen2VLFamily):
    name: ClassVar[str] = "qwen3_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    description: ClassVar[str] = "Qwen3-VL: Qwen2.5-VL's layout with q/k norms, interleaved M-RoPE and DeepStack"
    decoder_name: ClassVar[str] = "Qwen3"

    def model_class(self, config: Any) -> type:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def _vision_widths(self, vision: Any) -> tuple[int, int, int]:
        return vision.hidden_size, vision.intermediate_size, 2

    def query_key(self, layer: nn.Module, hidden: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = layer.self_attn
        batch, length, _ = hidden.shape
        normed = layer.input_layernorm(hidden)
        head_dim = attention.head_dim
        picked = query_rows(normed, query)
        q = attention.q_norm(attention.q_proj(picked).view(batch, picked.shape[1], -1, head_dim)).transpose(1, 2)
        k = attention.k_norm(attention.k_proj(normed).view(batch, length, -1, head_dim)).transpose(1, 2)
        return q, k

    def layer_additions(self, config: Any) -> int:
        return len(config.vision_config.deepstack_visual_indexes)

    def take_layer_additions(self, kwargs: dict, embeds: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        """`deepstack_visual_embeds[i]` ([visual tokens, d], in the order of `visual_pos_masks`)
        scattered to a dense `[layers, batch, seq, d]`."""
        features, where = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        if features is None:
            return kwargs, None
        dense = embeds.new_zeros(len(features), *embeds.shape)
        mask = where.to(embeds.device)[None, ..., None].expand_as(dense)
        dense = dense.masked_scatter(mask, torch.stack([f.to(embeds.dtype) for f in features]))
        return dict(kwargs, deepstack_visual_embeds=None, visual_pos_masks=None), dense
