"""vtcbench's model for lmms-eval: a model of any family with a compression method applied.

lmms-eval owns the benchmarks (prompts, splits, metrics); this class answers its requests:
- prompts in the model family's original evaluation format (`family.prompt`: LLaVA-1.5 and
  LLaVA-NeXT-Vicuna were evaluated with LLaVA's `conv_vicuna_v1` conversation), or the method's
  own (VoCo-LLaMA's): the method's kind writes them (`MethodKind.prompt`); and the rest of what
  the family's own lmms-eval class does to a request (`family.evaluation_processor`,
  `evaluation_images`, `answer_rules`: Qwen's pixel bounds, image path, stop strings), so that its
  answers are that class's;
- greedy decoding, batched: requests are grouped by task, generation kwargs and what the kind
  needs equal in a batch (`MethodKind.batch_key`; LLaVA-1.5: the number of images, which a
  pre-LLM method's shortened prompt needs equal), and answered by the kind's session
  (`vtcbench/generation.py`): under the engine, which handles different visual-token counts per
  prompt (AnyRes), or from VoCo-LLaMA's compressed cache;
- every finished request is appended to the run folder at once (prediction, visual tokens per
  layer, prefill and decode time, tokens generated) and read back on resume instead of recomputed;
- a generation error propagates: no request is silently scored as "" (lmms-eval's own
  `llava_hf` does that);
- a bad document (its image cannot be read: missing file, corrupt bytes, no image; or its prompt
  does not fit the model's context) stops the run in one line naming the task, the document and
  the cause (`BadDocument`), after the documents finished before it; with `skip_bad_documents` it
  is recorded in `skipped` and left out of the scoring instead: its requests are taken out of the
  lmms-eval task's instances, and lmms-eval 0.7.3's `evaluate` scores only documents that have
  requests (evaluator.py: "A partial rerun can leave a document ... without any corresponding
  requests"), so each metric is its own aggregation over the other documents;
- `clean()` keeps the model, so one loaded model serves every task (`evaluate()` calls it).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of
from vtcbench.families.base import AnswerRules
from vtcbench.generation import Kept, Prompt, Session, collate, decode, encode
from vtcbench.methods.base import Method, get_method
from vtcbench.results import RunFolder

VANILLA = get_method("vanilla")


@dataclass
class _Generated:
    outputs: list[tuple[str, int]]  # (text, tokens generated) per row
    timing: dict
    first_logits: torch.Tensor | None  # [batch, vocab], the first answer token's logits (--fidelity only)
    image_tokens_per_layer: list[list[int]]  # per row
    kept: Kept | None = None  # the kept image tokens, when recorded


def _normalise(answer: str) -> str:
    return " ".join(answer.lower().strip().rstrip(".").split())


def _kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(P_vanilla || P_method) of the first answer token, in nats."""
    reference = reference_logits.log_softmax(-1)
    return float((reference.exp() * (reference - logits.log_softmax(-1))).sum())


class BadDocument(VtcbenchError):
    """A document the run cannot answer (one line: task, document id, cause)."""

    def __init__(self, task: str, doc_id: int, cause: str, skippable: bool = True):
        from vtcbench.tasks import short_name

        skip = ", or pass --skip-bad-documents to score the others" if skippable else ""
        super().__init__(
            f"task {short_name(task)!r}, document {doc_id}: {cause}; fix or remove it and rerun (finished documents are kept){skip}"
        )
        self.task, self.doc_id, self.cause = task, doc_id, cause


class _Unanswerable(Exception):
    """Raised while reading a request's visuals (its image cannot be read) or encoding it (request
    `index`: its prompt does not fit the model's context)."""

    def __init__(self, cause: str, index: int | None = None):
        super().__init__(cause)
        self.cause, self.index = cause, index


def _cause(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


@dataclass
class Job:
    """A pending request with its visuals, read once."""

    index: int
    request: Instance
    visuals: list[Image.Image]


@dataclass
class _Encoded(Prompt):
    request_index: int


class VtcbenchLMM(lmms):
    """Answers lmms-eval requests with `model` under `method`, recording into `run`."""

    is_simple = True
    progress_units = 1  # progress-bar units per request (a sweep counts its cells)
    can_skip = True  # whether the command offers --skip-bad-documents

    def __init__(
        self, model, processor, method: Method, run: RunFolder, *, batch_size: int = 1, show_progress: bool = True,
        fidelity: bool = False, keep_indices: int = 0, skip_bad_documents: bool = False, tasks: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.family = family_of(model)
        self.processor = self.family.evaluation_processor(processor, model.config)
        self.tokenizer = self.processor.tokenizer
        self.rules = self.family.answer_rules(model.config)
        self.method = method
        self.run = run
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.fidelity = fidelity  # also answer with vanilla: agreement and first-token KL, no labels needed
        self.keep_indices = keep_indices  # record the kept image tokens of the first N documents per task
        self.skip_bad_documents = skip_bad_documents
        self.tasks = tasks or {}  # lmms-eval task objects by name: a skipped document leaves their instances
        self.skipped: dict[tuple[str, int], str] = {}  # (task, doc_id) -> cause
        self.context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self._device = model.device
        self._system = self.family.system_prompt(model.config)
        # one session per method (its kind's), for the whole run: the engine's, or VoCo's with its
        # store of compressed images, which later questions about an image reuse
        self._sessions: dict[int, Session] = {id(m): m.kind.session(model, self.processor, m) for m in (method, VANILLA)}
        if self.rules.tokenizer_eos_only:  # the family's class ends generation at the tokenizer's eos alone (AnswerRules)
            for session in self._sessions.values():
                session.generate_kwargs["eos_token_id"] = self.tokenizer.eos_token_id

    def _prompt(self, context: str, n_images: int, answer: str | None = None) -> str:
        return self.method.kind.prompt(self.method, self.family, context, n_images, answer, self._system)

    # -- lmms-eval interface ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def clean(self) -> None:
        """Keep the model: lmms-eval's default deletes every nn.Module attribute between tasks."""

    def generate_until(self, requests: list[Instance]) -> list[str]:
        return self._answer(requests, self._generate_batch, lambda record: record["prediction"], unscored="")

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(loss, is_greedy) per request (see `continuation_score`), wrapped: lmms-eval 0.7.3's `evaluate` turns any other
        non-string response into a string, which breaks multiple-choice scoring."""
        answers = self._answer(requests, self._loglikelihood_batch, lambda record: record["prediction"], unscored=(0.0, False))
        return [GenerationResult(text=(float(score), bool(greedy))) for score, greedy in answers]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Round 0 from the request; later rounds from the task's `doc_to_text(doc, previous_output=...,
        round_idx=..., previous_round_info=...)` until it signals the end (lmms-eval's protocol)."""
        return self._answer(requests, self._multi_round_batch, lambda record: record["prediction"], unscored=[], batchable=False)

    # -- shared driver ------------------------------------------------------------------------------
    def _answer(
        self, requests: list[Instance], run_batch: Callable, cached: Callable, unscored: object = None, batchable: bool = True,
    ) -> list:
        """Each request's answer: from the run folder, or computed in batches and appended to it;
        `unscored` for a skipped document's requests (lmms-eval scores none of them)."""
        results: list = [None] * len(requests)
        pending: list[int] = []
        first_of: dict[tuple, int] = {}  # distributed runs pad ranks with clones of a request: answer once
        duplicates: dict[int, int] = {}
        for index, request in enumerate(requests):
            key = (request.task_name, int(request.doc_id), int(request.idx))
            record = self.run.finished.get(key)
            if record is not None:
                results[index] = cached(record)
            elif key in first_of:
                duplicates[index] = first_of[key]
            else:
                first_of[key] = index
                pending.append(index)
        with _TaskProgress(requests, self.run, enabled=self.show_progress, units=self.progress_units) as advance, _synced(self.run):
            for batch in self._batches(requests, pending, batch_size=self.batch_size if batchable else 1):
                for index, output, record in self._run_batch(run_batch, batch):
                    request = requests[index]
                    record = {
                        "task": request.task_name,
                        "doc_id": int(request.doc_id),
                        "request_index": int(request.idx),
                        "request_type": request.request_type,
                        "prediction": output,
                        **record,
                    }
                    self.run.append(record)
                    results[index] = output
                    advance(request.task_name)
        for index, original in duplicates.items():
            results[index] = results[original]
        for index, request in enumerate(requests):
            if results[index] is None:
                if (request.task_name, int(request.doc_id)) not in self.skipped:
                    raise RuntimeError(f"{request.task_name} document {int(request.doc_id)}: no answer was computed")
                results[index] = unscored
        return results

    def _run_batch(self, run_batch: Callable, batch: list[Job]) -> Iterator[tuple]:
        """`run_batch(batch)`; a request whose prompt does not fit is a bad document: the run stops,
        or (skipping) the batch is answered again without it."""
        done: set[int] = set()
        while batch:
            try:
                for answer in run_batch(batch):
                    done.add(answer[0])
                    yield answer
                return
            except _Unanswerable as error:
                if error.index is None:  # only encoding names its request here
                    raise
                bad = next(job for job in batch if job.index == error.index)
                self._bad(bad.request, error.cause)
                batch = [job for job in batch if job.index not in done and job.index != error.index]

    def _bad(self, request: Instance, cause: str) -> None:
        """A document the run cannot answer: stop (BadDocument), or skip it and leave it unscored."""
        task, doc_id = request.task_name, int(request.doc_id)
        if not self.skip_bad_documents:
            raise BadDocument(task, doc_id, cause, skippable=self.can_skip)
        if (task, doc_id) not in self.skipped:
            if task not in self.tasks:
                raise RuntimeError(f"{task}: no lmms-eval task object to leave document {doc_id} unscored in")
            lmms_task = self.tasks[task]
            lmms_task._instances = [i for i in lmms_task._instances if int(i.doc_id) != doc_id]
            self.skipped[task, doc_id] = cause

    def _batches(self, requests: list[Instance], pending: list[int], batch_size: int) -> Iterator[list[Job]]:
        """Group by task and generation kwargs, in arrival order; a group goes as soon as it is
        full, the rest at the end; what else a batch must share is the method's kind's to say
        (`MethodKind.batch_key`: the number of images on a fixed grid, whether there are images
        at all, VoCo's image sizes). Each request's visuals are read once (a dataset row decodes
        its image on every access), and at most one unfinished group per key is held in memory."""
        groups: dict[tuple, list[Job]] = defaultdict(list)
        for index in pending:
            request = requests[index]
            if (request.task_name, int(request.doc_id)) in self.skipped:
                continue
            try:
                visuals = self._visuals(request)
            except _Unanswerable as error:
                self._bad(request, error.cause)
                continue
            kwargs = request.args[1] if request.request_type != "loglikelihood" else None
            images = self.method.kind.batch_key(self.family, visuals)
            key = (request.task_name, json.dumps(kwargs, sort_keys=True, default=str), images)
            groups[key].append(Job(index, request, visuals))
            if len(groups[key]) == batch_size:
                yield groups.pop(key)
        yield from groups.values()

    def _doc(self, request: Instance) -> dict:
        *_, doc_id, task, split = request.args
        return self.task_dict[task][split][doc_id]

    def _visuals(self, request: Instance) -> list[Image.Image]:
        doc_to_visual = request.args[2]
        try:  # reading the row decodes its images (datasets' Image): a missing or corrupt file fails here
            visuals = doc_to_visual(self._doc(request)) if doc_to_visual is not None else []
            flat = [v for item in (visuals or []) for v in (item if isinstance(item, list) else [item])]
            for image in flat:
                if isinstance(image, Image.Image):
                    image.load()  # the pixels too: a truncated file fails here, not in the processor
        except Exception as error:  # a data problem of this one document
            raise _Unanswerable(f"its image cannot be read ({_cause(error)})") from error
        if not all(isinstance(v, Image.Image) for v in flat):
            from vtcbench.tasks import short_name

            kind = next(type(v).__name__ for v in flat if not isinstance(v, Image.Image))
            raise VtcbenchError(f"task {short_name(request.task_name)!r} gives {kind} visuals (video or other media); "
                                "vtcbench run evaluates image tasks (the engine compresses Qwen videos, but lmms-eval's "
                                "video loading is not wired yet)")
        return self.family.evaluation_images(flat, self.model.config)

    # -- encoding and batching ------------------------------------------------------------------------
    def _encode(self, prompt: str, visuals: list[Image.Image], index: int, context: str) -> _Encoded:
        encoded = _Encoded(**vars(encode(self.processor, self.model, prompt, visuals, context)), request_index=index)
        length = int(encoded.input_ids.shape[0])
        if self.context is not None and length > self.context:
            raise _Unanswerable(f"its prompt of {length} tokens does not fit the model's context of {self.context}", index)
        return encoded

    def _collate(self, items: list[_Encoded]) -> dict:
        """Left-pad into one batch (`generation.collate`)."""
        return collate(items, self.tokenizer, self.family, self.model)

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate_batch(self, jobs: list[Job]):
        max_new_tokens, until = generation_settings(jobs[0].request, self.rules)
        items = self._encode_jobs(jobs)
        grids = [self.family.token_grid(item.pixels, item.image_tokens) if self._records_kept(job) else None for job, item in zip(jobs, items)]
        recorded = [grid is not None for grid in grids]
        answer = self._timed_generate(self.method, items, max_new_tokens, until, record_kept=any(recorded))
        reference = self._timed_generate(VANILLA, items, max_new_tokens, until) if self.fidelity else None
        for row, item in enumerate(items):
            text, new_tokens = answer.outputs[row]
            record = {
                **answer.timing,
                "new_tokens": new_tokens,
                "prompt_tokens": int(item.input_ids.shape[0]),
                "image_tokens": item.image_tokens,
                "image_tokens_per_layer": answer.image_tokens_per_layer[row],
            }
            if reference is not None:
                vanilla_text = reference.outputs[row][0]
                record["vanilla_prediction"] = vanilla_text
                record["agrees_with_vanilla"] = _normalise(text) == _normalise(vanilla_text)
                record["first_token_kl"] = _kl(reference.first_logits[row], answer.first_logits[row])
            if recorded[row]:
                kept = answer.kept
                record.update(self._kept_record(
                    jobs[row], grids[row],
                    {layer: indices[row] for layer, indices in kept.kept.items()},
                    {layer: merged[row] for layer, merged in kept.merged.items()},
                ))
            yield item.request_index, text, record

    def _records_kept(self, job: Job) -> bool:
        """Whether this request's kept image tokens are recorded: one image, among the first
        `keep_indices` documents (and its tokens must form one grid: `family.token_grid`)."""
        return int(job.request.doc_id) < self.keep_indices and len(job.visuals) == 1

    def _kept_record(self, job: Job, grid: tuple[int, int], kept: dict[int, list[int]], merged: dict[int, list[list[int]]]) -> dict:
        """The kept image tokens per layer where they change (and, where tokens were merged, the
        original tokens in each new one), the token grid, and the image (saved in the run folder)
        for a retention picture."""
        relative = Path("retention") / f"{job.request.task_name}__{int(job.request.doc_id)}.png"
        self.run.save_image(relative, job.visuals[0])
        record = {"kept_image_tokens": {str(layer): indices for layer, indices in sorted(kept.items())},
                  "image_grid": list(grid), "retention_image": str(relative)}
        if merged:
            record["merged_image_tokens"] = {str(layer): groups for layer, groups in sorted(merged.items())}
        return record

    def _encode_jobs(self, jobs: list[Job]) -> list[_Encoded]:
        return [self._encode(self._prompt(job.request.args[0], len(job.visuals)), job.visuals, job.index, job.request.args[0])
                for job in jobs]

    def _timed_generate(
        self, method: Method, items: list[_Encoded], max_new_tokens: int, until: list[str], record_kept: bool = False
    ) -> _Generated:
        """One batch answered by `method`'s session (with vanilla's for --fidelity), and its timing."""
        generated = self._sessions[id(method)].generate(
            items, max_new_tokens=max_new_tokens, until=until, first_logits=self.fidelity, record_kept=record_kept,
        )
        timing = {"prefill_ms": generated.prefill_ms, "decode_ms": generated.decode_ms, "batch_size": len(items), **generated.extra}
        return _Generated(self._answers(generated.new_tokens, until), timing, generated.first_logits,
                          generated.image_tokens_per_layer, generated.kept)

    def _answers(self, new: torch.Tensor, until: list[str]) -> list[tuple[str, int]]:
        """(text, tokens generated) per row of generated ids: cut after EOS, then at a stop string."""
        return decode(self.tokenizer, new, until, strip=self.rules.strip)

    # -- log-likelihood ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_batch(self, jobs: list[Job]):
        """The continuation's loss given the prompt, under compression: one forward of prompt + continuation; the
        continuation is text at the end, which no method drops."""
        for job in jobs:
            item, n_continuation = self._loglikelihood_item(job)
            scored = self._sessions[id(self.method)].score(item)
            score = continuation_score(scored.logits, scored.input_ids, n_continuation)
            counted = scored.image_tokens_per_layer  # VoCo's masked single pass counts none
            yield job.index, score, {} if counted is None else {"image_tokens_per_layer": counted}

    def _loglikelihood_item(self, job: Job) -> tuple[_Encoded, int]:
        """The encoded prompt + continuation of a log-likelihood request, and the continuation's length."""
        request, visuals = job.request, job.visuals
        context, target = request.args[0], request.args[1]
        continuation = target if isinstance(target, str) else target(self._doc(request))
        prompt_length = self._encode(self._prompt(context, len(visuals)), visuals, job.index, context).input_ids.shape[0]
        item = self._encode(self._prompt(context, len(visuals), continuation), visuals, job.index, context)
        return item, item.input_ids.shape[0] - prompt_length

    # -- multi-round -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _multi_round_batch(self, jobs: list[Job]):
        (job,) = jobs
        index, request, visuals = job.index, job.request, job.visuals
        context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        rounds, info, round_index = [], None, 0
        until = (gen_kwargs or {}).get("until") or []
        until = [u for u in ([until] if isinstance(until, str) else until) if u not in self.rules.ignored_stops]
        max_new_tokens = int((gen_kwargs or {}).get("max_new_tokens", self.rules.default_max_new_tokens))
        while True:
            if round_index:
                visuals, context, terminal, rounds, info = doc_to_text(
                    doc, previous_output=rounds, round_idx=round_index, previous_round_info=info
                )
                if terminal:
                    break
                visuals = self.family.evaluation_images(list(visuals or []), self.model.config)
            item = self._encode(self._prompt(context, len(visuals)), visuals, index, context)
            ((text, _),) = self._timed_generate(self.method, [item], max_new_tokens, until).outputs
            rounds = [*rounds, text]
            round_index += 1
        yield index, list(rounds), {"rounds": len(rounds)}


def generation_settings(request: Instance, rules: AnswerRules = AnswerRules()) -> tuple[int, list[str]]:
    """(max_new_tokens, stop strings) of a generation request as the family's class reads it
    (its default length, without the stop strings it ignores); sampling is refused."""
    gen_kwargs = dict(request.args[1] or {})
    until = gen_kwargs.pop("until", None) or []
    until = [u for u in ([until] if isinstance(until, str) else until) if u not in rules.ignored_stops]
    max_new_tokens = int(gen_kwargs.pop("max_new_tokens", rules.default_max_new_tokens))
    if float(gen_kwargs.pop("temperature", 0) or 0) > 0 or gen_kwargs.pop("do_sample", False):
        raise ValueError(f"{request.task_name}: vtcbench decodes greedily; the task asks for sampling")
    return max_new_tokens, until


def continuation_score(logits: torch.Tensor, input_ids: torch.Tensor, n_continuation: int) -> list:
    """[loss, whether greedy decoding gives the continuation] from a batch-1 forward's logits.

    The loss is the continuation's mean negative log-likelihood per token, what lmms-eval's own
    `llava_hf` returns: lmms-eval 0.7.3 reads a log-likelihood response as a loss (its
    multiple-choice scoring takes the argmin over the choices), so log P would pick the least
    likely choice."""
    targets = input_ids[0, -n_continuation:]
    log_probs = logits[0, -n_continuation - 1 : -1].float().log_softmax(-1)
    loss = -float(log_probs.gather(1, targets[:, None]).mean())
    return [loss, bool((log_probs.argmax(-1) == targets).all())]


@contextmanager
def _synced(run: RunFolder) -> Iterator[None]:
    """Whatever ends the work (done, an error, Ctrl-C), the samples written so far reach the disk."""
    try:
        yield
    finally:
        run.sync()


class _TaskProgress:
    """One rich progress bar per task, with ETA; finished (resumed) samples start filled."""

    def __init__(self, requests: list[Instance], run: RunFolder, enabled: bool, units: int = 1):
        totals: dict[str, int] = defaultdict(int)
        finished: dict[str, int] = defaultdict(int)
        for request in requests:
            totals[request.task_name] += 1
            if (request.task_name, int(request.doc_id), int(request.idx)) in run.finished:
                finished[request.task_name] += 1
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), disable=not enabled,
        )
        self.bars = {
            name: self.progress.add_task(name, total=total * units, completed=finished[name] * units)
            for name, total in totals.items()
        }
        self.units = units

    def __enter__(self) -> Callable[[str], None]:
        self.progress.start()
        return lambda task: self.progress.advance(self.bars[task], self.units)

    def __exit__(self, *exc) -> None:
        self.progress.stop()
