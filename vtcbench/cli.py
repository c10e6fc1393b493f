"""The `vtcbench` command line: parses and validates, calls the library, renders with rich.

Bad input raises `VtcbenchError` anywhere below; `main` turns it into one line on stderr and
exit code 2, before any weights are loaded or anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vtcbench.errors import VtcbenchError

app = typer.Typer(
    name="vtcbench",
    help="Benchmark and profile visual token compression in LLaVA-family models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Piped output (files, CI logs, papers' appendices) gets wide tables instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 400)

MethodOption = Annotated[str, typer.Option("--method", "-m", help="compression method (see `vtcbench methods`)")]
ModelOption = Annotated[str, typer.Option("--model", help="alias, hub id or local folder (see `vtcbench models`)")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="method hyperparameter key=value (repeatable; lists: 8,16,24)")
]
DeviceMapOption = Annotated[
    str | None, typer.Option(help="split the model over devices as it loads: auto | balanced | balanced_low_0 | sequential | "
                                  "a JSON file of module -> device (accelerate's dispatch; the rest offloaded to disk)")
]
MaxMemoryOption = Annotated[str | None, typer.Option(help="with --device-map: per device its limit, e.g. 0=70GiB,1=70GiB,cpu=200GiB")]
BudgetOption = Annotated[
    str | None,
    typer.Option(help="tokens=N (mean visual tokens per decoder layer) or tflops=X (image-token TFLOPs): the method's "
                      "setting that costs that much, chosen and printed (docs/methods.md#budgets)"),
]


def user_errors(command):
    """Run a command; a VtcbenchError becomes one line on stderr and exit code 2."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VtcbenchError as error:
            errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


@app.command()
@user_errors
def methods() -> None:
    """List the compression methods: where they act, their defaults, what they do."""
    from vtcbench.families import FAMILIES
    from vtcbench.methods import METHODS
    from vtcbench.methods.base import MROPE_POSITIONS

    table = Table(title="compression methods")
    for column in ("name", "acts", "positions", "M-RoPE positions", "families", "defaults", "needs weights", "description"):
        wraps = column in ("description", "needs weights", "M-RoPE positions", "families", "defaults")
        table.add_column(column, no_wrap=not wraps, min_width=len(column) if column == "needs weights" else None)
    for name, cls in sorted(METHODS.items()):
        defaults = ", ".join(f"{f.name}={_format_value(f.default)}" for f in dataclasses.fields(cls)) or "-"
        positions = cls.kind.positions
        runs_on = [family for family, f in FAMILIES.items() if f.refusal(cls) is None]
        families = "all" if len(runs_on) == len(FAMILIES) else ", ".join(runs_on)
        table.add_row(
            name, cls.kind.name.replace("_", "-"), cls.position_policy if positions else "-",
            MROPE_POSITIONS[cls.position_policy] if positions else "-", families, defaults, cls.needs_weights or "-", cls.description,
        )
    console.print(table)


@app.command()
@user_errors
def models() -> None:
    """List the model aliases and the facts FLOPs counting uses (no download)."""
    from vtcbench.families import model_facts
    from vtcbench.models import MODELS, load_config

    table = Table(title="model aliases (any hub id or local folder also works)")
    for column in ("alias", "hub id", "layers", "hidden", "ffn", "heads/kv", "image tokens", "description"):
        table.add_column(column, no_wrap=column != "description")
    for alias, spec in MODELS.items():
        facts = model_facts(load_config(alias))
        table.add_row(
            alias,
            ("(shipped in the package)" if spec.weights_present else "(not trained yet: vtcbench train)") if spec.packaged
            else spec.hub_id or "(random weights only)",
            str(facts.n_layers),
            str(facts.hidden_size),
            str(facts.intermediate_size),
            f"{facts.n_heads}/{facts.n_kv_heads}",
            str(facts.image_tokens),
            spec.description,
        )
    console.print(table)


@app.command()
@user_errors
def generate(
    method: MethodOption = "fastv",
    model: ModelOption = "vtc-tiny",
    set_: SetOption = None,
    budget: BudgetOption = None,
    prompt: Annotated[str, typer.Option(help="the question about the image")] = "What letter is written in the image?",
    image: Annotated[Path | None, typer.Option(help="image file (default: a vtcshapes scene)")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 16,
    random_weights: Annotated[bool, typer.Option(help="build the architecture with random weights, offline")] = False,
    dtype: str = "float32",
    attn: Annotated[str, typer.Option(help="eager | sdpa | flash_attention_2")] = "sdpa",
    device: str = "cpu",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
) -> None:
    """Answer one question about one image with a method applied; show visual tokens per layer."""
    from vtcbench.api import answer, check_method_for_model, method_from_options
    from vtcbench.families import model_facts
    from vtcbench.models import load_config

    compression = method_from_options(method, set_ or [], budget, model_facts(load_config(model)) if budget else None)
    check_method_for_model(compression, model)
    if image is not None and not image.is_file():
        raise VtcbenchError(f"--image {str(image)!r} is not a file")
    result = answer(
        model,
        compression,
        prompt,
        image=image,
        max_new_tokens=max_new_tokens,
        random_weights=random_weights,
        dtype=dtype,
        attn_implementation=attn,
        device=device,
        **_dispatch_options(device_map, max_memory),
    )
    console.print(f"[bold]{method}[/] {compression.params()} on [bold]{model}[/]")
    console.print(f"answer: {result.text!r}")
    counts = result.image_tokens_per_layer
    console.print(f"visual tokens per layer ({len(counts)} layers): {_format_counts(counts)}")


FormatOption = Annotated[str, typer.Option("--format", help="table | json")]


def _check_format(fmt: str) -> None:
    if fmt not in ("table", "json"):
        raise VtcbenchError(f"--format {fmt!r} is not supported; valid choices: json, table")


def _check_count(option: str, value: int | None, minimum: int = 0) -> None:
    if value is not None and value < minimum:
        raise VtcbenchError(f"{option} {value} is out of range; valid: an integer >= {minimum}")


@app.command()
@user_errors
def flops(
    method: MethodOption = "vanilla",
    model: ModelOption = "llava-1.5-7b",
    set_: SetOption = None,
    budget: BudgetOption = None,
    image_tokens: Annotated[int | None, typer.Option(help="visual tokens per sample (default: the model's)")] = None,
    text_tokens: Annotated[int, typer.Option(help="text tokens in the prompt (full-sequence figure)")] = 64,
    image_size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT of the image, for dynamic-resolution families (Qwen); default 1024x768")] = None,
    convention: Annotated[str, typer.Option(help="macs (PyramidDrop, ViCo: multiply-accumulates) | flops (calflops, STF: 2 per MAC)")] = "macs",
    fmt: FormatOption = "table",
) -> None:
    """Analytic FLOPs (multiply-accumulates, the papers' FLOPs; --convention flops: 2 per MAC), visual tokens per layer, compression ratio."""
    from vtcbench.api import method_from_options
    from vtcbench.families import family_of, model_facts
    from vtcbench.models import load_config
    from vtcbench.profilers.flops import analytic_flops

    _check_format(fmt)
    _check_count("--image-tokens", image_tokens, 1)
    _check_count("--text-tokens", text_tokens, 1)
    config = load_config(model)
    size = _image_size(image_size, family_of(config), model)
    facts = model_facts(config, image_size=size)
    compression = method_from_options(method, set_ or [], budget, facts)
    family_of(config).check_method(compression)
    report = analytic_flops(
        compression, facts, model=model, image_tokens=image_tokens, text_tokens=text_tokens, convention=convention,
    )
    if fmt == "json":
        print(json.dumps(report.to_dict()))
        return
    unit = "multiply-accumulates" if convention == "macs" else "FLOPs, calflops' convention: 2 per multiply-accumulate"
    table = Table(title=f"{method} {_format_params(report.params)} on {model} ({unit})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        *([("image (resized by the processor)", f"{facts.image_size[0]}x{facts.image_size[1]}")] if facts.image_size else []),
        ("visual tokens per layer", _format_counts(report.image_tokens_per_layer)),
        ("visual tokens summed over layers", f"{report.visual_token_total:,}"),
        ("compression ratio (N*L / total)", f"{report.compression_ratio:.0%}"),
        ("TFLOPs, image tokens (papers' convention)", f"{report.tflops_image:.3g}"),
        (f"TFLOPs, decoder on image + {text_tokens} text tokens", f"{report.tflops_total:.3g}"),
        ("TFLOPs, vision encoder", f"{report.tflops_vision_encoder:.3g}"),
        ("TFLOPs, projector", f"{report.tflops_projector:.3g}"),
        ("TFLOPs, method's own selection (scores, similarities)", f"{report.tflops_method_overhead:.3g}"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command()
@user_errors
def profile(
    method: MethodOption = "vanilla",
    model: ModelOption = "llava-1.5-7b",
    set_: SetOption = None,
    budget: BudgetOption = None,
    random_weights: Annotated[bool, typer.Option(help="build the architecture with random weights, offline")] = False,
    image_tokens: Annotated[int | None, typer.Option(help="visual tokens (random weights: any square, e.g. 144)")] = None,
    text_tokens: Annotated[int, typer.Option(help="non-image prompt tokens")] = 64,
    new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 32,
    batch: Annotated[int, typer.Option(help="prompts per forward")] = 1,
    layers: Annotated[int | None, typer.Option(help="decoder layers (random weights only: smaller shapes)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | float16 | bfloat16 (default: float16 on GPU, float32 on CPU)")] = "auto",
    attn: Annotated[str, typer.Option(help="eager | sdpa | flash_attention_2")] = "sdpa",
    device: Annotated[str, typer.Option(help="default: cuda when available")] = "auto",
    iterations: Annotated[int, typer.Option(help="timed iterations, at least")] = 5,
    min_seconds: Annotated[float, typer.Option(help="keep iterating at least this long")] = 0.0,
    warmup: Annotated[int, typer.Option(help="untimed iterations first")] = 1,
    train: Annotated[bool, typer.Option("--train", help="also time a forward+backward step, with the ratio to vanilla")] = False,
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    fmt: FormatOption = "table",
) -> None:
    """Latency per phase, memory (per device), energy and FLOPs of one method on synthetic inputs (no dataset)."""
    from vtcbench.api import method_from_options
    from vtcbench.families import family_of, model_facts
    from vtcbench.methods import check_before_loading
    from vtcbench.models import load_config, load_model, random_model
    from vtcbench.profilers.session import Shape

    _check_format(fmt)
    for option, value, minimum in (
        ("--image-tokens", image_tokens, 1), ("--text-tokens", text_tokens, 2), ("--new-tokens", new_tokens, 1),
        ("--batch", batch, 1), ("--layers", layers, 1), ("--iterations", iterations, 1), ("--warmup", warmup, 0),
    ):
        _check_count(option, value, minimum)
    device, dtype = _device_and_dtype(device, dtype)
    dispatch = _dispatch_options(device_map, max_memory)
    config = load_config(model)
    facts = model_facts(config)
    if random_weights and device_map is not None:
        raise VtcbenchError("--device-map dispatches a checkpoint's weights as they load; drop --random-weights")
    if not random_weights and (layers is not None or image_tokens not in (None, facts.image_tokens)):
        raise VtcbenchError("--layers and a different --image-tokens change the architecture; add --random-weights")
    family_of(config).resize_config(config, image_tokens=None if image_tokens == facts.image_tokens else image_tokens, layers=layers)
    compression = method_from_options(method, set_ or [], budget, model_facts(config))
    facts = check_before_loading(compression, config, train=train)
    processor = None
    if random_weights:
        loaded = random_model(config, dtype=dtype, attn_implementation=attn, device=device)
    else:
        loaded, processor = load_model(model, dtype=dtype, attn_implementation=attn, device=device, **dispatch)
    shape = Shape(image_tokens=family_of(config).synthetic_image_tokens(config), text_tokens=text_tokens, new_tokens=new_tokens,
                  batch=batch)
    record = compression.kind.profile(loaded, model, compression, processor, shape, warmup=warmup, iterations=iterations,
                                      min_seconds=min_seconds, train=train)
    if fmt == "json":
        print(json.dumps(record.to_dict(), default=str))
        return
    _print_profile(record)


def _print_voco_profile(profiled) -> None:
    """VoCo-LLaMA's profile: two questions about one image (the second reuses the compressed image)."""
    record = profiled.to_dict()
    table = Table(title=f"voco {_format_params(record['params'])} on {record['model']} ({record['device']}, {record['dtype']}, "
                        f"median ms of {record['iterations']})")
    table.add_column("phase")
    for column in ("1st question (image compressed)", "2nd question (cached image)"):
        table.add_column(column, justify="right")
    for key in ("image_encoding_ms", "kv_load_ms", "transformer_forward_ms", "total_ms"):
        table.add_row(key.removesuffix("_ms").replace("_", " "), *(f"{q[key]:.2f}" for q in record["questions"]))
    console.print(table)
    storage = Table(title="KV storage per image, bf16")
    storage.add_column("strategy")
    storage.add_column("bytes", justify="right")
    for key, value in record["kv_storage_bytes_bf16"].items():
        storage.add_row(key.replace("_", " "), f"{value:,}")
    console.print(storage)


@app.command()
@user_errors
def run(
    method: MethodOption = "vanilla",
    model: ModelOption = "vtc-tiny",
    tasks: Annotated[str, typer.Option(help="comma-separated short names or lmms-eval task names")] = "vtcshapes",
    set_: SetOption = None,
    budget: BudgetOption = None,
    limit: Annotated[int | None, typer.Option(help="at most this many samples per task")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per generate() call")] = 1,
    out: Annotated[Path, typer.Option(help="folder for run folders")] = Path("results"),
    data_dir: Annotated[Path | None, typer.Option(help="local datasets: DIR/<task>.parquet or DIR/<task>/")] = None,
    seed: int = 0,
    random_weights: Annotated[bool, typer.Option(help="random weights from the shipped config (plumbing checks)")] = False,
    dtype: Annotated[str, typer.Option(help="float32 | float16 | bfloat16 (default: float16 on GPU, float32 on CPU)")] = "auto",
    attn: Annotated[str, typer.Option(help="eager | sdpa | flash_attention_2")] = "sdpa",
    device: Annotated[str, typer.Option(help="default: cuda when available")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard an existing run folder of this configuration")] = False,
    allow_judge: Annotated[bool, typer.Option("--allow-judge", help="allow tasks scored by an LLM judge")] = False,
    allow_submission: Annotated[bool, typer.Option("--allow-submission", help="allow tasks scored by a server")] = False,
    fidelity: Annotated[bool, typer.Option("--fidelity", help="also run vanilla: answer agreement, first-token KL")] = False,
    num_processes: Annotated[int, typer.Option(help="data-parallel processes (one per GPU), merged into one run folder")] = 1,
    keep_indices: Annotated[int, typer.Option(help="record the kept image tokens of the first N documents per task (retention pictures)")] = 0,
    skip_bad_documents: Annotated[bool, typer.Option("--skip-bad-documents", help="leave out documents whose image cannot be read "
                                                     "or whose prompt does not fit (listed in summary.json) instead of stopping")] = False,
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
) -> None:
    """Evaluate a method on benchmarks through lmms-eval; one resumable run folder per configuration."""
    from vtcbench.api import method_from_options
    from vtcbench.methods import parse_set_options
    from vtcbench.runner import RunConfig, check_run
    from vtcbench.runner import run as run_evaluation

    _quiet_lmms_eval_logging()
    for option, value in (("--limit", limit), ("--batch-size", batch_size), ("--num-processes", num_processes)):
        _check_count(option, value, 1)
    _check_count("--keep-indices", keep_indices, 0)
    # a budget is solved here, from the model's config, before anything loads
    params = method_from_options(method, set_ or [], budget, _run_facts(model)).params() if budget else parse_set_options(set_ or [])
    config = RunConfig(
        model=model, method=method, params=params, tasks=[t.strip() for t in tasks.split(",") if t.strip()],
        budget=budget,
        limit=limit, seed=seed, batch_size=batch_size, out=out, data_dir=data_dir, random_weights=random_weights,
        attn_implementation=attn, overwrite=overwrite, allow_judge=allow_judge, allow_submission=allow_submission,
        fidelity=fidelity, keep_indices=keep_indices, skip_bad_documents=skip_bad_documents, show_progress=sys.stderr.isatty(),
        **_dispatch_options(device_map, max_memory),
    )
    if num_processes > 1 and isinstance(config.device_map, dict):
        raise VtcbenchError("--device-map FILE names each module's device for one model; with --num-processes give a strategy "
                            "(auto, balanced, ...): each process then splits its model over its own block of GPUs")
    if num_processes > 1:  # input checked once, here; then every process runs this same command
        check_run(config)
        _relaunch_data_parallel(num_processes)
        return
    device, dtype = _device_and_dtype(device, dtype)
    result = run_evaluation(dataclasses.replace(config, device=device, dtype=dtype))  # checks everything before it loads
    if result.summary:  # rank 0 (or the only process)
        _print_summary(result)


def _dispatch_options(device_map: str | None, max_memory: str | None) -> dict:
    """`--device-map` / `--max-memory`, checked and parsed (one line on bad input)."""
    from vtcbench.models import parse_device_map, parse_max_memory

    if max_memory is not None and device_map is None:
        raise VtcbenchError("--max-memory limits --device-map's dispatch; add --device-map auto")
    return {"device_map": parse_device_map(device_map) if device_map else None,
            "max_memory": parse_max_memory(max_memory) if max_memory else None}


def _run_facts(model: str):
    """The model's facts, for solving a budget before `run` loads anything."""
    from vtcbench.families import model_facts
    from vtcbench.models import load_config

    return model_facts(load_config(model))


@app.command()
@user_errors
def grid(
    file: Annotated[Path, typer.Argument(help="the grid file (YAML: results, models, methods, tasks, options)")],
    executor: Annotated[str, typer.Option(help="local (one cell after another here) | slurm (a submitit job array) | "
                                               "debug (submitit's in-process executor)")] = "local",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the cells and their run folders; run nothing")] = False,
    status: Annotated[bool, typer.Option("--status", help="print each cell's state (done, running, failed, pending)")] = False,
    slurm_partition: Annotated[str | None, typer.Option(help="slurm: the partition")] = None,
    gpus_per_job: Annotated[int | None, typer.Option(help="slurm: GPUs per cell")] = None,
    cpus_per_job: Annotated[int | None, typer.Option(help="slurm: CPUs per cell")] = None,
    mem_gb: Annotated[int | None, typer.Option(help="slurm: memory per cell, GB")] = None,
    timeout_min: Annotated[int | None, typer.Option(help="slurm: time limit per cell, minutes")] = None,
) -> None:
    """Run a grid of `vtcbench run` cells (models x methods x budgets) here or on a cluster; resumable."""
    from vtcbench.errors import choices_error
    from vtcbench.grid import EXECUTORS, load_grid, run_local, submit

    _quiet_lmms_eval_logging()
    if executor not in EXECUTORS:
        raise choices_error("--executor", executor, EXECUTORS)
    plan = load_grid(file)  # every cell checked before anything runs or is submitted
    for cell, why in plan.left_out:
        console.print(f"[dim]left out: {cell}: {why}[/]")
    if dry_run or status:
        _print_grid(plan)
        return
    todo = [cell for cell in plan.cells if plan.status(cell) != "done"]
    console.print(f"{len(plan.cells)} cells, {len(plan.cells) - len(todo)} done, {len(todo)} to run ({executor})")
    if todo and executor == "local":
        run_local(plan, todo, console.print)
    elif todo:
        parameters = dict(slurm_partition=slurm_partition, gpus_per_node=gpus_per_job, cpus_per_task=cpus_per_job,
                          mem_gb=mem_gb, timeout_min=timeout_min)
        submit(plan, todo, executor, parameters, console.print)
    _print_grid(plan)
    if any(plan.status(cell) == "failed" for cell in plan.cells):
        raise typer.Exit(1)


def _print_grid(plan) -> None:
    table = Table(title=f"grid: {len(plan.cells)} cells under {plan.results}")
    for column in ("cell", "state", "run folder / log"):
        table.add_column(column)
    for cell in plan.cells:
        state = plan.status(cell)
        where = str(plan.log(cell)) if state == "failed" else cell.folder
        table.add_row(cell.label(), state, where)
    console.print(table)


@app.command("redundancy-sweep")
@user_errors
def redundancy_sweep(
    model: ModelOption = "vtc-tiny",
    task: Annotated[str, typer.Option(help="one task: short name or lmms-eval task name")] = "vtcshapes",
    layers: Annotated[str | None, typer.Option(help="layers K to branch at, e.g. 2,8,16,24 (default: those of 32 scaled)")] = None,
    ratios: Annotated[str | None, typer.Option(help="retained shares in (0, 1], e.g. 0.1,0.5,1 (default: 0.1..1.0)")] = None,
    budget: Annotated[str | None, typer.Option(help="tokens=N | tflops=X: instead of --ratios, each layer's share solved to this cost")] = None,
    criterion: Annotated[str, typer.Option(help="attention | pool | random: how the kept tokens are chosen")] = "attention",
    limit: Annotated[int | None, typer.Option(help="at most this many samples")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per trunk forward")] = 1,
    attention_share: Annotated[bool, typer.Option("--attention-share", help="also the attention the answer pays to each token group, per layer")] = False,
    out: Annotated[Path, typer.Option(help="folder for run folders")] = Path("results"),
    data_dir: Annotated[Path | None, typer.Option(help="local datasets: DIR/<task>.parquet or DIR/<task>/")] = None,
    seed: Annotated[int, typer.Option(help="the random criterion's seed")] = 0,
    random_weights: Annotated[bool, typer.Option(help="random weights from the shipped config (plumbing checks)")] = False,
    dtype: Annotated[str, typer.Option(help="float32 | float16 | bfloat16 (default: float16 on GPU, float32 on CPU)")] = "auto",
    attn: Annotated[str, typer.Option(help="eager | sdpa | flash_attention_2")] = "sdpa",
    device: Annotated[str, typer.Option(help="default: cuda when available")] = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard an existing run folder of this configuration")] = False,
) -> None:
    """Task metric over a layer x retained-share grid (PyramidDrop Fig. 1, LLaVolta Fig. 1), sharing
    each sample's layers below K across its cells; every cell equals its `vtcbench run`."""
    from vtcbench.families import model_facts
    from vtcbench.models import load_config
    from vtcbench.sweep import SweepConfig, plan_cells, sweep
    from vtcbench.tasks import resolve_tasks

    _quiet_lmms_eval_logging()
    for option, value in (("--limit", limit), ("--batch-size", batch_size)):
        _check_count(option, value, 1)
    if "," in task:
        raise VtcbenchError(f"--task {task!r}: a sweep takes one task")
    if data_dir is not None and not data_dir.is_dir():
        raise VtcbenchError(f"--data-dir {str(data_dir)!r} is not a folder")
    device, dtype = _device_and_dtype(device, dtype)
    config = SweepConfig(
        model=model, task=task, layers=_parse_list("--layers", layers, int), ratios=_parse_list("--ratios", ratios, float),
        budget=budget, criterion=criterion, limit=limit, seed=seed, batch_size=batch_size, attention_share=attention_share, out=out,
        data_dir=data_dir, random_weights=random_weights, dtype=dtype, attn_implementation=attn, device=device,
        overwrite=overwrite, show_progress=sys.stderr.isatty(), **_dispatch_options(device_map, max_memory),
    )
    plan_cells(config, model_facts(load_config(model)))  # every value checked before weights load
    resolve_tasks([task])
    result = sweep(config)
    _print_sweep(result)


def _parse_list(option: str, text: str | None, kind: type) -> list | None:
    if text is None:
        return None
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise VtcbenchError(f"{option} {text!r} is not a comma-separated list of {kind.__name__} values") from None


def _print_sweep(result) -> None:
    curves = result.curves
    vanilla = next(row for row in curves if row["layer"] == "")
    layers = sorted({row["layer"] for row in curves if row["layer"] != ""})
    ratios = sorted({row["ratio"] for row in curves if row["layer"] != ""})
    table = Table(title=f"{result.folder}: {vanilla['metric_name']} (vanilla {vanilla['metric']:.4g})")
    table.add_column("layer K")
    if result.budget:  # an iso-cost curve: one share per layer
        table.add_column(f"retained share ({result.budget})", justify="right")
        table.add_column(vanilla["metric_name"], justify="right")
        for row in (row for row in curves if row["layer"] != ""):
            table.add_row(str(row["layer"]), f"{row['ratio']:.4g}", f"{row['metric']:.3g}")
    else:
        for ratio in ratios:
            table.add_column(f"r={ratio:.3g}", justify="right")
        for layer in layers:
            by_ratio = {row["ratio"]: row for row in curves if row["layer"] == layer}
            table.add_row(str(layer), *(f"{by_ratio[r]['metric']:.3g}" if r in by_ratio else "-" for r in ratios))
    console.print(table)
    cost = result.cost
    if cost["separate_runs_s"]:
        console.print(
            f"cost of the {len(curves)} cells: {cost['sweep_s']:.1f} s, against about {cost['separate_runs_s']:.1f} s for "
            f"one run per cell (measured ratio {cost['sweep_s'] / cost['separate_runs_s']:.2f}; the separate runs "
            f"estimated from the trunk's time to each branch layer); FLOPs floor {cost['flops_ratio_to_separate_runs']:.2f} "
            "(decoder prefill, without the vision encoder the sweep also runs once)"
        )
    outputs = ["curves.csv", "curves.png", "cells.jsonl"] + (["attention_share.csv", "attention_share.png"] if result.attention_share else [])
    console.print(f"{result.seconds:.1f} s in all; outputs in {result.folder}: {', '.join(outputs)}")


@app.command()
@user_errors
def train(
    model: Annotated[str, typer.Option("--model", help="the model to train (its shipped config, random init)")] = "vtc-tiny",
    init: Annotated[str | None, typer.Option("--init", help="fine-tune these weights (a model name or folder) instead of random ones")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="compression active during training")] = "vanilla",
    set_: SetOption = None,
    schedule: Annotated[str | None, typer.Option(help="stage-wise schedule, e.g. llavolta-4stage (needs --method llavolta)")] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 0,
    batch_size: Annotated[int, typer.Option(help="samples per step")] = 32,
    lr: Annotated[float, typer.Option(help="peak learning rate of the one-cycle schedule")] = 2e-3,
    seed: Annotated[int, typer.Option(help="weights and data stream")] = 0,
    out: Annotated[Path | None, typer.Option(help="folder for the trained model (default: trained/<model>-<method>-seed<seed>)")] = None,
    time_every: Annotated[int, typer.Option(help="with compression: time a vanilla step on the same batch every N steps")] = 25,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing model folder")] = False,
    test_per_family: Annotated[int, typer.Option(help="held-out questions per family for the final accuracy")] = 125,
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
) -> None:
    """Train vtc-tiny on vtcshapes, optionally compression-aware (the shipped weights: --method llavolta --schedule llavolta-4stage)."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from vtcbench.api import method_from_options
    from vtcbench.schedules import SCHEDULES
    from vtcbench.training import (
        DEFAULT_STEPS,
        TEST_PER_FAMILY,
        TRAINABLE_MODELS,
        TrainConfig,
    )
    from vtcbench.training import train as run_training

    if model not in TRAINABLE_MODELS:
        raise VtcbenchError(f"model {model!r} cannot be trained here; valid choices: {', '.join(TRAINABLE_MODELS)}")
    dispatch = _dispatch_options(device_map, max_memory)
    if device_map is not None and init is None:
        raise VtcbenchError("--device-map splits the weights --init loads; a model trained from random weights has none")
    compression = method_from_options(method, set_ or [])
    if schedule is not None:
        if schedule not in SCHEDULES:
            from vtcbench.errors import choices_error

            raise choices_error("schedule", schedule, SCHEDULES)
        if method != "llavolta" or set_:
            raise VtcbenchError(f"--schedule {schedule} sets LLaVolta's stages itself; pass --method llavolta and no --set")
    _check_count("--batch-size", batch_size, 1)
    _check_count("--time-every", time_every, 0)
    if not 1 <= test_per_family <= TEST_PER_FAMILY:
        raise VtcbenchError(f"--test-per-family {test_per_family} is out of range; valid: 1..{TEST_PER_FAMILY}")
    steps = steps or DEFAULT_STEPS
    _check_count("--steps", steps, 1)
    if out is None:
        out = Path("trained") / f"{model}-{schedule or method}-seed{seed}"
    if out.exists() and not overwrite:
        raise VtcbenchError(f"{out} already exists; pass --overwrite to replace it, or choose --out")
    config = TrainConfig(
        out=out, model=model, method=compression, schedule=schedule, steps=steps, batch_size=batch_size, lr=lr,
        seed=seed, time_every=time_every, test_per_family=test_per_family, init=init, **dispatch,
    )
    if not config.compressed or compression.needs_weights:
        config.time_every = 0  # nothing to compare a vanilla step with (a fusing projector has no vanilla step)
    with Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[status]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=errors, disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task("train", total=steps, status="")

        def report(entry: dict) -> None:
            status = f"lm {entry['lm_loss']:.3f} aux {entry['aux_loss']:.3f} {entry['method']}"
            bar.update(task, completed=entry["step"], status=status)
            if not sys.stderr.isatty():
                errors.print(f"step {entry['step']}/{steps} {status} {entry['seconds']:.0f}s", highlight=False)

        result = run_training(config, progress=report)
    _print_training(result)


@app.command("convert-stf")
@user_errors
def convert_stf(
    src: Annotated[Path, typer.Argument(help="the official LLaVA-STF checkpoint folder (LLaVA's original layout)")],
    out: Annotated[Path, typer.Argument(help="the llava-hf model folder to write (then: vtcbench run --model OUT --method stf)")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing folder")] = False,
) -> None:
    """Convert LLaVA-STF's weights (MBTF + STF projector) into a folder `--model` loads."""
    from vtcbench.convert_stf import convert_stf as run_conversion

    console.print(f"converted {src} -> {run_conversion(src, out, overwrite=overwrite)} (run it with --method stf)")


@app.command("train-clip")
@user_errors
def train_clip(
    model: Annotated[str, typer.Argument(help="a LLaVA whose projector reads its tower's last layer (what `vtcbench train` writes)")],
    out_model: Annotated[Path, typer.Option(help="the model with its tower's new last layer, read at -2")],
    out_clip: Annotated[Path, typer.Option(help="the CLIPModel checkpoint (CDPruner's --set clip=)")],
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 1000,
    batch_size: Annotated[int, typer.Option(help="scenes per step")] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate of the one-cycle schedule")] = 1e-3,
    seed: Annotated[int, typer.Option(help="weights and data stream")] = 0,
) -> None:
    """Train a LLaVA's CLIP half (a last tower layer and a text tower, LiT-style; docs/vtc-tiny.md#its-clip-half)."""
    from vtcbench.tiny_clip import write_clip_half

    def progress(entry: dict) -> None:
        console.print(f"step {entry['step']}/{steps}: loss {entry['loss']:.4f} ({entry['seconds']:.0f} s)")

    record = write_clip_half(model, out_model, out_clip, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    found = record["retrieval_top1_of_100"]
    console.print(f"trained in {record['seconds'] / 60:.1f} min -> {out_model}, {out_clip}; held-out retrieval, top-1 among 100: "
                  f"image to caption {100 * found['image_to_text']:.1f}%, caption to image {100 * found['text_to_image']:.1f}%")


def _print_training(result) -> None:
    from vtcbench.shapes import FAMILIES

    console.print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min ({result.stages}) -> {result.out}")
    if result.time_ratio is not None:
        console.print(
            f"training step time / vanilla step time, measured side by side on the same batches: {result.time_ratio:.2f}"
        )
    table = Table(title="vtcshapes held-out accuracy (%)")
    for column in ("tested with", *FAMILIES, "overall"):
        table.add_column(column)
    for tested, scores in result.accuracy.items():
        table.add_row(tested, *(f"{100 * scores[k]:.1f}" for k in (*FAMILIES, "overall")))
    console.print(table)


def _device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    """`auto`: CUDA when available; float16 on GPU (the papers' setting), float32 on CPU."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = ("float16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype
    return device, dtype


def _relaunch_data_parallel(num_processes: int) -> None:
    """Run this same command in `num_processes` processes with torchrun (GPUs or CPU)."""
    import subprocess

    args = sys.argv[1:]
    for index, arg in enumerate(args):
        if arg == "--num-processes":
            del args[index : index + 2]
            break
        if arg.startswith("--num-processes="):
            del args[index]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
               "-m", "vtcbench", *args]
    code = subprocess.run(command).returncode
    if code:
        raise typer.Exit(code=code)


def _quiet_lmms_eval_logging() -> None:
    """lmms-eval logs through loguru at DEBUG regardless of its `verbosity`; keep warnings only."""
    import datasets
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    datasets.disable_progress_bars()


def _print_summary(result) -> None:
    from vtcbench.tasks import short_name

    table = Table(title=f"{result.folder}")
    for column in ("task", "samples", "metrics", "visual tokens (mean over layers)", "TFLOPs image/total", "prefill ms", "samples/s"):
        table.add_column(column)
    for name, entry in result.summary["tasks"].items():
        metrics = ", ".join(
            f"{k.split(',')[0]}={v:.4g}" for k, v in entry["metrics"].items() if isinstance(v, (int, float)) and "_stderr" not in k
        )
        tokens = entry.get("mean_image_tokens_per_layer")
        flops = f"{entry['tflops_image']:.3g}/{entry['tflops_total']:.3g}" if "tflops_image" in entry else "-"
        prefill = f"{entry['prefill_ms_median']:.1f}" if entry.get("prefill_ms_median") is not None else "-"
        rate = f"{entry['samples_per_s']:.2f}" if entry.get("samples_per_s") else "-"
        table.add_row(short_name(name), str(entry["samples"]), metrics, f"{sum(tokens) / len(tokens):.1f}" if tokens else "-", flops, prefill, rate)
    console.print(table)
    for name, entry in result.summary["tasks"].items():
        if entry.get("skipped"):
            first = entry["skipped"][0]
            console.print(f"{short_name(name)}: {len(entry['skipped'])} document(s) skipped and not scored, e.g. document "
                          f"{first['doc_id']}: {first['cause']} (all in summary.json)")


@app.command()
@user_errors
def report(
    fmt: Annotated[str, typer.Option("--format", help="markdown | latex | csv | json | html")] = "markdown",
    results: Annotated[Path, typer.Option(help="folder of run folders (the --out of run / redundancy-sweep)")] = Path("results"),
    layout: Annotated[str, typer.Option(help="auto | efficiency | inference | compressors | ablation | iso | sweep")] = "auto",
    runs: Annotated[str | None, typer.Option(help="glob on run-folder names, e.g. 'vtc-tiny__*'")] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated methods to show")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated tasks (short or lmms-eval names)")] = None,
    sort: Annotated[str | None, typer.Option(help="order rows by this column (best first)")] = None,
    delta_vs: Annotated[str | None, typer.Option(help="inference layout: difference rows against this method (default fastv)")] = None,
    reference: Annotated[str | None, typer.Option(help="method the differences are taken from (default vanilla)")] = None,
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="allow rows of different models")] = False,
    metrics: Annotated[str | None, typer.Option(help="metrics shown per task, e.g. color,count,overall (default: each task's first)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap intervals")] = 0,
    plots: Annotated[bool, typer.Option("--plots", help="also write PNG figures (accuracy vs. cost, retention pictures); "
                                        "embedded in --format html")] = False,
    plots_dir: Annotated[Path | None, typer.Option(help="folder of the PNGs (implies --plots; default <results>/report-plots)")] = None,
    plot_metric: Annotated[str | None, typer.Option(help="metric of the efficiency plots, one the tables show (implies "
                                                    "--plots; default: overall, else each task's primary metric)")] = None,
) -> None:
    """Comparison tables of run folders as in the papers, with 95% intervals and paired differences."""
    from vtcbench.errors import choices_error
    from vtcbench.report import FORMATS, ReportOptions, build_report, render

    if fmt not in FORMATS:
        raise choices_error("format", fmt, FORMATS)
    plots = plots or plots_dir is not None or plot_metric is not None
    options = ReportOptions(
        results=results, layout=layout, runs=runs, methods=_comma_list(methods), tasks=_comma_list(tasks), sort=sort,
        delta_vs=delta_vs, reference=reference, allow_mixed=allow_mixed, metrics=_comma_list(metrics), seed=seed, plots=plots,
        plot_metric=plot_metric,
    )
    built = build_report(options)
    if plots:
        from vtcbench.report.plots import write_figures

        for path in write_figures(built.figures, plots_dir if plots_dir is not None else results / "report-plots"):
            errors.print(f"wrote {path}", highlight=False, soft_wrap=True)
        for note in built.figure_notes:
            errors.print(f"plots: {note}", highlight=False, soft_wrap=True)
        if not built.figures:
            errors.print("plots: nothing to plot (no run with a task metric or recorded kept tokens)", highlight=False)
    sys.stdout.write(render(built, fmt))


def _comma_list(text: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())


@app.command()
@user_errors
def tasks() -> None:
    """The benchmark short names, their lmms-eval tasks, and which need a judge or a server."""
    from vtcbench.tasks import TASKS

    table = Table(title="tasks (any other lmms-eval task name also works)")
    for column in ("short", "lmms-eval task", "scoring", "description"):
        table.add_column(column, no_wrap=column != "description")
    for info in TASKS.values():
        scoring = "LLM judge (--allow-judge)" if info.needs_judge else "server (--allow-submission)" if info.needs_submission else "local"
        table.add_row(info.short, info.lmms_name, scoring, info.description)
    console.print(table)


def _print_profile(record) -> None:
    """A profile as tables: `generate`'s phases under the engine, or VoCo-LLaMA's two questions."""
    from vtcbench.profilers.voco import VocoProfile

    if isinstance(record, VocoProfile):
        _print_voco_profile(record)
        return
    shape = record.shape
    title = (f"{record.method} {_format_params(record.params)} on {record.model}: {shape.image_tokens} image + "
             f"{shape.text_tokens} text tokens, {shape.new_tokens} new, batch {shape.batch}, {record.iterations} iterations")
    table = Table(title=title)
    for column in ("phase", "median ms", "p10 ms", "p90 ms"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase, latency in record.latency_ms.items():
        table.add_row(phase.replace("_", " "), f"{latency.median_ms:.2f}", f"{latency.p10_ms:.2f}", f"{latency.p90_ms:.2f}")
    if record.train_step_ms is not None:
        t = record.train_step_ms
        table.add_row("train step (fwd+bwd)", f"{t.median_ms:.2f}", f"{t.p10_ms:.2f}", f"{t.p90_ms:.2f}")
    console.print(table)
    if record.train_time_ratio is not None:
        console.print(f"training step time / vanilla: {record.train_time_ratio:.3f}")
    memory, energy = record.memory, record.energy
    console.print(f"KV cache after prefill: {memory.kv_cache_bytes / 2**20:.2f} MiB; "
                  f"torch peak allocated: {_mib(memory.torch_max_allocated_bytes)}, reserved: "
                  f"{_mib(memory.torch_max_reserved_bytes)}; NVML process: {_mib(memory.nvml_process_bytes)}")
    if memory.per_device_max_allocated_bytes:
        console.print("torch peak allocated per device: " + ", ".join(
            f"{device} {_mib(value)}" for device, value in memory.per_device_max_allocated_bytes.items()))
    console.print("energy: " + (f"{energy.joules_per_sample:.2f} J/sample" if energy.joules_per_sample is not None
                                else f"unavailable ({energy.unavailable_reason})"))
    flops, measured = record.flops, record.opcount
    analytic_lm = flops["tflops_language_model"]
    console.print(f"TFLOPs (MACs): image tokens {flops['tflops_image']:.4g}, decoder full sequence "
                  f"{flops['tflops_total']:.4g}, vision {flops['tflops_vision_encoder']:.4g}, "
                  f"method overhead {flops['tflops_method_overhead']:.3g}")
    torch_lm, fvcore_lm = measured["language_model_macs"], record.fvcore["language_model_macs"]
    second = (f"fvcore {fvcore_lm / 1e12:.4g} (agreement {fvcore_lm / torch_lm:.4f})" if fvcore_lm is not None
              else record.fvcore["error"])
    console.print(f"measured language model TFLOPs (MACs): {measured['counter']} {torch_lm / 1e12:.4g}, {second}; "
                  f"analytic {analytic_lm:.4g}")
    p = record.provenance
    console.print(f"[dim]{p['device']}, driver {p['driver']}, torch {p['torch']}, transformers {p['transformers']}, "
                  f"{p['dtype']}, attention {p['attention']}, git {p['git_revision'][:12]}[/]")


def _mib(value: int | None) -> str:
    return "unavailable on CPU" if value is None else f"{value / 2**20:.1f} MiB"


def _format_params(params: dict) -> str:
    return ", ".join(f"{k}={_format_value(v)}" for k, v in params.items()) or "(no hyperparameters)"


def _format_value(value) -> str:
    if isinstance(value, (tuple, list)) and not value:
        return "auto"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def _image_size(text: str | None, family, model: str) -> tuple[int, int] | None:
    """`--image-size WIDTHxHEIGHT`, for a family whose token count follows the image's size."""
    if text is None:
        return None
    if not family.dynamic_resolution:
        raise VtcbenchError(f"--image-size: {model} ({family.name}) sees every image at a fixed size; use --image-tokens")
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise VtcbenchError(f"--image-size {text!r} is not WIDTHxHEIGHT in pixels, e.g. 1024x768")
    return int(width), int(height)


def _format_counts(counts: list[int]) -> str:
    """Run-length form: 576x2, 288x30."""
    runs: list[list[int]] = []
    for count in counts:
        if runs and runs[-1][0] == count:
            runs[-1][1] += 1
        else:
            runs.append([count, 1])
    return ", ".join(f"{count}x{repeat}" for count, repeat in runs)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # `python -m vtcbench.cli ...`
    main()
