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
    from vtcbench.methods import METHODS

    table = Table(title="compression methods")
    for column in ("name", "acts", "positions", "defaults", "description"):
        table.add_column(column, no_wrap=column != "description")
    for name, cls in sorted(METHODS.items()):
        defaults = ", ".join(f"{f.name}={_format_value(f.default)}" for f in dataclasses.fields(cls)) or "-"
        positions = cls.position_policy if cls.where == "in_llm" else "-"
        table.add_row(name, cls.where.replace("_", "-"), positions, defaults, cls.description)
    console.print(table)


@app.command()
@user_errors
def models() -> None:
    """List the model aliases and the facts FLOPs counting uses (no download)."""
    from vtcbench.models import MODELS, load_config, model_facts

    table = Table(title="model aliases (any hub id or local folder also works)")
    for column in ("alias", "hub id", "layers", "hidden", "ffn", "heads/kv", "image tokens", "description"):
        table.add_column(column, no_wrap=column != "description")
    for alias, spec in MODELS.items():
        facts = model_facts(load_config(alias))
        table.add_row(
            alias,
            spec.hub_id or "(random weights only)",
            str(facts.n_layers),
            str(facts.hidden_size),
            str(facts.intermediate_size),
            f"{facts.n_heads}/{facts.n_kv_heads}",
            str(spec.image_tokens),
            spec.description,
        )
    console.print(table)


@app.command()
@user_errors
def generate(
    method: MethodOption = "fastv",
    model: ModelOption = "tiny",
    set_: SetOption = None,
    prompt: Annotated[str, typer.Option(help="the question about the image")] = "What is in the image?",
    image: Annotated[Path | None, typer.Option(help="image file (default: a synthetic test pattern)")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 16,
    random_weights: Annotated[bool, typer.Option(help="build the architecture with random weights, offline")] = False,
    dtype: str = "float32",
    attn: Annotated[str, typer.Option(help="eager | sdpa | flash_attention_2")] = "sdpa",
    device: str = "cpu",
) -> None:
    """Answer one question about one image with a method applied; show visual tokens per layer."""
    from vtcbench.api import answer, check_method_for_model, method_from_options

    compression = method_from_options(method, set_ or [])
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
    image_tokens: Annotated[int | None, typer.Option(help="visual tokens per sample (default: the model's)")] = None,
    text_tokens: Annotated[int, typer.Option(help="text tokens in the prompt (full-sequence figure)")] = 64,
    fmt: FormatOption = "table",
) -> None:
    """Analytic FLOPs (multiply-accumulates, the papers' FLOPs), visual tokens per layer, compression ratio."""
    from vtcbench.api import method_from_options
    from vtcbench.models import load_config, model_facts
    from vtcbench.profilers.flops import analytic_flops

    _check_format(fmt)
    _check_count("--image-tokens", image_tokens, 1)
    _check_count("--text-tokens", text_tokens, 1)
    compression = method_from_options(method, set_ or [])
    report = analytic_flops(
        compression, model_facts(load_config(model)), model=model, image_tokens=image_tokens, text_tokens=text_tokens
    )
    if fmt == "json":
        print(json.dumps(report.to_dict()))
        return
    table = Table(title=f"{method} {_format_params(report.params)} on {model} (multiply-accumulates)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("visual tokens per layer", _format_counts(report.image_tokens_per_layer)),
        ("visual tokens summed over layers", f"{report.visual_token_total:,}"),
        ("compression ratio (N*L / total)", f"{report.compression_ratio:.0%}"),
        ("TFLOPs, image tokens (papers' convention)", f"{report.tflops_image:.3g}"),
        (f"TFLOPs, decoder on image + {text_tokens} text tokens", f"{report.tflops_total:.3g}"),
        ("TFLOPs, vision encoder", f"{report.tflops_vision_encoder:.3g}"),
        ("TFLOPs, projector", f"{report.tflops_projector:.3g}"),
        ("TFLOPs, method's own scoring", f"{report.tflops_method_overhead:.3g}"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _format_params(params: dict) -> str:
    return ", ".join(f"{k}={_format_value(v)}" for k, v in params.items()) or "(no hyperparameters)"


def _format_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


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
