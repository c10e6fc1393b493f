"""Profile one method on synthetic inputs of a chosen shape: latency per phase, memory, energy,
FLOPs, and optionally a training step (docs/architecture.md#profiling).

Phases are timed from the outside: forward hooks on the vision tower, the projector and the
language model, the engine's `overhead` seam for the method's own work, and a logits processor
for time to first token and per-token decode. Nothing inside the model is changed.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessorList

from vtcbench.engine import QUESTIONS, compress
from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of, model_facts
from vtcbench.methods.base import Method
from vtcbench.profilers.energy import EnergyMeter, EnergyReport
from vtcbench.profilers.flops import analytic_flops
from vtcbench.profilers.fvcore_count import TraceFailed, fvcore_language_model_macs
from vtcbench.profilers.latency import Latency, PhaseTimer, TokenMarker
from vtcbench.profilers.memory import MemoryReport, PeakMemory, model_gpus
from vtcbench.profilers.opcount import count_ops
from vtcbench.provenance import provenance
from vtcbench.transformers_seam import cache_nbytes, returned_cache

INFERENCE_PHASES = ("vision_encoder", "projector", "method_overhead", "llm_prefill", "ttft", "decode_per_token", "end_to_end")


@dataclass(frozen=True)
class Shape:
    image_tokens: int
    text_tokens: int
    new_tokens: int
    batch: int


@dataclass
class ProfileRecord:
    model: str
    method: str
    params: dict
    shape: Shape
    provenance: dict
    latency_ms: dict[str, Latency]
    memory: MemoryReport
    energy: EnergyReport
    flops: dict
    opcount: dict  # measured multiply-accumulates of one sample's prefill (cross-check of `flops`)
    fvcore: dict  # the language model's multiply-accumulates as fvcore's trace counts them (second counter)
    iterations: int
    train_step_ms: Latency | None = None
    train_step_vanilla_ms: Latency | None = None

    @property
    def train_time_ratio(self) -> float | None:
        if self.train_step_ms is None or self.train_step_vanilla_ms is None:
            return None
        return self.train_step_ms.median_ms / self.train_step_vanilla_ms.median_ms

    def to_dict(self) -> dict:
        record = asdict(self)
        record["train_time_ratio_to_vanilla"] = self.train_time_ratio
        return record


def synthetic_inputs(model: torch.nn.Module, shape: Shape, *, seed: int = 0) -> dict:
    """A prompt of `text_tokens` non-image tokens (half before the image, the rest after, so the
    last prompt token is text) around the image placeholders, repeated `batch` times."""
    config, family = model.config, family_of(model)
    facts = model_facts(model)
    image_token = family.image_token_id(config)
    generator = torch.Generator().manual_seed(seed)
    reserved = torch.tensor([image_token, config.pad_token_id or 0])
    text = torch.randint(10, facts.vocab_size, (shape.text_tokens * 2,), generator=generator)
    text = text[~torch.isin(text, reserved)][: shape.text_tokens - 1]
    before = (shape.text_tokens - 1) // 2
    image = torch.tensor(family.image_span(config, shape.image_tokens))
    ids = torch.cat([torch.tensor([1]), text[:before], image, text[before:]]).expand(shape.batch, -1)
    pixels = family.synthetic_pixels(config, shape.batch, generator)
    pixels["pixel_values"] = pixels["pixel_values"].to(model.dtype)
    return {
        "input_ids": ids.to(model.device),
        "attention_mask": torch.ones_like(ids, device=model.device),
        **{key: value.to(model.device) for key, value in {**pixels, **family.token_inputs(config, ids)}.items()},
    }


class _PhaseHooks:
    """Forward hooks that time the vision tower, the projector and the language model's prefill."""

    def __init__(self, model: torch.nn.Module, timer: PhaseTimer):
        self.timer = timer
        self.prefill_done = False
        self.handles = []
        family = family_of(model)
        for module, name in (
            (family.vision_tower(model), "vision_encoder"),
            (family.projector(model), "projector"),
            (family.language_model(model), "llm_prefill"),
        ):
            self.handles.append(module.register_forward_pre_hook(self._starter(name)))
            self.handles.append(module.register_forward_hook(self._stopper(name)))

    def _starter(self, name: str):
        def hook(module, args):
            if name != "llm_prefill" or not self.prefill_done:
                self.timer.start(name)

        return hook

    def _stopper(self, name: str):
        def hook(module, args, output):
            if name == "llm_prefill":
                if self.prefill_done:
                    return
                self.prefill_done = True
            self.timer.stop(name)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _iteration_summary(phases: dict[str, list[float]]) -> dict[str, float]:
    """One generate() call's phases in ms (repeated phases summed; decode averaged per token)."""
    decode = phases.get("decode_token", [])
    return {
        "vision_encoder": sum(phases.get("vision_encoder", [0.0])),
        "projector": sum(phases.get("projector", [0.0])),
        "method_overhead": sum(phases.get("method_overhead", [0.0])),
        "llm_prefill": phases["llm_prefill"][0],
        "ttft": phases["ttft"][0],
        "decode_per_token": sum(decode) / len(decode) if decode else float("nan"),
        "end_to_end": phases["end_to_end"][0],
    }


def _repeat(step, *, warmup: int, iterations: int, min_seconds: float) -> int:
    """Run `step(timed)` warm-up times, then until at least `iterations` runs and `min_seconds`."""
    for _ in range(warmup):
        step(False)
    done, started = 0, time.perf_counter()
    while done < iterations or time.perf_counter() - started < min_seconds:
        step(True)
        done += 1
    return done


@torch.no_grad()
def profile_inference(
    model: torch.nn.Module, method: Method, inputs: dict, new_tokens: int, *, warmup: int, iterations: int, min_seconds: float
) -> tuple[dict[str, Latency], MemoryReport, EnergyReport, int]:
    timer = PhaseTimer(model.device)
    per_iteration: list[dict[str, float]] = []
    gpus = model_gpus(model)
    memory, energy = PeakMemory(gpus), EnergyMeter(gpus)
    with compress(model, method) as engine:
        prepared = engine.prepare(inputs)
        engine.overhead = lambda: timer.phase("method_overhead")
        hooks = _PhaseHooks(model, timer)
        try:

            def step(timed: bool) -> None:
                hooks.prefill_done = False
                marker = TokenMarker(timer)
                timer.start("end_to_end")
                timer.start("ttft")
                model.generate(
                    **prepared,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([marker]),
                )
                timer.stop("end_to_end")
                phases = timer.read()
                if timed:
                    per_iteration.append(_iteration_summary(phases))

            for _ in range(warmup):  # before the meters start: energy is per timed sample
                step(False)
            memory.reset()
            energy.start()
            iterations_done = _repeat(step, warmup=0, iterations=iterations, min_seconds=min_seconds)
            energy_report = energy.stop(iterations_done * inputs["input_ids"].shape[0])
        finally:
            hooks.remove()
        cache = returned_cache(model(**prepared, use_cache=True, logits_to_keep=1))
        memory_report = memory.read(cache_nbytes(cache))
    latency = {name: Latency.from_samples([it[name] for it in per_iteration]) for name in INFERENCE_PHASES}
    return latency, memory_report, energy_report, iterations_done


def profile_training_step(
    model: torch.nn.Module, method: Method, inputs: dict, *, warmup: int, iterations: int, min_seconds: float
) -> Latency:
    """Forward + backward of one training step with the method active (the papers' GPU-hours
    comparison). The loss is next-token cross-entropy on the text after the image, which stays
    at the end of the sequence whatever the method drops."""
    timer = PhaseTimer(model.device)
    samples: list[float] = []
    is_image = (inputs["input_ids"][0] == family_of(model).image_token_id(model.config)).nonzero()
    answer = min(8, inputs["input_ids"].shape[1] - int(is_image[-1]) - 2)  # predict text from text
    if answer < 1:
        raise VtcbenchError("--train needs at least 2 text tokens after the image; raise --text-tokens")
    targets = inputs["input_ids"][:, -answer:]
    with torch.enable_grad(), compress(model, method) as engine:
        prepared = engine.prepare(inputs)

        def step(timed: bool) -> None:
            model.zero_grad(set_to_none=True)
            with timer.phase("train_step"):
                logits = model(**prepared, use_cache=False).logits[:, -answer - 1 : -1]
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                loss.backward()
            duration = timer.read()["train_step"][0]
            if timed:
                samples.append(duration)

        _repeat(step, warmup=warmup, iterations=iterations, min_seconds=min_seconds)
    model.zero_grad(set_to_none=True)
    return Latency.from_samples(samples)


def _fvcore_count(model: torch.nn.Module, inputs: dict, method: Method) -> dict:
    """fvcore's count of the language model, or why its trace failed: a cross-check, so a model it
    cannot trace still gets the profile (and the reason is shown), never a made-up number."""
    try:
        return {"language_model_macs": fvcore_language_model_macs(model, inputs, method), "error": None}
    except TraceFailed as error:
        return {"language_model_macs": None, "error": str(error)}


#: the question of a profile's synthetic prompts, for methods that read it (CDPruner); the text
#: tower's cost does not depend on it (one 77-token chunk)
SYNTHETIC_QUESTION = "What is in the image?"


def measured_image_tokens(model: torch.nn.Module, method: Method, inputs: dict) -> list[int] | None:
    """The visual tokens per layer a method whose count adapts to the image applies to `inputs`
    (one prefill); None for a method with an analytic plan."""
    if not method.adaptive:
        return None
    with torch.no_grad(), compress(model, method) as engine:
        model(**engine.prepare(inputs))
    return engine.applied_image_tokens_per_layer


def profile(
    model: torch.nn.Module,
    model_name: str,
    method: Method,
    shape: Shape,
    *,
    warmup: int = 1,
    iterations: int = 5,
    min_seconds: float = 0.0,
    train: bool = False,
    vanilla: Method | None = None,
) -> ProfileRecord:
    """Everything `vtcbench profile` reports, for one method on one synthetic shape (a method that
    reads the question gets `SYNTHETIC_QUESTION`)."""
    token = QUESTIONS.set(SYNTHETIC_QUESTION)
    try:
        return _profile(model, model_name, method, shape, warmup=warmup, iterations=iterations, min_seconds=min_seconds,
                        train=train, vanilla=vanilla)
    finally:
        QUESTIONS.reset(token)


def _profile(
    model: torch.nn.Module, model_name: str, method: Method, shape: Shape, *, warmup: int, iterations: int,
    min_seconds: float, train: bool, vanilla: Method | None,
) -> ProfileRecord:
    inputs = synthetic_inputs(model, shape)
    latency, memory, energy, done = profile_inference(
        model, method, inputs, shape.new_tokens, warmup=warmup, iterations=iterations, min_seconds=min_seconds
    )
    facts = model_facts(model)
    text_tokens = inputs["input_ids"].shape[1] - shape.image_tokens  # with a family's image delimiters (Qwen's vision start/end)
    first = synthetic_inputs(model, dataclasses.replace(shape, batch=1))  # op counts are per sample, like `flops`
    flops = analytic_flops(method, facts, model=model_name, image_tokens=shape.image_tokens, text_tokens=text_tokens,
                           image_tokens_per_layer=measured_image_tokens(model, method, first))
    record = ProfileRecord(
        model=model_name,
        method=method.name,
        params=method.params(),
        shape=shape,
        provenance=provenance(model, model.device),
        latency_ms=latency,
        memory=memory,
        energy=energy,
        flops=flops.to_dict(),
        opcount=count_ops(model, first, method).to_dict(),
        fvcore=_fvcore_count(model, first, method),
        iterations=done,
    )
    if train:
        record.train_step_ms = profile_training_step(
            model, method, inputs, warmup=warmup, iterations=iterations, min_seconds=min_seconds
        )
        if vanilla is not None:
            record.train_step_vanilla_ms = profile_training_step(
                model, vanilla, inputs, warmup=warmup, iterations=iterations, min_seconds=min_seconds
            )
    return record
