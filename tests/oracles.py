"""Independent oracles: run the decoder layers by hand on exactly the tokens a method keeps.

They share nothing with the engine: selections come from transformers' own eager attention
weights (or `avg_pool1d`), sequences are rebuilt explicitly, and every step reruns the whole
sequence without a cache. Batch size 1, no padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vtcbench.transformers_seam import image_features


@dataclass
class OraclePlan:
    """What to do at which layer: ('fastv', K, keep), ('pdrop', [(r, keep), ...]), ('llavolta', K, S)."""

    kind: str
    actions: dict[int, int]  # layer -> keep count (drop methods) or stride (llavolta)
    positions: str  # keep | compact | pooled
    fixed: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept image indices


def prompt_embeddings(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The language model's input embeddings with the image features merged (as LLaVA does)."""
    config = model.config
    embeds = model.get_input_embeddings()(input_ids)
    features = image_features(
        model.model,
        pixel_values,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    features = torch.cat(features).to(embeds.dtype)
    image_mask = (input_ids == config.image_token_index).unsqueeze(-1)
    return embeds.masked_scatter(image_mask, features)


def _causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def _attention_weights(layer, hidden, position_embeddings, mask) -> torch.Tensor:
    """Eager attention weights of `layer` on `hidden`, [heads, seq, seq] (model must be eager)."""
    _, weights = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden), position_embeddings=position_embeddings, attention_mask=mask
    )
    return weights[0]


@torch.no_grad()
def oracle_logits(
    model, embeds: torch.Tensor, is_image: torch.Tensor, plan: OraclePlan,
    positions: torch.Tensor | None = None, additions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [seq', vocab] of the sequence that survives `plan`; fills `plan.fixed` on first use.

    `positions` [rows, seq]: 1-D RoPE ids (default 0..seq-1), or M-RoPE rows as the model hands its
    text model (Qwen: the text row, then temporal, height, width). `additions` [n, seq, d]: what the
    model adds after its first n layers (Qwen3-VL's DeepStack); dropped with their tokens, averaged
    with the tokens LLaVolta pools."""
    lm = model.model.language_model
    hidden = embeds
    positions = torch.arange(embeds.shape[1])[None] if positions is None else positions
    rows = positions.shape[0]
    is_image = is_image.clone()

    def tables(hidden, positions):
        return lm.rotary_emb(hidden, positions[-3:, None] if rows > 1 else positions)

    def layer_positions(positions):  # what the text model hands its layers
        return positions[:1] if rows in (1, 4) else None

    for index, layer in enumerate(lm.layers):
        mask = _causal_mask(hidden.shape[1], hidden.dtype)
        pe = tables(hidden, positions)
        if plan.kind == "fastv" and index + 1 in plan.actions and index + 1 not in plan.fixed:
            weights = _attention_weights(layer, hidden, pe, mask)[:, -1].mean(0)
            image_scores = weights[is_image]
            plan.fixed[index + 1] = image_scores.topk(plan.actions[index + 1]).indices.sort().values
        if index in plan.actions:
            image_index = is_image.nonzero().flatten()
            if plan.kind == "llavolta":
                stride = plan.actions[index]
                pooled = F.avg_pool1d(hidden[0, image_index].T[None], stride, stride)[0].T
                pooled_pos = positions[:, image_index].double().reshape(rows, -1, stride).mean(-1).floor().long()
                first, last = image_index[0], image_index[-1] + 1
                hidden = torch.cat([hidden[:, :first], pooled[None], hidden[:, last:]], dim=1)
                positions = torch.cat([positions[:, :first], pooled_pos, positions[:, last:]], dim=1)
                is_image = torch.cat([is_image[:first], torch.ones(len(pooled), dtype=torch.bool), is_image[last:]])
                if additions is not None:
                    pooled_add = additions[:, image_index].reshape(additions.shape[0], -1, stride, additions.shape[-1]).mean(2)
                    additions = torch.cat([additions[:, :first], pooled_add, additions[:, last:]], dim=1)
            else:
                if index not in plan.fixed:  # pdrop: rank with this layer's own attention
                    weights = _attention_weights(layer, hidden, pe, mask)[:, -1].mean(0)
                    plan.fixed[index] = weights[is_image].topk(plan.actions[index]).indices.sort().values
                dropped = image_index[~torch.isin(torch.arange(len(image_index)), plan.fixed[index])]
                keep = ~torch.isin(torch.arange(hidden.shape[1]), dropped)
                hidden, positions, is_image = hidden[:, keep], positions[:, keep], is_image[keep]
                if additions is not None:
                    additions = additions[:, keep]
                if plan.positions == "compact" and rows == 1:  # M-RoPE has no compact form: ids kept
                    positions = torch.arange(hidden.shape[1])[None]
            mask = _causal_mask(hidden.shape[1], hidden.dtype)
            pe = tables(hidden, positions)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=pe, position_ids=layer_positions(positions))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if additions is not None and index < additions.shape[0]:
            hidden = hidden + additions[index][None]
    return model.lm_head(lm.norm(hidden))[0]


@torch.no_grad()
def oracle_greedy(model, input_ids, pixel_values, plan: OraclePlan, new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding that reruns the whole sequence each step, keep-set fixed at the first step."""
    embeds = prompt_embeddings(model, input_ids, pixel_values)
    is_image = (input_ids == model.config.image_token_index)[0]
    tokens, step_logits = [], []
    for _ in range(new_tokens):
        logits = oracle_logits(model, embeds, is_image, plan)[-1]
        token = int(logits.argmax())
        tokens.append(token)
        step_logits.append(logits)
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        is_image = torch.cat([is_image, torch.zeros(1, dtype=torch.bool)])
    return tokens, step_logits


@torch.no_grad()
def language_model_inputs(model, inputs: dict) -> dict:
    """What the multimodal model hands its language model for `inputs` (embeddings with the
    image features merged, position ids, DeepStack features), captured by a hook on one plain
    forward: the model's own code prepares them, the oracle only reads them."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def mrope_oracle_greedy(model, inputs: dict, image_token_id: int, plan: OraclePlan, new_tokens: int):
    """`oracle_greedy` for M-RoPE models: positions and DeepStack features as the model prepares
    them; a new token continues every position row at the last token's id + 1 (the prompt ends
    with text, whose rows are equal)."""
    captured = language_model_inputs(model, inputs)
    embeds, positions = captured["inputs_embeds"], captured["position_ids"][:, 0]
    is_image = (inputs["input_ids"] == image_token_id)[0]
    additions = None
    if captured.get("deepstack_visual_embeds") is not None:
        where = captured["visual_pos_masks"][0]
        additions = torch.zeros(len(captured["deepstack_visual_embeds"]), *embeds.shape[1:])
        for layer, features in enumerate(captured["deepstack_visual_embeds"]):
            additions[layer, where] = features
    tokens, step_logits = [], []
    for _ in range(new_tokens):
        logits = oracle_logits(model, embeds, is_image, plan, positions, additions)[-1]
        token = int(logits.argmax())
        tokens.append(token)
        step_logits.append(logits)
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        is_image = torch.cat([is_image, torch.zeros(1, dtype=torch.bool)])
        if additions is not None:
            additions = torch.cat([additions, additions.new_zeros(additions.shape[0], 1, additions.shape[-1])], dim=1)
    return tokens, step_logits
