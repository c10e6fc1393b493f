"""The one seam between vtcbench and transformers' calling conventions (docs/transformers-seam.md).

The engine works through forward pre-hooks, so it depends on how transformers calls a
model's modules, and those conventions move inside a major release: the KV cache was handed
over as `past_key_values` up to 5.23 and as `cache` from 5.24; the CLIP tower lost its
`vision_model` wrapper (and with it the key layout `save_pretrained` writes) between 5.5 and
5.23. Everything vtcbench assumes about these conventions lives here and is detected from what
is actually passed, never from version numbers. A call in a form this module does not know
stops with `TransformersConventionError`, which names the argument and this file: a count that
silently falls back to zero is worse than a crash. A future rename is a one-line change here.
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vtcbench.errors import VtcbenchError

#: names under which transformers hands the KV cache to a forward (and returns it): 5.0-5.23, 5.24+
CACHE_ARGUMENTS: tuple[str, ...] = ("past_key_values", "cache")


class TransformersConventionError(VtcbenchError):
    """transformers called a module in a form vtcbench does not know (a renamed argument, a new type)."""

    def __init__(self, what: str):
        import transformers

        super().__init__(
            f"transformers {transformers.__version__}: {what}; vtcbench does not know this calling convention "
            "(update vtcbench/transformers_seam.py, or install a transformers release within vtcbench's tested range)"
        )


# -- the KV cache ------------------------------------------------------------------------------------


def find_cache(kwargs: dict) -> Cache | None:
    """The KV cache a forward was given, under whichever known name; None if it was given none.

    A `Cache` under a name not in `CACHE_ARGUMENTS`, or a known name holding something that is
    not a `Cache`, is a convention we do not know: fail rather than treat the call as uncached.
    """
    for name in CACHE_ARGUMENTS:
        value = kwargs.get(name)
        if value is not None:
            if not isinstance(value, Cache):
                raise TransformersConventionError(f"the {name!r} argument is a {type(value).__name__}, not a Cache")
            return value
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            raise TransformersConventionError(f"the KV cache arrived as {name!r} (known: {', '.join(CACHE_ARGUMENTS)})")
    return None


def is_decode_step(kwargs: dict, input_ids: torch.Tensor | None) -> bool:
    """Whether a multimodal forward continues a prompt already in the cache (a decode step).

    `generate` passes a 2-D attention mask over the whole sequence so far; a mask wider than the
    new tokens without a cache that holds them is a decode step in a form we do not recognise.
    """
    cache = find_cache(kwargs)
    if cache is not None and cache.get_seq_length() > 0:
        return True
    mask = kwargs.get("attention_mask")
    if input_ids is not None and mask is not None and mask.ndim == 2 and mask.shape[1] > input_ids.shape[1]:
        known = ", ".join(sorted(k for k, v in kwargs.items() if v is not None))
        held = "an empty cache" if cache is not None else "no cache"
        raise TransformersConventionError(
            f"a forward of {input_ids.shape[1]} new tokens under a {mask.shape[1]}-column attention mask came with "
            f"{held} (arguments: {known})"
        )
    return False


def returned_cache(output) -> Cache:
    """The cache a forward with `use_cache=True` returned (`past_key_values` or `cache`)."""
    for name in CACHE_ARGUMENTS:
        value = getattr(output, name, None)
        if isinstance(value, Cache):
            return value
    raise TransformersConventionError(f"{type(output).__name__} carries no cache under {', '.join(CACHE_ARGUMENTS)}")


def cache_argument(model: nn.Module) -> str:
    """The name under which this model's `forward` (and `generate`) takes a KV cache."""
    parameters = inspect.signature(model.forward).parameters
    for name in reversed(CACHE_ARGUMENTS):  # the newest name first
        if name in parameters:
            return name
    raise TransformersConventionError(f"{type(model).__name__}.forward takes no cache under {', '.join(CACHE_ARGUMENTS)}")


def with_cache(kwargs: dict, cache: Cache) -> dict:
    """A layer's kwargs with `cache` in place of the cache it was handed (under the same name)."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return dict(kwargs, **{name: cache})
    raise TransformersConventionError(f"a decoder layer was handed no cache under {', '.join(CACHE_ARGUMENTS)}")


def cache_prefix(cache: Cache, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of the first `n_layers` layers, by reference (a cache's update replaces its
    tensors rather than writing into them, so these stay the prefill's)."""
    return [(layer.keys, layer.values) for layer in cache.layers[:n_layers]]


def branch_cache(config, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
    """A new cache for `config`'s model whose first layers hold `prefix`, by reference: a
    `DynamicLayer`'s update concatenates into new tensors and never writes into those it holds,
    so every branch shares the trunk's entries without a copy (the sweep would otherwise copy the
    prefix once per branch, a cost no separate run has). Other layer kinds (sliding windows, which
    count what they were given) are filled by their own update."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(prefix):
        layer = cache.layers[index] if index < len(cache.layers) else None
        if type(layer) is DynamicLayer:
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        else:
            cache.update(keys, values, index)
    return cache


def cache_layer_lengths(cache: Cache) -> list[int]:
    """Tokens each decoder layer's cache holds (they differ once a method drops tokens)."""
    return [0 if layer.keys is None else layer.keys.shape[-2] for layer in cache.layers]


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by keys and values over all layers."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def cache_layer_keys(cache: Cache, layer_index: int) -> torch.Tensor | None:
    """The keys decoder layer `layer_index` has cached, [batch, kv_heads, tokens, head_dim], or
    None while it holds none (a cache may create its layers lazily, at their first update).

    transformers caches keys after RoPE. Read in the layer's forward pre-hook, they are the
    tokens before the ones the layer is about to append. A cache whose keys tensor holds fewer
    tokens than it reports (quantized layers keep most of them elsewhere) is not read.
    """
    if layer_index >= len(cache.layers):
        return None
    layer = cache.layers[layer_index]
    keys, length = getattr(layer, "keys", None), layer.get_seq_length()
    if keys is None or length == 0:
        return None
    if keys.ndim != 4 or keys.shape[-2] < length:
        raise TransformersConventionError(
            f"{type(layer).__name__} reports {length} cached tokens but holds keys of shape {tuple(keys.shape)}"
        )
    return keys[..., :length, :]  # a static cache's preallocated tail is not a token


# -- how the language model and its layers are called --------------------------------------------------


def language_model_embeddings(kwargs: dict) -> torch.Tensor:
    """The input embeddings LLaVA hands its language model (image features already merged)."""
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        raise TransformersConventionError("the language model was called without inputs_embeds")
    return embeds


def hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's input hidden states (first positional argument, or the keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)


def layer_output(output) -> torch.Tensor:
    """A decoder layer's output hidden states (a tensor in 5.x; a tuple's first item before)."""
    return output[0] if isinstance(output, tuple) else output


def output_logits(model: nn.Module, language_model: nn.Module, hidden: torch.Tensor, last_only: bool) -> torch.Tensor:
    """What the model's forward makes of the last decoder layer's output: the final norm, then
    the LM head on every position (a plain forward) or on the last one (`generate`'s
    `logits_to_keep=1`), so a forward resumed at some layer ends exactly as a whole one does."""
    hidden = language_model.norm(hidden)
    return model.lm_head(hidden[:, -1:] if last_only else hidden)


def rope_tables(kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) tables the language model computes once and hands every layer."""
    tables = kwargs.get("position_embeddings")
    if tables is None:
        raise TransformersConventionError("a decoder layer was called without position_embeddings")
    return tables


def select_mask(mask: torch.Tensor | None, index: torch.Tensor, *, rows: bool) -> torch.Tensor | None:
    """Key columns `index` [batch, n] (and the same query rows, at prefill) of an attention mask.

    transformers hands layers a 2-D padding mask (flash attention), a 4-D additive or boolean
    mask [batch or 1, 1, queries, keys] (eager, sdpa), or None (sdpa without padding).
    """
    if mask is None:
        return None
    batch = index.shape[0]
    if mask.ndim == 2:
        return mask.expand(batch, -1).gather(1, index)
    if mask.ndim != 4:
        raise TransformersConventionError(f"an attention mask of shape {tuple(mask.shape)} (expected 2-D or 4-D)")
    mask = mask.expand(batch, *mask.shape[1:])
    heads = mask.shape[1]
    if rows:
        mask = mask.gather(2, index[:, None, :, None].expand(batch, heads, -1, mask.shape[3]))
    return mask.gather(3, index[:, None, None, :].expand(batch, heads, mask.shape[2], -1))


def images_in_inputs(kwargs: dict) -> int | None:
    """How many images a multimodal forward's inputs carry: one row of `pixel_values` each, or,
    where `generate` encoded them first (transformers >= 5.24: `mm_encoder_outputs`, no pixels),
    one entry of the encoded images' `pooler_output` each; None without either."""
    if kwargs.get("pixel_values") is not None:
        return int(kwargs["pixel_values"].shape[0])
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    features = getattr(encoded, "pooler_output", None)
    return len(features) if isinstance(features, (list, tuple)) else None


def image_features(multimodal: nn.Module, pixel_values: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Projected image features per image: `get_image_features` returns a tensor, a tuple of
    tensors, or (5.x) an output whose `pooler_output` holds them."""
    output = multimodal.get_image_features(pixel_values, **kwargs)
    output = getattr(output, "pooler_output", output)
    if isinstance(output, torch.Tensor):
        return list(output)
    if isinstance(output, (list, tuple)) and all(isinstance(item, torch.Tensor) for item in output):
        return list(output)
    raise TransformersConventionError(f"get_image_features returned a {type(output).__name__}")


# -- checkpoints -----------------------------------------------------------------------------------------

def hub_layout_state_dict(model: nn.Module, layout: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """The model's weights under the keys of its family's hub layout (`layout`: pairs of module
    prefix in this release and key prefix on the hub, first match wins).

    `save_pretrained` writes whatever layout the running release uses; 5.23 writes LLaVA's CLIP
    tower without `vision_model.`, which 5.5 does not read (it reports the keys unexpected and
    initialises the tower at random). The hub layout loads on every release.
    """
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        prefix = next((p for p in layout if name.startswith(p[0])), None)
        if prefix is None:
            raise TransformersConventionError(f"the weight {name!r} has no place in the hub checkpoint layout")
        state[prefix[1] + name[len(prefix[0]) :]] = tensor.detach().contiguous().clone()
    return state


def save_checkpoint(model: nn.Module, folder: Path) -> None:
    """`save_pretrained` (config, generation config), with the weights in the family's hub layout
    (as `save_pretrained` writes them for a family that gives none)."""
    from safetensors.torch import save_file

    from vtcbench.families import family_of

    folder = Path(folder)
    model.save_pretrained(folder)
    layout = family_of(model).checkpoint_layout()
    if layout is None:
        return
    for written in folder.glob("model*.safetensors*"):  # the weights (and a shard index, if any)
        written.unlink()
    save_file(hub_layout_state_dict(model, layout), str(folder / "model.safetensors"), metadata={"format": "pt"})


def check_loaded_keys(loading_info: dict, source: str) -> None:
    """Refuse a checkpoint whose keys this release did not map onto the model: its missing
    weights would be initialised at random and the model would answer nonsense."""
    problems = {kind: sorted(loading_info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {keys[0]})" for kind, keys in problems.items())
        raise TransformersConventionError(f"the checkpoint {source} does not fit the model: {detail}")


# -- masks for samples the engine pads inside a batch ------------------------------------------------------


def hide_keys(mask: torch.Tensor, hide: torch.Tensor) -> torch.Tensor:
    """`mask` with the key columns `hide` [batch, keys] masked: 0 in a 2-D padding mask (flash
    attention), False in a 4-D boolean one (sdpa), the dtype's minimum in a 4-D additive one (eager)."""
    if mask.ndim == 2:
        return mask.masked_fill(hide, 0)
    if mask.ndim != 4:
        raise TransformersConventionError(f"an attention mask of shape {tuple(mask.shape)} (expected 2-D or 4-D)")
    hide = hide[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~hide
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min)


def explicit_mask(attention: str, allowed: torch.Tensor) -> torch.Tensor:
    """The mask a layer takes for `allowed` [batch, queries, keys] where transformers passed none
    (sdpa's causal shortcut when nothing is padded): a 4-D boolean mask, or for flash attention
    (which applies causality itself) the 2-D padding mask of the keys the last query sees."""
    if attention == "flash_attention_2":
        return allowed[:, -1].long()
    return allowed[:, None]


# -- cache edits after prefill (VoCo-LLaMA) --------------------------------------------------------------


def keep_cache_entries(cache: Cache, index: torch.Tensor) -> Cache:
    """Keep only the token entries `index` (ascending sequence positions, [n]) in every layer of
    `cache`, in place: a compressed prompt's cache (VoCo-LLaMA keeps its VoCo tokens' entries).

    Works on the cache object, whichever argument name (`past_key_values` or `cache`) carried it.
    Only caches whose layers hold plain `keys`/`values` tensors of every token (DynamicCache) can
    be edited; a static, sliding-window or quantized layer is refused rather than cut wrongly.
    """
    for number, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.ndim != 4 or keys.shape[-2] != layer.get_seq_length():
            raise TransformersConventionError(
                f"layer {number} of a {type(cache).__name__} ({type(layer).__name__}) holds no editable keys tensor"
            )
        layer.keys = keys.index_select(-2, index.to(keys.device))
        layer.values = values.index_select(-2, index.to(values.device))
    return cache


# -- packed layers ---------------------------------------------------------------------------------

#: the attention implementation a packed call runs under: the layer's own, per sequence
PACKED_ATTENTION = "vtcbench_packed"
#: devices where packed calls run: where each sequence's result is checked to equal its own call's
#: bit for bit (MKL's products; a GPU's kernels may round a packed row's rows differently)
PACK_ON = ("cpu",)
#: the fewest rows (batch x tokens) a sequence's own call may have for it to be packed: MKL gives a
#: product's row the same bits whatever the other rows from 12 rows on (tests/test_sweep.py), while
#: some smaller counts take kernels that round differently
MIN_PACKED_ROWS = 12


@dataclass
class _Packing:
    implementation: str  # the model's attention implementation, which each sequence's slice runs
    queries: list[int]  # each sequence's new tokens
    masks: list  # each sequence's attention mask, as its own call would hand it
    keys: list[int] | None = None  # each sequence's keys (cached + new), set by `_PackedCache.update`


_PACKING: ContextVar[_Packing | None] = ContextVar("packing", default=None)


def _packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """The attention of a packed row ([batch, heads, tokens, head_dim]), each sequence's slice
    through the model's own implementation with that sequence's mask; transformers' output
    layout [batch, tokens, heads, head_dim]."""
    packing = _PACKING.get()
    if packing is None:
        raise TransformersConventionError(f"attention implementation {PACKED_ATTENTION!r} was called outside a packed layer")
    function = ALL_ATTENTION_FUNCTIONS[packing.implementation]
    keys = packing.keys or packing.queries
    outputs = [
        function(module, q, k, v, mask, **kwargs)[0]
        for q, k, v, mask in zip(query.split(packing.queries, dim=2), key.split(keys, dim=2), value.split(keys, dim=2), packing.masks)
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)


class _PackedCache:
    """The KV caches of a packed call's sequences, as the one cache its attention updates: each
    sequence's keys and values go to its own cache, which returns them after what it holds."""

    def __init__(self, caches: list[Cache], packing: _Packing):
        self.caches, self.packing = caches, packing

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self.packing.queries
        updated = [
            cache.update(k, v, layer_idx, *args, **kwargs)
            for cache, k, v in zip(self.caches, key.split(lengths, dim=-2), value.split(lengths, dim=-2))
        ]
        self.packing.keys = [k.shape[-2] for k, _ in updated]
        return torch.cat([k for k, _ in updated], dim=-2), torch.cat([v for _, v in updated], dim=-2)


def can_pack(layer: nn.Module, calls: list[tuple[tuple, dict]]) -> bool:
    """Whether `packed_layer` can run these calls of one decoder layer as one, each sequence
    getting what its own call gives to the bit: on a `PACK_ON` device, under SDPA (whose function
    a sequence's own call runs too; eager runs a per-model function, flash attention reads packed
    positions), with one batch size, `MIN_PACKED_ROWS` rows or more per call, RoPE tables handed
    in, and caches for all or none."""
    states = [hidden_states(args, kwargs) for args, kwargs in calls]
    if len(calls) < 2 or layer.self_attn.config._attn_implementation != "sdpa" or states[0].device.type not in PACK_ON:
        return False
    caches = [find_cache(kwargs) for _, kwargs in calls]
    return (
        len({h.shape[0] for h in states}) == 1
        and min(h.shape[0] * h.shape[1] for h in states) >= MIN_PACKED_ROWS
        and all(kwargs.get("position_embeddings") is not None for _, kwargs in calls)
        and len({cache is None for cache in caches}) == 1
    )


def packed_layer(layer: nn.Module, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """Several calls of one decoder layer (`can_pack`) as one, their sequences packed in one row:
    the norms, projections and MLP run on every sequence's tokens at once, the attention of each
    sequence on its own keys only (`_packed_attention`). Each call's output hidden states.

    A row of a matrix product does not depend on the other rows, so each sequence gets what its
    own call gives, as far as the kernels do not pick another method for another number of rows
    (`can_pack` packs only where they do not; `tests/test_sweep.py` holds it)."""
    states = [hidden_states(args, kwargs) for args, kwargs in calls]
    lengths = [h.shape[1] for h in states]
    first_args, first_kwargs = calls[0]
    cos = torch.cat([kwargs["position_embeddings"][0] for _, kwargs in calls], dim=-2)
    sin = torch.cat([kwargs["position_embeddings"][1] for _, kwargs in calls], dim=-2)
    config = layer.self_attn.config
    packing = _Packing(config._attn_implementation, lengths, [kwargs.get("attention_mask") for _, kwargs in calls])
    kwargs = dict(first_kwargs, attention_mask=None, position_embeddings=(cos, sin))
    if first_kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = torch.cat([kwargs_["position_ids"] for _, kwargs_ in calls], dim=-1)
    caches = [find_cache(kwargs_) for _, kwargs_ in calls]
    if caches[0] is not None:
        kwargs = with_cache(kwargs, _PackedCache(caches, packing))
    args, kwargs = with_hidden_states(first_args, kwargs, torch.cat(states, dim=1))
    token = _PACKING.set(packing)
    config._attn_implementation = PACKED_ATTENTION
    try:
        output = layer_output(layer(*args, **kwargs))
    finally:
        config._attn_implementation = packing.implementation
        _PACKING.reset(token)
    return list(output.split(lengths, dim=1))
