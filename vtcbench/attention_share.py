"""Where the answer position looks, per decoder layer (LLaVolta, Fig. 1 right).

For each decoder layer, the share of attention that the position producing the answer pays to
the image tokens, the system prompt and the instruction: the row of the last prompt token (whose
logits give the first answer token) and the row of the first generated token.

    groups = token_groups(inputs["input_ids"], inputs["attention_mask"], family_of(model).image_token_id(model.config))
    with AttentionShareRecorder(model, groups) as recorder:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    write_outputs(summarise(recorder.shares, recorder.counts), folder)

The recorder hooks the decoder layers (forward pre-hooks, removed on exit; nothing in
transformers is patched) and recomputes each row from the layer's own input and projections, as
the compression methods' scores are (`vtcbench.engine.query_attention`), so it works under
any attention backend (eager, sdpa, flash attention), which do not return attention weights.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import torch
from torch import nn

from vtcbench import transformers_seam as seam
from vtcbench.engine import query_attention
from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of
from vtcbench.models import image_token_mask
from vtcbench.results import atomic_file

#: the key groups, in the order of the last axis of `AttentionShareRecorder.shares`
GROUPS: tuple[str, ...] = ("image", "system", "instruction", "output")
IMAGE, SYSTEM, INSTRUCTION, OUTPUT = range(len(GROUPS))
PADDING = -1
#: the query rows, in the order of axis 1 of `AttentionShareRecorder.shares`
POSITIONS: tuple[str, ...] = ("last_prompt_token", "first_generated_token")
LAST_PROMPT_TOKEN, FIRST_GENERATED_TOKEN = range(len(POSITIONS))

CSV_NAME = "attention_share.csv"
PNG_NAME = "attention_share.png"
CSV_FIELDS = ("layer", "position", "group", "share", "share_per_token")


def token_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int) -> torch.Tensor:
    """The group of every prompt token, LongTensor [batch, seq] (indices into `GROUPS`).

    - 0 `image`: the image placeholder tokens (the visual tokens, once the model merges them);
    - 1 `system`: the real tokens before the first image token, that is BOS, the system prompt
      and the user's role tag (`... USER:` in LLaVA's vicuna_v1 template); a prompt without an
      image is all `system`;
    - 2 `instruction`: the text tokens after the first image token, up to the end of the prompt
      (the question, the text between images, and the `ASSISTANT:` tag);
    - -1: padding (`attention_mask == 0`).

    Group 3, `output`, is the generated tokens; no prompt token belongs to it.
    """
    if input_ids.ndim != 2:
        raise VtcbenchError(f"input_ids must be [batch, seq], not of shape {tuple(input_ids.shape)}")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_image = image_token_mask(input_ids, image_token_id) & valid
    after_image = is_image.long().cumsum(dim=1) > 0
    groups = torch.full_like(input_ids, SYSTEM, dtype=torch.long)
    groups[after_image] = INSTRUCTION
    groups[is_image] = IMAGE
    groups[~valid] = PADDING
    return groups


def group_sums(row: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[batch, len(GROUPS)]: an attention row [batch, keys] summed over each key group."""
    valid = groups >= 0
    sums = row.new_zeros(row.shape[0], len(GROUPS))
    return sums.scatter_add_(1, groups.clamp(min=0), row.masked_fill(~valid, 0.0))


class AttentionShareRecorder:
    """Per decoder layer, the attention share of the answer position over the token groups.

    `with AttentionShareRecorder(model, groups) as recorder: model.generate(...)`, where
    `groups` is `token_groups` of the (left-padded) prompts passed to `generate`.

    At the prefill (a layer called on the whole prompt with nothing cached for it) each layer
    records the row of the last prompt token over the prompt; at the first decode step (one new
    token, the layer's cache holding the prompt) the row of the first generated token over the
    prompt and itself: its query and key from the layer's input, the prompt's keys read from the
    layer's cache before the layer appends to it. (`generate(use_cache=False)` reruns the whole
    sequence instead; its second forward gives the same row.) Later steps are not recorded.

    - `shares`: float32 [batch, 2 (`POSITIONS`), n_layers, 4 (`GROUPS`)], the attention each row
      pays to each group (summing to 1 over the groups); NaN until recorded, so the first
      generated token's row stays NaN when generation stops after one token;
    - `counts`: long [batch, 4], tokens per group (`output`: 1, the first generated token itself),
      so `shares / counts[:, None, None]` is the share per token.

    Prompts must be left-padded (as `generate` needs). Each layer must see the whole prompt, then
    one more token per step: a call that does not fit (groups of another prompt, a compression
    method that drops tokens, assisted decoding, beam search's wider batch) raises VtcbenchError.
    """

    def __init__(self, model: nn.Module, groups: torch.Tensor):
        if groups.ndim != 2 or groups.shape[1] == 0:
            raise VtcbenchError(f"groups must be [batch, seq] (token_groups), not of shape {tuple(groups.shape)}")
        if bool((groups[:, -1] < 0).any()):
            raise VtcbenchError("the last column of a prompt is padding: left-pad the prompts, as generate needs")
        self.model = model
        self.family = family_of(model)
        self.layers = self.family.language_model(model).layers
        self.n_layers = len(self.layers)
        self.groups = groups.long()
        counts = [(self.groups == group).sum(dim=1) for group in (IMAGE, SYSTEM, INSTRUCTION)]
        self.counts: torch.Tensor = torch.stack([*counts, torch.ones_like(counts[0])], dim=1).cpu()
        self._shares: torch.Tensor | None = None
        self._lengths: dict[int, int] = {}  # per layer: the sequence length of its last call
        self._handles: list = []

    @property
    def shares(self) -> torch.Tensor:
        """A copy, on the CPU, of the shares recorded so far (see the class docstring)."""
        if self._shares is None:
            return torch.full((self.groups.shape[0], len(POSITIONS), self.n_layers, len(GROUPS)), math.nan)
        return self._shares.to("cpu", copy=True)

    def __enter__(self) -> AttentionShareRecorder:
        self._lengths.clear()
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            hidden = seam.hidden_states(args, kwargs)
            cache = seam.find_cache(kwargs)
            # this layer's own cache: at the prefill, the layers below have already filled theirs
            past = None if cache is None else seam.cache_layer_keys(cache, index)
            cached, new = (0 if past is None else past.shape[-2]), hidden.shape[1]
            prompt = self.groups.shape[1]
            if hidden.shape[0] != self.groups.shape[0]:
                raise VtcbenchError(
                    f"decoder layer {index} got a batch of {hidden.shape[0]}, the recorder's groups hold "
                    f"{self.groups.shape[0]} prompts (beam search and several return sequences are not supported)"
                )
            total, last = cached + new, self._lengths.get(index)
            if cached == 0 and new == prompt:
                self._record(index, LAST_PROMPT_TOKEN, module, hidden, kwargs, None)
            elif last is None or total != last + 1 or (cached and new != 1):
                raise VtcbenchError(
                    f"decoder layer {index} got {new} new tokens with {cached} cached, after "
                    + ("no prefill" if last is None else f"{last} tokens")
                    + f"; the recorder expects a {prompt}-token prompt (its groups; build them from the inputs "
                    "passed to the model), then one token per step (greedy or sampling; a compression method that "
                    "drops tokens, or assisted decoding, cannot be recorded)"
                )
            elif total == prompt + 1:
                self._record(index, FIRST_GENERATED_TOKEN, module, hidden, kwargs, past)
            self._lengths[index] = total

        return hook

    def _record(self, index: int, position: int, layer: nn.Module, hidden, kwargs, past) -> None:
        groups = self.groups.to(hidden.device)
        if position == FIRST_GENERATED_TOKEN:
            groups = torch.cat([groups, groups.new_full((groups.shape[0], 1), OUTPUT)], dim=1)
        last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        row = query_attention(self.family, layer, hidden, seam.rope_tables(kwargs), last, groups >= 0, past)
        if self._shares is None or self._shares.device != hidden.device:
            self._shares = self.shares.to(hidden.device)
        if position == LAST_PROMPT_TOKEN:  # a new prefill: forget the previous first-generated row
            self._shares[:, FIRST_GENERATED_TOKEN, index] = math.nan
        self._shares[:, position, index] = group_sums(row, groups)


def summarise(shares: torch.Tensor, counts: torch.Tensor) -> list[dict]:
    """One row per (decoder layer, position, group): the attention share averaged over samples.

    `shares` [samples, 2, n_layers, 4] and `counts` [samples, 4] are `AttentionShareRecorder`'s
    (concatenate several batches' along the first axis). The shares are computed from each
    layer's own projections on its input (input_layernorm, q_proj, k_proj, RoPE, repeat_kv, the
    layer's scaling; averaged over heads), not from eager attention weights, so they can be
    measured under any attention backend; under eager they equal the weights' up to rounding.

    Each row: `layer` (0-based), `position` ("last_prompt_token" | "first_generated_token"),
    `group` (one of `GROUPS`), `share` (mean over samples of the group's share of the row) and
    `share_per_token` (mean over samples of the share divided by the group's token count). NaN
    samples (a first generated token never produced) are left out of the means; a mean of none
    is NaN. The `output` group's share at the last prompt token is 0: nothing is generated yet.
    """
    if shares.ndim != 4 or shares.shape[1] != len(POSITIONS) or shares.shape[3] != len(GROUPS):
        raise VtcbenchError(f"shares must be [samples, {len(POSITIONS)}, layers, {len(GROUPS)}], not {tuple(shares.shape)}")
    if tuple(counts.shape) != (shares.shape[0], len(GROUPS)):
        raise VtcbenchError(f"counts must be [{shares.shape[0]}, {len(GROUPS)}], not {tuple(counts.shape)}")
    shares = shares.detach().double().cpu()
    per_token = shares / counts.double().cpu()[:, None, None, :]  # an empty group: 0 / 0 = NaN, left out
    share_mean, per_token_mean = shares.nanmean(dim=0), per_token.nanmean(dim=0)
    rows = []
    for layer in range(shares.shape[2]):
        for p, position in enumerate(POSITIONS):
            for g, group in enumerate(GROUPS):
                rows.append(
                    {
                        "layer": layer,
                        "position": position,
                        "group": group,
                        "share": float(share_mean[p, layer, g]),
                        "share_per_token": float(per_token_mean[p, layer, g]),
                    }
                )
    return rows


def write_outputs(rows: list[dict], folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write `attention_share.csv` and `attention_share.png` (two panels: the last prompt token and
    the first generated token; x the decoder layer, y the share of attention, a line per group)
    into `folder`, each atomically (a temporary file, then renamed). Returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = folder / CSV_NAME, folder / PNG_NAME
    with atomic_file(csv_path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({field: row[field] for field in CSV_FIELDS} for row in rows)
    figure = _figure(rows)
    with atomic_file(png_path, "wb") as handle:
        figure.savefig(handle, format="png")
    return csv_path, png_path


_COLOURS = {"image": "#d62728", "system": "#1f77b4", "instruction": "#2ca02c", "output": "#9467bd"}
_TITLES = {"last_prompt_token": "Last prompt token", "first_generated_token": "First generated token"}


def _figure(rows: list[dict]):
    """The two-panel figure, sized for a paper (6.5 x 2.6 inches, 200 dpi); Agg, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.5, 2.6), dpi=200, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(POSITIONS), sharey=True)
    for ax, position in zip(axes, POSITIONS):
        for group in GROUPS:
            if position == "last_prompt_token" and group == "output":
                continue  # nothing is generated yet: always 0
            points = sorted((r["layer"], r["share"]) for r in rows if r["position"] == position and r["group"] == group)
            if points:
                layers, values = zip(*points)
                ax.plot(layers, values, label=group, color=_COLOURS[group], marker="o", markersize=2.5, linewidth=1.2)
        ax.set_title(_TITLES[position], fontsize=9)
        ax.set_xlabel("Decoder layer", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
    axes[0].set_ylabel("Share of attention", fontsize=8)
    handles: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    labels = [group for group in GROUPS if group in handles]
    figure.legend([handles[g] for g in labels], labels, loc="outside right center", fontsize=7, frameon=False)
    figure.suptitle("Attention of the answer position to image, system prompt and instruction", fontsize=10)
    return figure
