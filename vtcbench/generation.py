"""A method on a loaded model, answering prompts: one way for every caller (`vtcbench generate`,
`vtcbench run`'s lmms-eval model, training's held-out accuracy), so that each kind of method runs
the same everywhere.

A method's kind opens a `Session` (`method.kind.session(model, processor, method)`), which takes
encoded prompts (`encode`) and answers them greedily, in one batch:

- `EngineSession` (kinds none, in_llm, pre_llm): the compression engine's hooks around
  transformers' `generate`, on the left-padded batch (`collate`), the engine preparing it;
- `CacheSession` (kind cache, VoCo-LLaMA): `vtcbench/voco.py`'s compressed-cache generation on the
  unpadded prompts, with a store of compressed images kept for the session, so a later question
  about an image reuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from vtcbench.engine import compress
from vtcbench.families import ModelFamily, family_of
from vtcbench.methods.base import Method
from vtcbench.models import image_token_mask
from vtcbench.profilers.latency import PhaseTimer, TokenMarker
from vtcbench.voco import Row, VocoCache, single_pass_logits
from vtcbench.voco import generate as voco_generate


@dataclass
class Prompt:
    """One encoded prompt, unpadded."""

    input_ids: torch.Tensor  # [seq]
    pixels: dict[str, torch.Tensor]  # the processor's image inputs (pixel_values, and e.g. image_sizes); {} without images
    token_inputs: dict[str, torch.Tensor]  # other per-token inputs [seq] (Qwen's mm_token_type_ids), padded like input_ids
    image_tokens: int
    question: str | None  # the request's text, for methods that score the image against it (CDPruner)


def encode(processor: Any, model: nn.Module, prompt: str, images: Sequence[Image.Image], question: str | None = None) -> Prompt:
    """One prompt through the processor (the tokenizer alone for a prompt without images);
    `question`: the request's own text, kept beside the ids."""
    encoded = processor(images=list(images), text=prompt, return_tensors="pt") if images else processor.tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"][0]
    extra = {key: value for key, value in encoded.items() if key not in ("input_ids", "attention_mask")}
    per_token = {key for key, value in extra.items() if value.shape == encoded["input_ids"].shape}
    image_tokens = int(image_token_mask(input_ids, family_of(model).image_token_id(model.config)).sum())
    pixels = {key: value for key, value in extra.items() if key not in per_token}
    return Prompt(input_ids, pixels, {key: extra[key][0] for key in per_token}, image_tokens, question)


def collate(prompts: Sequence[Prompt], tokenizer: Any, family: ModelFamily, model: nn.Module) -> dict[str, torch.Tensor]:
    """Left-pad into one batch on the model's device; the family joins the image inputs (LLaVA-NeXT
    pads AnyRes crops)."""
    device = model.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    length = max(prompt.input_ids.shape[0] for prompt in prompts)
    input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - prompt.input_ids.shape[0] :] = prompt.input_ids
        attention_mask[row, length - prompt.input_ids.shape[0] :] = 1
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    for key in prompts[0].token_inputs:
        padded = torch.zeros((len(prompts), length), dtype=prompts[0].token_inputs[key].dtype)
        for row, prompt in enumerate(prompts):
            padded[row, length - prompt.input_ids.shape[0] :] = prompt.token_inputs[key]
        batch[key] = padded.to(device)
    pixels = [prompt.pixels for prompt in prompts if prompt.pixels]
    if pixels:
        joined = family.collate_pixels(pixels)
        batch.update({key: value.to(device) for key, value in joined.items()})
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return batch


def decode(tokenizer: Any, new_tokens: torch.Tensor, until: Sequence[str] = (), strip: bool = True) -> list[tuple[str, int]]:
    """(text, tokens generated) per row of generated ids: cut after EOS, then at a stop string,
    then stripped (unless the caller's convention keeps the spaces: `AnswerRules.strip`)."""
    results = []
    eos = tokenizer.eos_token_id
    for row in new_tokens:
        tokens = row.tolist()
        if eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        results.append((text.strip() if strip else text, len(tokens)))
    return results


class StopOnStrings(StoppingCriteria):
    """Per row: stop once the decoded new text contains one of the task's `until` strings."""

    def __init__(self, tokenizer: Any, until: Sequence[str], prompt_length: int):
        self.tokenizer, self.until, self.prompt_length = tokenizer, [u for u in until if u], prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.until:
            return done
        for row, tokens in enumerate(input_ids[:, self.prompt_length :].tolist()):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            done[row] = any(stop in text for stop in self.until)
        return done


@dataclass
class Kept:
    """What the engine recorded of a prefill's kept image tokens (`CompressionEngine.record_kept`)."""

    original: list[int]  # per sample, the image tokens the ranks count
    kept: dict[int, list[list[int]]]  # {layer: per sample, ranks of the kept image tokens}
    merged: dict[int, list[list[list[int]]]]  # {layer: per sample, the ranks each merged token holds}


@dataclass
class Generated:
    """A batch's answers: new ids per row, what each row's layers saw, and the time it took."""

    new_tokens: torch.Tensor  # [batch, n] after each prompt (finished rows padded)
    image_tokens_per_layer: list[list[int]]  # per row
    prefill_ms: float  # to the first answer token
    decode_ms: float  # every later token
    first_logits: torch.Tensor | None = None  # [batch, vocab], the first answer token's logits, when asked for
    kept: Kept | None = None  # when asked for
    extra: dict[str, Any] = field(default_factory=dict)  # what only this kind records (voco: cache hits)


@dataclass
class Scored:
    """One forward over a prompt and a continuation, for its log-likelihood."""

    logits: torch.Tensor  # [1, seq, vocab]
    input_ids: torch.Tensor  # [1, seq]: the ids the logits are of (a pre-LLM method's shortened prompt)
    image_tokens_per_layer: list[int] | None  # None: the kind counts none in a single pass


class Session:
    """`method` on a loaded `model`: answers batches of encoded prompts greedily."""

    def __init__(self, model: nn.Module, processor: Any, method: Method):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.method = method
        self.family = family_of(model)
        #: extra `generate` arguments of the caller's conventions (lmms-eval's Qwen classes stop at
        #: the tokenizer's eos alone: `eos_token_id`)
        self.generate_kwargs: dict[str, Any] = {}

    def generate(
        self, prompts: Sequence[Prompt], *, max_new_tokens: int, until: Sequence[str] = (), first_logits: bool = False,
        record_kept: bool = False,
    ) -> Generated:
        """Greedy answers to one batch; each row stops at EOS or once its text holds a string of `until`."""
        raise NotImplementedError  # abstract

    def score(self, prompt: Prompt) -> Scored:
        """The logits of one prompt that ends with the continuation to score."""
        raise NotImplementedError  # abstract

    def answer(self, questions: Sequence[str], images: Sequence[Image.Image], max_new_tokens: int) -> list[tuple[str, list[int]]]:
        """(answer, visual tokens per layer) to each question about its one image, in one batch."""
        system = self.family.system_prompt(self.model.config)
        kind = self.method.kind
        prompts = [encode(self.processor, self.model, kind.prompt(self.method, self.family, question, 1, None, system), [image], question)
                   for question, image in zip(questions, images)]
        generated = self.generate(prompts, max_new_tokens=max_new_tokens)
        texts = decode(self.tokenizer, generated.new_tokens)
        return [(text, counts) for (text, _), counts in zip(texts, generated.image_tokens_per_layer)]

    def collate(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        return collate(prompts, self.tokenizer, self.family, self.model)


class EngineSession(Session):
    """The compression engine around transformers' `generate` (vanilla, in-LLM and pre-LLM
    methods); one engine, built once and entered per batch (its hooks live only inside `with`)."""

    def __init__(self, model: nn.Module, processor: Any, method: Method):
        super().__init__(model, processor, method)
        self.engine = compress(model, method)

    def generate(
        self, prompts: Sequence[Prompt], *, max_new_tokens: int, until: Sequence[str] = (), first_logits: bool = False,
        record_kept: bool = False,
    ) -> Generated:
        timer = PhaseTimer(self.model.device)
        marker = TokenMarker(timer)
        self.engine.record_kept = record_kept
        self.engine.questions = [prompt.question for prompt in prompts]
        try:
            with self.engine as engine:
                inputs = engine.prepare(self.collate(prompts))
                length = inputs["input_ids"].shape[1]
                timer.start("ttft")
                timer.start("end_to_end")
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    stopping_criteria=StoppingCriteriaList([StopOnStrings(self.tokenizer, until, length)]),
                    logits_processor=LogitsProcessorList([marker]),
                    pad_token_id=self.tokenizer.pad_token_id,
                    **self.generate_kwargs,
                    output_logits=first_logits,  # a copy of every step's logits: only fidelity reads them
                    return_dict_in_generate=first_logits,
                )
                timer.stop("end_to_end")
        finally:
            self.engine.record_kept = False
            self.engine.questions = None
        phases = timer.read()
        sequences = output.sequences if first_logits else output
        return Generated(
            new_tokens=sequences[:, length:],
            image_tokens_per_layer=[list(counts) for counts in engine.applied_image_tokens_per_sample],
            prefill_ms=phases["ttft"][0],
            decode_ms=sum(phases.get("decode_token", [])),
            first_logits=output.logits[0].float() if first_logits else None,
            kept=Kept(engine.original_image_tokens, engine.kept_image_tokens, engine.merged_image_tokens) if record_kept else None,
        )

    def score(self, prompt: Prompt) -> Scored:
        self.engine.questions = [prompt.question]
        try:
            with self.engine as engine:
                inputs = engine.prepare(self.collate([prompt]))
                logits = self.model(**inputs, use_cache=False).logits
        finally:
            self.engine.questions = None
        return Scored(logits, inputs["input_ids"], list(engine.applied_image_tokens_per_layer))


class CacheSession(Session):
    """VoCo-LLaMA's efficient form (`vtcbench/voco.py`): each image compressed into the VoCo
    tokens' cache (or taken from the session's store), the text answered against that cache."""

    def __init__(self, model: nn.Module, processor: Any, method: Method):
        super().__init__(model, processor, method)
        self.token = method.token_id(model, self.tokenizer)  # refuses a checkpoint without the VoCo token
        self.store = VocoCache(capacity=1024)
        self.n_layers = len(self.family.language_model(model).layers)

    def generate(
        self, prompts: Sequence[Prompt], *, max_new_tokens: int, until: Sequence[str] = (), first_logits: bool = False,
        record_kept: bool = False,
    ) -> Generated:
        self.method.kind.check_options(self.method, fidelity=first_logits, keep_indices=int(record_kept))
        device, dtype = self.model.device, self.model.dtype
        rows = [Row(prompt.input_ids.to(device), prompt.pixels["pixel_values"].to(device, dtype),
                    None if "image_sizes" not in prompt.pixels else prompt.pixels["image_sizes"].to(device)) for prompt in prompts]
        stop = StopOnStrings(self.tokenizer, until, 0)
        timer = PhaseTimer(device)
        hits = self.store.hits
        new = voco_generate(
            self.model, rows, voco_id=self.token, voco_tokens=self.method.voco_tokens, store=self.store,
            max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
            stop=lambda ids: stop(ids, None), timer=timer,
        )
        phases = timer.read()
        return Generated(
            new_tokens=new,
            image_tokens_per_layer=[self.method.image_tokens_per_layer(prompt.image_tokens, self.n_layers) for prompt in prompts],
            prefill_ms=sum(sum(phases.get(name, [])) for name in ("compression_pass", "kv_load", "text_prefill")),
            decode_ms=sum(phases.get("decode_token", [])),
            extra={"voco_cache_hits": self.store.hits - hits},
        )

    def score(self, prompt: Prompt) -> Scored:
        """The masked single pass over the whole prompt (VoCo-LLaMA's training form)."""
        inputs = self.collate([prompt])
        return Scored(single_pass_logits(self.model, inputs, self.token, self.method.voco_tokens), inputs["input_ids"], None)
