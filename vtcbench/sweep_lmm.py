"""The redundancy sweep's model for lmms-eval: every cell of a layer x ratio grid per request.

Per batch of requests, one vanilla forward (the trunk, which is also the sweep's ratio-1.0
cell) is recorded at every branch layer K; each cell at K then resumes the prefill there
(`CompressionEngine.resume`), on a cache that holds the trunk's prompt entries of the layers
below K, the cells running each layer together (`engine.run_together`: packed in one row where
they can be), and `generate` continues from each cell's cache. A cell at layer 0 shares nothing with
the trunk and runs whole. Every cell thus computes what `vtcbench run` with the cell's method
computes, layer for layer, and skips only the layers it would repeat.

All cells of a request are answered before the request is written to the run folder, as one
record, so a resumed sweep never computes a cell twice. lmms-eval then scores one cell at a
time: `cell` names the cell whose answers this model returns, read back from the run folder.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import cast

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from transformers import StoppingCriteriaList

from vtcbench import transformers_seam as seam
from vtcbench.attention_share import AttentionShareRecorder, token_groups
from vtcbench.engine import CompressionEngine, Trunk, clock, run_together
from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of
from vtcbench.generation import EngineSession, StopOnStrings
from vtcbench.lmms_model import (
    VANILLA,
    Job,
    VtcbenchLMM,
    continuation_score,
    generation_settings,
)
from vtcbench.methods.base import Method

VANILLA_CELL = "vanilla"


@dataclass(frozen=True)
class Branch:
    """A sweep cell's method, resumed at `layer` from the trunk (0: run whole)."""

    cell: str
    layer: int
    method: Method


class SweepLMM(VtcbenchLMM):
    """Answers lmms-eval requests for every branch at once; returns the answers of `self.cell`."""

    can_skip = False  # lmms-eval scores each cell in its own evaluate(): a bad document stops the sweep

    def __init__(
        self, model, processor, branches: list[Branch], run, *, batch_size: int = 1, show_progress: bool = True,
        attention_share: bool = False,
    ):
        super().__init__(model, processor, VANILLA, run, batch_size=batch_size, show_progress=show_progress)
        self.branches = branches
        self.attention_share = attention_share  # record the vanilla answer's attention per token group
        self.cell = VANILLA_CELL
        #: run the branches' layers packed in one row where they can be (`engine.run_together`)
        self.pack_branches = True
        self.progress_units = len(branches) + 1
        self._sessions.update({id(b.method): b.method.kind.session(model, processor, b.method) for b in branches})
        self._trunk_layers = {b.layer for b in branches if b.layer > 0}
        self._language_model = family_of(model).language_model(model)
        self._cache_argument = seam.cache_argument(model)
        _check_plain_greedy(model)

    def _engine(self, method: Method) -> CompressionEngine:
        """The engine of a cell's method (every sweep criterion acts inside the language model)."""
        return cast(EngineSession, self._sessions[id(method)]).engine

    # -- lmms-eval interface ------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = self._answer(requests, self._sweep_generate, lambda record: record["prediction"])
        return [cells[self.cell] for cells in answers]

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        answers = self._answer(requests, self._sweep_loglikelihood, lambda record: record["prediction"])
        return [GenerationResult(text=tuple(cells[self.cell])) for cells in answers]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        raise VtcbenchError("the redundancy sweep scores single-round tasks; this task is multi-round")

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _sweep_generate(self, jobs: list[Job]):
        max_new_tokens, until = generation_settings(jobs[0].request, self.rules)
        items = self._encode_jobs(jobs)
        inputs = self._collate(items)
        groups = token_groups(inputs["input_ids"], inputs["attention_mask"], family_of(self.model).image_token_id(self.model.config))
        recording = AttentionShareRecorder(self.model, groups) if self.attention_share else nullcontext()
        started = clock()
        with Trunk(self.model, self._trunk_layers) as trunk, recording as recorder:
            vanilla = self._timed_generate(VANILLA, items, max_new_tokens, until)
        trunk_s = clock() - started
        texts = {VANILLA_CELL: [text for text, _ in vanilla.outputs]}
        tokens = {VANILLA_CELL: vanilla.image_tokens_per_layer}
        separate_s = trunk_s  # what separate runs would spend: vanilla, then every branch run whole
        resumed = []
        for branch in self.branches:
            if branch.layer == 0:  # shares nothing with the trunk: runs whole
                branch_started = clock()
                answer = self._timed_generate(branch.method, items, max_new_tokens, until)
                texts[branch.cell], tokens[branch.cell] = [t for t, _ in answer.outputs], answer.image_tokens_per_layer
                separate_s += clock() - branch_started
            else:
                cache = trunk.branch_cache(branch.layer)
                resumed.append((branch, cache, self._engine(branch.method).resume(branch.layer, inputs, trunk, cache)))
                separate_s += trunk.reached[branch.layer] - started  # the layers the branch shares
        branches_started = clock()
        run_together([prefill for _, _, prefill in resumed], self.pack_branches)
        for branch, cache, prefill in resumed:
            with prefill.engine:
                new = self._continue(inputs, cache, prefill.hidden, max_new_tokens, until)
            texts[branch.cell] = [text for text, _ in self._answers(new, until)]
            tokens[branch.cell] = [list(c) for c in prefill.engine.applied_image_tokens_per_sample]
        # the branches' own layers, which run together in less time than one by one: an estimate on the low side
        separate_s += clock() - branches_started
        sweep_s = clock() - started
        for row, item in enumerate(items):
            record = {
                "prompt_tokens": int(item.input_ids.shape[0]),
                "image_tokens": item.image_tokens,
                "image_tokens_per_layer": {cell: counts[row] for cell, counts in tokens.items()},
                "batch_size": len(items),
                # the batch's wall time, and that of separate runs estimated from the trunk's time
                # to each branch's layer plus the branch's own; per request
                "sweep_ms": sweep_s * 1000 / len(items),
                "separate_ms": separate_s * 1000 / len(items),
            }
            if recorder is not None:
                record["attention_share"] = recorder.shares[row].tolist()  # [position, layer, group]; NaN: none
                record["group_tokens"] = recorder.counts[row].tolist()
            yield item.request_index, {cell: answers[row] for cell, answers in texts.items()}, record

    def _continue(self, inputs: dict, cache, hidden: torch.Tensor, max_new_tokens: int, until: list[str]) -> torch.Tensor:
        """The new tokens of a branch whose prompt is in `cache`: the first from the resumed
        prefill's last position (greedy), the rest from `generate`, which runs its decode steps
        as it does for `vtcbench run`."""
        logits = seam.output_logits(self.model, self._language_model, hidden, last_only=True)
        first = logits[:, -1].float().argmax(dim=-1, keepdim=True)
        if max_new_tokens == 1:
            return first
        prompt_length = inputs["input_ids"].shape[1]
        output = self.model.generate(
            input_ids=torch.cat([inputs["input_ids"], first], dim=1),
            attention_mask=torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(first.shape)], dim=1),
            **{self._cache_argument: cache},
            max_new_tokens=max_new_tokens - 1,
            do_sample=False,
            num_beams=1,
            stopping_criteria=StoppingCriteriaList([StopOnStrings(self.tokenizer, until, prompt_length)]),
            pad_token_id=self.tokenizer.pad_token_id,
            **self._sessions[id(self.method)].generate_kwargs,
        )
        return output[:, prompt_length:]

    # -- log-likelihood ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _sweep_loglikelihood(self, jobs: list[Job]):
        if self.attention_share:
            raise VtcbenchError("--attention-share measures the answer of a generation task; this task scores choices")
        for job in jobs:
            item, n_continuation = self._loglikelihood_item(job)
            inputs = self._collate([item])
            with Trunk(self.model, self._trunk_layers) as trunk, self._engine(VANILLA) as engine:
                scores = {VANILLA_CELL: continuation_score(self.model(**inputs, use_cache=False).logits, inputs["input_ids"], n_continuation)}
                tokens = {VANILLA_CELL: list(engine.applied_image_tokens_per_layer)}
            resumed = []
            for branch in self.branches:
                if branch.layer == 0:
                    with self._engine(branch.method) as engine:
                        logits = self.model(**engine.prepare(inputs), use_cache=False).logits
                    scores[branch.cell] = continuation_score(logits, inputs["input_ids"], n_continuation)
                    tokens[branch.cell] = list(engine.applied_image_tokens_per_layer)
                else:
                    resumed.append((branch, self._engine(branch.method).resume(branch.layer, inputs, trunk, None)))
            run_together([prefill for _, prefill in resumed], self.pack_branches)
            for branch, prefill in resumed:
                logits = seam.output_logits(self.model, self._language_model, prefill.hidden, last_only=False)
                scores[branch.cell] = continuation_score(logits, inputs["input_ids"], n_continuation)
                tokens[branch.cell] = list(prefill.engine.applied_image_tokens_per_layer)
                prefill.engine.forget()
            record = {"prompt_tokens": int(item.input_ids.shape[0]), "image_tokens": item.image_tokens}
            yield job.index, scores, {**record, "image_tokens_per_layer": tokens}


def _check_plain_greedy(model) -> None:
    """A branch takes its first token as the argmax of the resumed prefill's logits, which is what
    `generate` does only when the generation config adds no logits processors."""
    config = model.generation_config
    altered = {
        "repetition_penalty": config.repetition_penalty not in (None, 1.0),
        "no_repeat_ngram_size": bool(config.no_repeat_ngram_size),
        "bad_words_ids": bool(config.bad_words_ids),
        "min_length": bool(config.min_length),
        "min_new_tokens": bool(config.min_new_tokens),
        "suppress_tokens": bool(config.suppress_tokens),
        "begin_suppress_tokens": bool(config.begin_suppress_tokens),
        "forced_bos_token_id": config.forced_bos_token_id is not None,
        "forced_eos_token_id": config.forced_eos_token_id is not None,
    }
    set_ = [name for name, on in altered.items() if on]
    if set_:
        raise VtcbenchError(
            f"the model's generation config sets {', '.join(set_)}; the sweep's branches decode plainly greedily "
            "(clear these in generation_config.json)"
        )
