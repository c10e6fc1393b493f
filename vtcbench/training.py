"""`vtcbench train`: trains vtc-tiny on vtcshapes, optionally with a compression method active.

Why it is built this way (docs/vtc-tiny.md#why-it-is-built-this-way):
- The data are drawn fresh every step from a seeded generator, so a run is a function of its seed
  (torch's CPU kernels are deterministic at a fixed thread count); held-out scenes never appear.
- Two auxiliary per-patch losses stand in for LLaVA's pretrained parts (`AuxiliaryHeads`): with
  the language-model loss alone the model does not learn to look.
- Compression-aware training runs the same engine as inference under autograd; scoring uses the
  last prompt token (the answer is teacher-forced after it), as PyramidDrop's training does.
- Accuracy is measured the way `vtcbench run` measures it: the processor, greedy generation,
  exact match of the normalised answer.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vtcbench import shapes
from vtcbench.engine import compress
from vtcbench.errors import VtcbenchError
from vtcbench.families import ModelFamily, family_of, model_facts
from vtcbench.methods import Method, get_method
from vtcbench.methods.stf import FusingMethod
from vtcbench.models import build_local_processor, load_config, load_model, random_model
from vtcbench.schedules import Stage, describe, label, stages
from vtcbench.shapes import TEST_PER_FAMILY, TEST_SEED
from vtcbench.tasks.vtcshapes.utils import normalise
from vtcbench.transformers_seam import save_checkpoint

TRAINABLE_MODELS: tuple[str, ...] = ("vtc-tiny", "vtc-tiny-qwen")  # models whose vocabulary covers vtcshapes
DEFAULT_STEPS = 2400
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def vocabulary(system: str) -> tuple[str, ...]:
    """The model's words: the chat template's and vtcshapes' (split as the tokenizer splits)."""
    from tokenizers import pre_tokenizers

    template = [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(f"{system} USER: ASSISTANT:")]
    return tuple(dict.fromkeys([*template, *shapes.WORDS]))


def held_out_split(per_family: int = TEST_PER_FAMILY) -> list[shapes.Sample]:
    """The benchmark's held-out split (its first `per_family` questions of each family)."""
    return shapes.split(TEST_SEED, TEST_PER_FAMILY)[: per_family * len(shapes.FAMILIES)]


@dataclass
class TrainConfig:
    out: Path
    model: str = "vtc-tiny"
    method: Method = field(default_factory=lambda: get_method("vanilla"))
    schedule: str | None = None
    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    lr: float = 2e-3
    aux_weight: float = 1.0
    seed: int = 0
    log_every: int = 100
    time_every: int = 0  # >0: also time a vanilla step every N steps (side-by-side time ratio)
    test_per_family: int = TEST_PER_FAMILY  # held-out questions per family for the final accuracy
    init: str | None = None  # start from these weights (a model name or folder) instead of random ones
    #: with `init`: split it over devices as it loads (`--device-map`, `--max-memory`), every part
    #: on a device that computes it (no offload: an offloaded weight would not be the one updated)
    device_map: str | dict | None = None
    max_memory: dict | None = None

    @property
    def compressed(self) -> bool:
        """Whether any compression is active during training."""
        return self.schedule is not None or self.method.name != "vanilla"


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    prompt_length: int  # columns up to the first question's `ASSISTANT:` (left-padded to one width)
    targets: torch.Tensor  # [batch, columns after the prompt]: next-token targets, -100 where none
    colour: torch.Tensor  # [batch, cells] auxiliary targets
    content: torch.Tensor


def pixels(scenes: list[shapes.Scene]) -> torch.Tensor:
    """What the CLIP processor makes of a rendered scene (no resize or crop at 112 px): [batch, 3, H, W]."""
    images = torch.from_numpy(np.stack([scene.render() for scene in scenes])).float().div(255)
    return ((images - CLIP_MEAN) / CLIP_STD).permute(0, 3, 1, 2).contiguous()


def image_inputs(scenes: list[shapes.Scene], image_processor=None) -> dict[str, torch.Tensor]:
    """The model's image inputs for rendered scenes: LLaVA's CLIP pixels computed directly (the
    processor's result at 112 px, as vtc-tiny was trained), or what a family's own image
    processor makes of them (Qwen: resized to the model's resolution, patches and their grid)."""
    if image_processor is None:
        return {"pixel_values": pixels(scenes)}
    images = [Image.fromarray(scene.render()) for scene in scenes]
    return dict(image_processor(images=images, return_tensors="pt"))


class Encoder:
    """Conversations -> teacher-forced batches in the vicuna_v1 multi-turn format:
    `<system> USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...`.

    The first prompt is exactly the single-turn prompt of `vtcbench run` (left-padded so that all
    first prompts end in the same column); later turns are right-padded. Loss on answers and `</s>`.
    """

    def __init__(
        self, tokenizer, family: ModelFamily, image_tokens: int, system: str, prompt: Callable[[str, str], str | None] | None = None,
        image_processor=None,
    ):
        self.tokenizer = tokenizer
        self.family = family
        self.image_processor = image_processor  # None: LLaVA's CLIP pixels (`pixels`)
        self.prompt = prompt  # a method's own first prompt (voco), or None for the family's
        self.image_tokens = image_tokens
        self.system = system
        self._cache: dict[tuple[str, bool], list[int]] = {}

    def _ids(self, text: str, first: bool) -> list[int]:
        if (text, first) not in self._cache:
            if first:
                own = self.prompt(text, self.system) if self.prompt else None
                token = self.family.image_token()
                prompt = (own or self.family.prompt(text, 1, system=self.system)).replace(token, token * self.image_tokens)
                ids = self.tokenizer(prompt)["input_ids"]
            else:
                ids = self.tokenizer(self.family.follow_up(text), add_special_tokens=False)["input_ids"]
            self._cache[text, first] = ids
        return self._cache[text, first]

    def _answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise VtcbenchError(f"answer {answer!r} is not one word of the vocabulary")
        return [*ids, self.tokenizer.eos_token_id]

    def __call__(self, conversations: list[list[shapes.Sample]]) -> Batch:
        firsts = [self._ids(turns[0].question, True) for turns in conversations]
        width = max(map(len, firsts))
        tails, tail_targets = [], []
        for turns in conversations:
            tail: list[int] = []
            targets: list[int] = []
            for index, turn in enumerate(turns):
                question = [] if index == 0 else self._ids(turn.question, False)
                answer = self._answer_ids(turn.answer)
                tail += question + answer
                targets += [-100] * len(question) + answer
            tails.append(tail)
            tail_targets.append(targets)
        tail_width = max(map(len, tails))
        pad = self.tokenizer.pad_token_id
        ids, mask, target_rows = [], [], []
        for first, tail, targets in zip(firsts, tails, tail_targets):
            left, right = width - len(first), tail_width - len(tail)
            ids.append([pad] * left + first + tail + [pad] * right)
            mask.append([0] * left + [1] * (len(first) + len(tail)) + [0] * right)
            target_rows.append(targets + [-100] * right)
        labels = [turns[0].scene.cell_labels() for turns in conversations]
        return Batch(
            inputs={
                "input_ids": torch.tensor(ids),
                "attention_mask": torch.tensor(mask),
                **image_inputs([turns[0].scene for turns in conversations], self.image_processor),
            },
            prompt_length=width,
            targets=torch.tensor(target_rows),
            colour=torch.from_numpy(np.stack([label[0] for label in labels])),
            content=torch.from_numpy(np.stack([label[1] for label in labels])),
        )


class AuxiliaryHeads(nn.Module):
    """Two per-patch objectives that stand in for LLaVA's pretrained parts (docs/vtc-tiny.md#why-it-is-built-this-way):
    colour and content classifiers on the projector's input (CLIP's pretraining: a tower whose
    patches say what they show), and on the projector's output, the image token's dot product with
    the word embeddings of its colour and its shape or letter (LLaVA's stage-1 feature alignment:
    image tokens land in the language model's word space, so a question word finds its patches)."""

    def __init__(self, width: int, embeddings: nn.Embedding, tokenizer):
        super().__init__()
        self.colour = nn.Linear(width, shapes.N_COLOR_CLASSES)
        self.content = nn.Linear(width, shapes.N_CONTENT_CLASSES)
        self.embeddings = embeddings
        self.tokenizer = tokenizer
        ids = tokenizer.convert_tokens_to_ids
        self.register_buffer("colour_words", torch.tensor(ids(list(shapes.COLORS))), persistent=False)
        self.register_buffer("content_words", torch.tensor(ids([*shapes.SHAPES, *shapes.LETTERS])), persistent=False)

    def loss(self, tower: torch.Tensor, image_tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
        ce = nn.functional.cross_entropy
        tower = tower[..., : self.colour.in_features]  # MBTF's input: the model's own feature layer comes first
        per_cell = tower.shape[1] // batch.colour.shape[1]  # patches per cell (Qwen: a 2x2 unit per cell)
        colour_labels, content_labels = (labels.repeat_interleave(per_cell, dim=1) for labels in (batch.colour, batch.content))
        classify = ce(self.colour(tower).flatten(0, 1), colour_labels.flatten()) + ce(
            self.content(tower).flatten(0, 1), content_labels.flatten()
        )
        if image_tokens.shape[1] != batch.colour.shape[1]:  # a fusing projector (STF): no token per cell to align
            return classify
        tokens = image_tokens.flatten(0, 1)
        colour, content = batch.colour.flatten(), batch.content.flatten()
        coloured = (colour > 0) & (colour <= len(shapes.COLORS))  # shapes' cells (the letter is white)
        shown = content > 0
        words = self.embeddings.weight.to(tokens.device)
        align = ce(tokens[coloured] @ words[self.colour_words].T, colour[coloured] - 1) + ce(
            tokens[shown] @ words[self.content_words].T, content[shown] - 1
        )
        return classify + align


def training_conversations(seed: int, exclude: set[str]) -> Callable[[int], list[list[shapes.Sample]]]:
    """A stream of batches of conversations (one scene each), held-out scenes skipped."""
    rng = np.random.default_rng([seed, 1])

    def draw(n: int) -> list[list[shapes.Sample]]:
        out = []
        while len(out) < n:
            candidate = shapes.conversation(rng)
            if candidate[0].scene.key() not in exclude:
                out.append(candidate)
        return out

    return draw


@dataclass
class TrainResult:
    out: Path
    seconds: float
    steps: int
    stages: str
    accuracy: dict[str, dict[str, float]]  # test method label -> family -> accuracy (and "overall")
    time_ratio: float | None  # measured compressed step time / vanilla step time, side by side
    log: list[dict] = field(default_factory=list)


def trained_config(config: TrainConfig) -> Any:
    """The architecture training builds: the model's config, its tower trimmed to what the losses
    reach when the weights start random."""
    model_config = load_config(config.model)
    if config.init is None:
        family_of(model_config).trim_tower_for_training(model_config)
    return model_config


def train(config: TrainConfig, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Train from seeded random weights (or `config.init`'s); save model, processor, log and model
    card to `config.out`."""
    model_config = trained_config(config)
    facts = model_facts(model_config)
    stage_list = stages(config.schedule, config.method, config.steps, facts.n_layers)
    for stage in stage_list:
        stage.method.validate_for(facts.image_tokens, facts.n_layers)
    torch.manual_seed(config.seed)
    family = family_of(model_config)
    system = family.system_prompt(model_config)
    if config.init is None:
        model = random_model(model_config, seed=config.seed, attn_implementation="sdpa").train()
        processor = build_local_processor(model_config, vocabulary(system))
    else:  # fine-tuning, as VoCo-LLaMA and STF start from a trained LLaVA
        model, processor = load_model(config.init, attn_implementation="sdpa", device_map=config.device_map,
                                      max_memory=config.max_memory)
        _check_trainable_placement(model)
        model.train()
    config.method.prepare_training(model, processor)  # voco adds its token; STF / TokenConcat install their projector
    heads = AuxiliaryHeads(facts.vision_hidden_size, model.get_input_embeddings(), processor.tokenizer)
    encoder = Encoder(
        processor.tokenizer, family, facts.image_tokens, system, config.method.prompt,
        None if family.fixed_image_grid else processor.image_processor,
    )
    draw = training_conversations(config.seed, {s.scene.key() for s in held_out_split()})
    parameters = [*model.parameters(), *heads.colour.parameters(), *heads.content.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)

    features: list[torch.Tensor] = []
    hook = family.projector(model).register_forward_hook(lambda _m, args, out: features.append((args[0], out)))
    log: list[dict] = []
    timing = {"method": 0.0, "vanilla": 0.0}
    start = time.perf_counter()
    running = {"lm": 0.0, "aux": 0.0, "n": 0}
    try:
        for index, stage in enumerate(stage_list):
            end = stage_list[index + 1].first_step if index + 1 < len(stage_list) else config.steps
            for step in range(stage.first_step, end):
                batch = encoder(draw(config.batch_size))
                batch.inputs.update(family.token_inputs(model_config, batch.inputs["input_ids"]))
                timed = config.time_every > 0 and step % config.time_every == 0
                if timed:  # the same batch without compression, gradients discarded
                    timing["vanilla"] += _timed_step(model, heads, get_method("vanilla"), batch, features, config)
                    optimizer.zero_grad(set_to_none=True)
                tick = time.perf_counter()
                lm, aux = _step(model, heads, stage.method, batch, features, config)
                nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if timed:
                    timing["method"] += time.perf_counter() - tick
                running["lm"] += lm
                running["aux"] += aux
                running["n"] += 1
                if (step + 1) % config.log_every == 0 or step + 1 == end:  # and at the end of each stage
                    entry = {
                        "step": step + 1,
                        "lm_loss": running["lm"] / running["n"],
                        "aux_loss": running["aux"] / running["n"],
                        "lr": scheduler.get_last_lr()[0],
                        "seconds": time.perf_counter() - start,
                        "method": label(stage.method),
                    }
                    log.append(entry)
                    running = {"lm": 0.0, "aux": 0.0, "n": 0}
                    if progress:
                        progress(entry)
    finally:
        hook.remove()
    seconds = time.perf_counter() - start
    model.eval()

    test = held_out_split(config.test_per_family)
    # a fusing projector's model answers only with its own method (its prompt carries the fused count)
    fused = isinstance(config.method, FusingMethod)
    accuracy = {} if fused else {"vanilla": evaluate(model, processor, test, get_method("vanilla"))}
    compressed = _test_method(config, stage_list)
    if compressed is not None:
        accuracy[label(compressed)] = evaluate(model, processor, test, compressed)
    time_ratio = timing["method"] / timing["vanilla"] if timing["vanilla"] else None
    result = TrainResult(config.out, seconds, config.steps, describe(stage_list, config.steps), accuracy, time_ratio, log)
    save(model, processor, config, result)
    return result


def _test_method(config: TrainConfig, stage_list: list[Stage]) -> Method | None:
    """The compression to test with: the trained method, or a schedule's first (heaviest) stage."""
    if config.schedule is not None:
        return stage_list[0].method
    return None if config.method.name == "vanilla" else config.method


def _check_trainable_placement(model: nn.Module) -> None:
    """Refuse a split that offloads weights: accelerate loads an offloaded weight for each forward
    and drops it after, so the optimizer would update a copy, not the weight the next step reads."""
    placed = set(getattr(model, "hf_device_map", {}).values())
    offloaded = "disk" in placed or ("cpu" in placed and any(not isinstance(d, str) or d.startswith("cuda") for d in placed - {"cpu"}))
    if offloaded:
        raise VtcbenchError(
            "--device-map: training needs every weight on a device that computes it; this split offloads some "
            f"({', '.join(sorted(map(str, placed)))}); raise --max-memory or use more GPUs"
        )


def _step(model, heads, method: Method, batch: Batch, features: list, config: TrainConfig) -> tuple[float, float]:
    features.clear()
    after = batch.targets.shape[1]
    masked = method.training_inputs(model, heads.tokenizer, batch.inputs)
    if masked is not None:  # a method that trains through its own attention mask (voco)
        logits = model(**masked, logits_to_keep=after + 1).logits
    else:
        with compress(model, method) as engine:  # compression shortens the image span; the text after it stays
            engine.prompt_length = batch.prompt_length
            logits = model(**engine.prepare(batch.inputs), logits_to_keep=after + 1).logits
    lm = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.targets.flatten(), ignore_index=-100)
    tower, image_tokens = family_of(model).training_features(model.config, *features[0], batch.colour.shape[0])
    device = batch.targets.device  # the batch's (a split model's tower and projector may sit elsewhere)
    aux = heads.loss(tower.to(device), image_tokens.to(device), batch)
    (lm + config.aux_weight * aux).backward()
    return lm.item(), aux.item()


def _timed_step(model, heads, method: Method, batch: Batch, features: list, config: TrainConfig) -> float:
    tick = time.perf_counter()
    _step(model, heads, method, batch, features, config)
    return time.perf_counter() - tick


@torch.no_grad()
def evaluate(model, processor, samples: list[shapes.Sample], method: Method, batch_size: int = 50) -> dict[str, float]:
    """Exact-match accuracy per family and overall, by greedy generation through the processor,
    the way the method's kind answers (`method.kind.session`: the engine, or VoCo's compressed cache)."""
    correct: dict[str, list[bool]] = {family: [] for family in shapes.FAMILIES}
    for first in range(0, len(samples), batch_size):
        chunk = samples[first : first + batch_size]
        # a session per chunk: VoCo's store of compressed images starts empty, so each chunk's
        # images are compressed in that chunk's batch
        session = method.kind.session(model, processor, method)
        answers = session.answer([s.question for s in chunk], [Image.fromarray(s.scene.render()) for s in chunk], max_new_tokens=4)
        for sample, (text, _) in zip(chunk, answers):
            correct[sample.family].append(normalise(text) == normalise(sample.answer))
    scores = {family: float(np.mean(hits)) for family, hits in correct.items()}
    scores["overall"] = float(np.mean([hit for hits in correct.values() for hit in hits]))
    return scores


def save(model, processor, config: TrainConfig, result: TrainResult) -> None:
    """Write into `<out>.partial`, then rename: an interrupted run leaves no half model folder."""
    out = Path(config.out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one 7 MB shard: no "Writing model shards" bar in the report
    save_checkpoint(model, partial)  # the llava-hf layout, which every supported transformers reads
    processor.save_pretrained(partial)
    record = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "method"},
        "method": label(config.method),
        "stages": result.stages,
        "seconds": result.seconds,
        "accuracy": result.accuracy,
        "time_ratio": result.time_ratio,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "log": result.log,
    }
    (partial / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    n_parameters = sum(p.numel() for p in model.parameters())
    (partial / "README.md").write_text(model_card(config, result, n_parameters))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def model_card(config: TrainConfig, result: TrainResult, n_parameters: int) -> str:
    """What the folder holds, how it was made, what it scored, and what it is not."""
    command = f"vtcbench train --model {config.model} --seed {config.seed} --steps {config.steps}"
    if config.batch_size != TrainConfig.batch_size:
        command += f" --batch-size {config.batch_size}"
    if config.init:
        command += f" --init {config.init}"
    if config.init or config.lr != TrainConfig.lr:
        command += f" --lr {config.lr:g}"
    if config.schedule:
        command += f" --method llavolta --schedule {config.schedule}"
    elif config.method.name != "vanilla":
        command += f" --method {config.method.name}" + "".join(
            f" --set {k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in config.method.params().items()
        )
    rows = "\n".join(
        f"| {tested} | " + " | ".join(f"{100 * scores[k]:.1f}" for k in (*shapes.FAMILIES, "overall")) + " |"
        for tested, scores in result.accuracy.items()
    )
    reference = next(iter(result.accuracy.values()))  # vanilla's, or a fusing projector's own method's
    weak = [f"{family} {100 * reference[family]:.1f}" for family in shapes.FAMILIES if reference[family] < 0.8]
    chance = ", ".join(f"{family} {100 * p:.1f}" for family, p in shapes.CHANCE.items())
    weak_line = (
        f"- Not reliable on every family: below 80% held-out on {', '.join(weak)} (chance: {chance});\n"
        "  where it is near chance, compression results on that family are noise.\n"
        if weak
        else ""
    )
    compressed_line = (
        "- Not a vanilla-trained model: compression was active during training (stages above), so\n"
        "  methods that compress the way it was trained (pooling, for LLaVolta's schedules) may lose\n"
        "  less on it than on a model trained without compression.\n"
        if config.compressed
        else ""
    )
    model_config = trained_config(config)
    family = family_of(model_config)
    facts, model_class = model_facts(model_config), family.model_class(model_config).__name__
    tower, projector, decoder = family.card_parts(model_config, facts)
    if isinstance(config.method, FusingMethod):
        projector = f"the trained projector of {config.method.name} (`vtcbench_projector` in config.json; it runs only with --method {config.method.name})"
    system = family.system_prompt(model_config)
    own = config.method.prompt("<question>", system)  # a method's own layout (voco), or None
    layout = (own or family.prompt("<question>", 1, system=system)).replace(chr(10), chr(92) + "n")
    prompt_line = f"with {config.method.name}'s layout: `{layout}`" if own else f"as its family is evaluated: `{layout}`"
    return f"""# {config.model}: a {model_class} trained by vtcbench on vtcshapes

## What it is
- `{model_class}` (loads with transformers like the hub's checkpoints of its family):
  {tower}, {projector}, and {decoder}, {n_parameters / 1e6:.2f}M parameters in float32.
  The tokenizer is word-level ({facts.vocab_size} ids): the chat template's words and vtcshapes'
  words; anything else is `<unk>`.
- Trained from {f"the weights of {config.init}" if config.init else "random initialisation, with no pretrained component,"} by `{command}`:
  {result.steps} steps of {config.batch_size} scenes drawn fresh from vtcshapes' generator (held-out
  scenes excluded), each with its questions as one multi-turn conversation, AdamW with a one-cycle learning rate peaking at {config.lr:g}, language-model loss on
  the one-word answers plus two auxiliary per-patch losses, the small-scale stand-ins for a VLM's
  pretrained parts: colour and content classifiers on the vision tower's patch features (what a
  pretrained tower gives), and each image token's match with the word embeddings of its colour
  and shape (stage-1 feature alignment). Stages: {result.stages}.
  Training took {result.seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads.
- Prompted {prompt_line}.

## Held-out accuracy (vtcshapes test split, {config.test_per_family} questions per family, greedy, exact match, %)
| tested with | {" | ".join(shapes.FAMILIES)} | overall |
|---|{"---|" * (len(shapes.FAMILIES) + 1)}
{rows}

## What it is not
{weak_line}{compressed_line}- Not a general vision-language model: it has seen only vtcshapes scenes (coloured shapes and one
  letter on an 8x8 grid) and answers with one word.
- Not a stand-in for the full-size models' accuracy numbers: compression results on it show the mechanics of
  each method (which tokens it keeps, what pooling mixes) at small scale, not the papers' magnitudes.
- Its images are clean and sparse: a shape covers 4 of the {facts.image_tokens} visual tokens and the letter 1, on a
  black background, so which tokens a method drops decides the answer more sharply than on
  natural images, where an object spreads over many tokens and the background carries context.
"""
