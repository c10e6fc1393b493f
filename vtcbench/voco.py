"""VoCo-LLaMA's mechanics (docs/methods.md#voco): prompt layout, attention mask, cache compression,
and a store of compressed images reused across questions.

Read from the official code (Yxxxb/VoCo-LLaMA), which only masks:
- Prompt (`llava/eval/model_vqa_loader.py`): `<image>\\n` + `<voco>` x K + `\\n` + the conversation
  prompt with its `<image>` removed; the tokenizer prepends BOS, so the sequence is BOS, image
  tokens, separator, K VoCo tokens, then the system prompt and the question.
- Mask (`llava/model/language_model/llava_llama_1stg.py`, `make_voco_mask_llava`, applied in
  `LlamaModel.forward` on top of the causal mask): a query at or before the LAST VoCo token sees
  every key at or before the last VoCo token (so, causally, the VoCo tokens see BOS, the image and
  the separator); a query after the last VoCo token sees only keys at or after the FIRST VoCo
  token: neither BOS, nor the image, nor the separator before the VoCo tokens. Padding stays masked.
- Positions (`prepare_inputs_for_generation_llama`: `attention_mask.cumsum(-1) - 1`): one running
  count over the whole prompt, image tokens included; compression does not renumber the text.
- No cache cut: the evaluation calls `model.generate(..., use_cache=True)` on the whole prompt, so
  every KV entry (BOS, image, separator, VoCo tokens, text) stays and the mask alone hides the image
  from the text. As released its decode does not run: for a one-token step the sdpa mask helper it
  installs over transformers' (`cache_py/modeling_attn_mask_utils.py`) returns None, and
  `LlamaModel.forward` then reads `attention_mask.dtype`.

From the paper: the supplement times two forward passes and caches the VoCo tokens' activations
(section 2.3.1: "In such cases, it is possible to cache the VoCo tokens obtained from the first
request."; 2.3.2: "However, when we cache images, we only need to consider the second forward time.").

Two equivalent forms here:
(a) `single_pass_logits` / `single_pass_generate`: the whole prompt in one forward under the mask
    (the official code's forward, in training and in its evaluation's prefill; the reference);
(b) `generate`: a first forward over [BOS, image, separator, VoCo tokens]; every layer's cache
    then keeps only the VoCo tokens' entries (`transformers_seam.keep_cache_entries`); the text
    and the answer run against that compressed cache with the positions of (a). This cut is
    vtcbench's own, the paper's caching of the VoCo tokens, not the official code's: text tokens
    never see what (a) masks from them, so the logits agree. `VocoCache` keeps the compressed
    entries per image (keyed by a hash of the pixels and the prefix ids) so a second question
    about the same image skips the image encoder and the first forward (supplement 2.3.1).

Differences from the official code: the cache cut of (b) (the official code keeps every entry and
only masks); the mask is applied under eager and sdpa alike (the official `LlamaModel.forward`
builds it in its sdpa branch only); the system sentence is the model's own, where the official
`voco_conv_vicuna_v1` (`llava/conversation.py`) begins "A chat between a curious user and an
artificial intelligence assistant of the image." (the supplement's Listing 1 prints "A chat between
a curious user and an artificial intelligence assistant of the given image."); flash_attention_2 is
refused (it takes no 4-D mask).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from vtcbench import transformers_seam as seam
from vtcbench.errors import VtcbenchError
from vtcbench.families import FAMILIES

VOCO_TOKEN = "<voco>"  # the official code's token string (model_vqa_loader.py); id 32000 after LLaMA's vocabulary
MASK_ATTENTION = ("eager", "sdpa")  # backends that take a custom 4-D additive mask


# -- vocabulary and prompt -------------------------------------------------------------------------------


def voco_token_id(tokenizer, model: nn.Module | None = None) -> int:
    """The VoCo token's id in this checkpoint, or a one-line refusal: without a trained VoCo token
    the compression has nothing to compress into."""
    token_id = tokenizer.convert_tokens_to_ids(VOCO_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise VtcbenchError(
            f"voco: the checkpoint's tokenizer has no {VOCO_TOKEN!r} token (VoCo-LLaMA's compression token); "
            "use a VoCo-trained checkpoint, e.g. one from `vtcbench train --method voco --init vtc-tiny`"
        )
    if model is not None and token_id >= model.get_input_embeddings().num_embeddings:
        raise VtcbenchError(
            f"voco: the tokenizer's {VOCO_TOKEN!r} (id {token_id}) is beyond the model's "
            f"{model.get_input_embeddings().num_embeddings} embeddings; the checkpoint was not resized for it"
        )
    return token_id


def add_voco_token(model: nn.Module, processor) -> int:
    """Add the VoCo token to the tokenizer and one embedding row to the model (training a VoCo
    model from a LLaVA, as the official train.py adds it before fine-tuning); returns its id."""
    from tokenizers import AddedToken

    tokenizer = processor.tokenizer
    if tokenizer.convert_tokens_to_ids(VOCO_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens([AddedToken(VOCO_TOKEN, special=True, normalized=False)])
    token_id = tokenizer.convert_tokens_to_ids(VOCO_TOKEN)
    if token_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(token_id + 1)
    return token_id


def voco_prompt(question: str, voco_tokens: int, system: str) -> str:
    """`<image>\\n<voco>...\\n` then the vicuna_v1 prompt without its image (the official layout)."""
    return f"<image>\n{VOCO_TOKEN * voco_tokens}\n" + FAMILIES["llava"].prompt(question, 0, system=system)


def check_attention(model: nn.Module) -> None:
    attention = model.config._attn_implementation
    if attention not in MASK_ATTENTION:
        raise VtcbenchError(
            f"voco: attention backend {attention!r} takes no custom 4-D mask; valid: {', '.join(MASK_ATTENTION)}"
        )


# -- the mask and positions of the single pass -------------------------------------------------------------


def voco_span(input_ids: torch.Tensor, voco_id: int, voco_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) column of each row's VoCo tokens, [batch] each; exactly `voco_tokens` per row, adjacent."""
    is_voco = input_ids == voco_id
    counts = is_voco.sum(-1)
    if not bool((counts == voco_tokens).all()):
        raise VtcbenchError(f"voco: a prompt holds {counts.tolist()} VoCo tokens per row; expected {voco_tokens} each")
    columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    first = torch.where(is_voco, columns, input_ids.shape[1]).min(-1).values
    last = torch.where(is_voco, columns, -1).max(-1).values
    if not bool((last - first + 1 == voco_tokens).all()):
        raise VtcbenchError("voco: the VoCo tokens of a prompt are not adjacent")
    return first, last


def attention_mask(
    input_ids: torch.Tensor, padding: torch.Tensor, voco_id: int, voco_tokens: int, dtype: torch.dtype
) -> torch.Tensor:
    """The additive 4-D mask [batch, 1, seq, seq] of `make_voco_mask_llava` on top of the causal
    and padding masks. A padding row sees only itself (its output is never read; a row with no
    visible key would give NaN under sdpa)."""
    seq = input_ids.shape[1]
    first, last = voco_span(input_ids, voco_id, voco_tokens)
    rows = torch.arange(seq, device=input_ids.device)
    causal = rows[None, :, None] >= rows[None, None, :]
    after = rows[None, :, None] > last[:, None, None]  # queries after the last VoCo token ...
    before = rows[None, None, :] < first[:, None, None]  # ... do not see keys before the first
    valid = padding.bool()
    allowed = causal & valid[:, None, :] & ~(after & before)
    allowed |= torch.eye(seq, dtype=torch.bool, device=input_ids.device)[None] & ~valid[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def position_ids(padding: torch.Tensor) -> torch.Tensor:
    """One running count over each row's tokens (the official `cumsum - 1`); padding at 0."""
    return (padding.long().cumsum(-1) - 1).clamp(min=0)


def single_pass_logits(model: nn.Module, inputs: dict, voco_id: int, voco_tokens: int) -> torch.Tensor:
    """Form (a): logits of every position of one masked forward over the whole (left-padded) prompt."""
    check_attention(model)
    ids, padding = inputs["input_ids"], inputs["attention_mask"]
    extra = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    mask = attention_mask(ids, padding, voco_id, voco_tokens, model.dtype)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(padding), use_cache=False, **extra).logits


@torch.no_grad()
def single_pass_generate(model: nn.Module, inputs: dict, voco_id: int, voco_tokens: int, max_new_tokens: int) -> torch.Tensor:
    """Form (a), greedy: every step reruns the whole masked prompt plus the answer so far (no
    cache); the reference the efficient form must equal. Returns the new ids [batch, n]."""
    ids, padding = inputs["input_ids"], inputs["attention_mask"]
    new = ids[:, :0]
    for _ in range(max_new_tokens):
        step = dict(inputs, input_ids=torch.cat([ids, new], 1), attention_mask=torch.cat([padding, torch.ones_like(new)], 1))
        logits = single_pass_logits(model, step, voco_id, voco_tokens)
        new = torch.cat([new, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return new


# -- the efficient form ------------------------------------------------------------------------------------


@dataclass
class CompressedImage:
    """One image's compressed cache: per layer the VoCo tokens' (keys, values), [kv_heads, K, head_dim]."""

    entries: list[tuple[torch.Tensor, torch.Tensor]]
    prefix_length: int  # tokens up to the last VoCo token: the text's first position


@dataclass
class VocoCache:
    """Compressed images by content (a hash of the pixels and the prefix ids), reused across
    questions about the same image (supplement 2.3.1). `hits`/`misses` count look-ups."""

    capacity: int | None = None  # most images held; the least recently used goes first
    images: OrderedDict[str, CompressedImage] = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0

    def put(self, key: str, image: CompressedImage) -> None:
        self.images[key] = image
        while self.capacity is not None and len(self.images) > self.capacity:
            self.images.popitem(last=False)

    def get(self, key: str) -> CompressedImage:
        self.images.move_to_end(key)
        return self.images[key]

    @staticmethod
    def key(prefix_ids: torch.Tensor, pixel_values: torch.Tensor) -> str:
        digest = hashlib.sha256(prefix_ids.cpu().numpy().tobytes())
        digest.update(pixel_values.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


@dataclass
class Row:
    """One prompt of the efficient form: its ids [seq] and its image's pixel values [1, ...]."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor | None = None


@contextmanager
def _phase(timer, name: str) -> Iterator[None]:
    if timer is None:
        yield
    else:
        with timer.phase(name):
            yield


def compress_images(
    model: nn.Module, rows: list[Row], voco_id: int, voco_tokens: int, store: VocoCache, timer=None
) -> list[CompressedImage]:
    """Per row, its compressed image: from the store, or by the first forward over the rows that
    miss it (one batch: their prefixes have the same length), keeping only the VoCo entries."""
    prefixes, keys = [], []
    for row in rows:
        _, last = voco_span(row.input_ids[None], voco_id, voco_tokens)
        prefixes.append(row.input_ids[: int(last) + 1])
        keys.append(VocoCache.key(prefixes[-1], row.pixel_values))
    found = {key: store.get(key) for key in keys if key in store.images}
    store.hits += sum(key in found for key in keys)
    store.misses += sum(key not in found for key in keys)
    todo = [key for key in dict.fromkeys(keys) if key not in found]  # a batch may ask twice about one image
    if todo:
        index = [keys.index(key) for key in todo]
        if len({prefixes[i].shape[0] for i in index}) > 1:
            raise VtcbenchError("voco: a batch mixes images of different visual-token counts; use --batch-size 1")
        ids = torch.stack([prefixes[i] for i in index])
        extra = {"pixel_values": torch.cat([rows[i].pixel_values for i in index])}
        if rows[index[0]].image_sizes is not None:
            extra["image_sizes"] = torch.cat([rows[i].image_sizes for i in index])
        with _phase(timer, "compression_pass"):
            cache = seam.branch_cache(model.config, [])
            model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=position_ids(torch.ones_like(ids)),
                  use_cache=True, logits_to_keep=1, **{seam.cache_argument(model): cache}, **extra)
            seam.keep_cache_entries(cache, torch.arange(ids.shape[1] - voco_tokens, ids.shape[1], device=ids.device))
        entries = seam.cache_prefix(cache, len(cache.layers))
        for batch_row, key in enumerate(todo):
            found[key] = CompressedImage([(k[batch_row], v[batch_row]) for k, v in entries], ids.shape[1])
            store.put(key, found[key])
    return [found[key] for key in keys]


@dataclass
class Prefilled:
    """The text forward of form (b): its logits [batch, text, vocab], the cache (the VoCo entries,
    then the text's), which of its columns are not padding, and the text's positions."""

    logits: torch.Tensor
    cache: object
    valid: torch.Tensor  # [batch, cache columns]
    positions: torch.Tensor  # [batch, text]


def _mask(valid: torch.Tensor, new_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [batch, 1, new_rows, columns] mask for the last `new_rows` columns as queries:
    every valid earlier column and, causally, the new ones; a padding query sees only itself."""
    columns = valid.shape[1]
    keys = torch.arange(columns, device=valid.device)
    queries = torch.arange(columns - new_rows, columns, device=valid.device)
    allowed = (keys[None, :] <= queries[:, None])[None] & valid[:, None, :]
    allowed |= (keys[None, :] == queries[:, None])[None] & ~valid[:, columns - new_rows :, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def prefill(
    model: nn.Module, rows: list[Row], *, voco_id: int, voco_tokens: int, store: VocoCache, pad_token_id: int, timer=None,
    logits_to_keep: int = 1,
) -> Prefilled:
    """Form (b) up to the first answer token: the compressed images (from `store`, or computed),
    loaded into a fresh cache, then one forward of the text after the VoCo tokens, left-padded
    between the VoCo entries and the text, at the positions of the single pass."""
    check_attention(model)
    device = rows[0].input_ids.device
    images = compress_images(model, rows, voco_id, voco_tokens, store, timer)
    texts = [row.input_ids[image.prefix_length :] for row, image in zip(rows, images)]
    width = max(t.shape[0] for t in texts)
    if width == 0:
        raise VtcbenchError("voco: a prompt ends with its VoCo tokens; the text after them is empty")
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(rows), voco_tokens + width), dtype=torch.bool, device=device)
    valid[:, :voco_tokens] = True
    for r, text in enumerate(texts):
        ids[r, width - text.shape[0] :] = text
        valid[r, voco_tokens + width - text.shape[0] :] = True
    start = torch.tensor([image.prefix_length for image in images], device=device)
    positions = start[:, None] + position_ids(valid[:, voco_tokens:])
    with _phase(timer, "kv_load"):
        layers = range(len(images[0].entries))
        cache = seam.branch_cache(model.config, [
            (torch.stack([im.entries[n][0] for im in images]), torch.stack([im.entries[n][1] for im in images])) for n in layers
        ])
    with _phase(timer, "text_prefill"):
        output = model(input_ids=ids, attention_mask=_mask(valid, width, model.dtype), position_ids=positions, use_cache=True,
                       logits_to_keep=logits_to_keep, **{seam.cache_argument(model): cache})
    return Prefilled(output.logits, cache, valid, positions)


@torch.no_grad()
def generate(
    model: nn.Module,
    rows: list[Row],
    *,
    voco_id: int,
    voco_tokens: int,
    store: VocoCache,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    timer=None,
) -> torch.Tensor:
    """Form (b), greedy: `prefill`, then one token at a time against the compressed cache.
    Returns the new ids [batch, n] (finished rows padded). `stop(new_ids) -> [batch] bool` ends
    rows early; `timer` (a PhaseTimer) gets compression_pass, kv_load, text_prefill, decode_token."""
    state = prefill(model, rows, voco_id=voco_id, voco_tokens=voco_tokens, store=store, pad_token_id=pad_token_id, timer=timer)
    logits, valid, position = state.logits, state.valid, state.positions[:, -1:]
    cache_name = seam.cache_argument(model)
    new = torch.empty((len(rows), 0), dtype=torch.long, device=valid.device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=valid.device)
    for step in range(max_new_tokens):
        if step:
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
            position = position + 1
            with _phase(timer, "decode_token"):
                logits = model(input_ids=new[:, -1:], attention_mask=_mask(valid, 1, model.dtype), position_ids=position,
                               use_cache=True, logits_to_keep=1, **{cache_name: state.cache}).logits
        token = torch.where(done, pad_token_id, logits[:, -1].argmax(-1))
        new = torch.cat([new, token[:, None]], 1)
        if eos_token_id is not None:
            done |= token == eos_token_id
        if stop is not None:
            done |= stop(new)
        if bool(done.all()):
            break
    return new


# -- storage ----------------------------------------------------------------------------------------------


def kv_bytes(n_entries: int, n_layers: int, n_kv_heads: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values for `n_entries` tokens over all layers (bf16: 2 bytes a value)."""
    return n_entries * n_layers * 2 * n_kv_heads * head_dim * bytes_per_value
