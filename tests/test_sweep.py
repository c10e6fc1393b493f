"""The redundancy sweep: each cell equals the `vtcbench run` of its method, resumes without
recomputing, and refuses bad input before loading anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtcbench.cli import app
from vtcbench.families import model_facts
from vtcbench.models import MODELS, load_config
from vtcbench.runner import RunConfig, run
from vtcbench.sweep import (
    Cell,
    SweepConfig,
    default_layers,
    plan_cells,
    pool_ratios,
    sweep,
)

LIMIT = 3


def _sweep(tmp_path: Path, **options) -> tuple[Path, list[dict]]:
    config = SweepConfig(limit=LIMIT, out=tmp_path / "sweep", show_progress=False, **options)
    result = sweep(config)
    cells = [json.loads(line) for line in (result.folder / "cells.jsonl").read_text().splitlines()]
    return result.folder, cells


def _separate_run(
    tmp_path: Path, cell: Cell, criterion: str, task: str, batch_size: int, model: str = "vtc-tiny"
) -> dict[int, object]:
    method = cell.method(criterion, seed=0)
    result = run(RunConfig(model=model, method=method.name, params=method.params(), tasks=[task], limit=LIMIT,
                           batch_size=batch_size, out=tmp_path / "runs", show_progress=False,
                           random_weights=MODELS[model].toy))
    by_doc: dict[int, list] = {}
    for line in (result.folder / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_doc.setdefault(record["doc_id"], []).append((record["request_index"], record["prediction"]))
    return {doc: [p for _, p in sorted(answers)] for doc, answers in by_doc.items()}


def _assert_cells_equal_runs(
    tmp_path: Path, cells: list[dict], criterion: str, task: str, batch_size: int = 1, model: str = "vtc-tiny"
) -> int:
    compared = 0
    for cell_id in dict.fromkeys(c["cell"] for c in cells):
        first = next(c for c in cells if c["cell"] == cell_id)
        cell = Cell(first["layer"], first["ratio"])
        expected = _separate_run(tmp_path, cell, criterion, task, batch_size, model)
        got = {c["doc_id"]: c["prediction"] for c in cells if c["cell"] == cell_id}
        got = {doc: p if isinstance(p, list) and p and isinstance(p[0], list) else [p] for doc, p in got.items()}
        assert got == expected, f"cell {cell_id} ({criterion})"
        compared += 1
    return compared


@pytest.mark.parametrize(
    "criterion, layers, ratios, batch_size",
    [
        ("attention", [1, 5], [0.1, 0.5, 1.0], 1),
        ("pool", [0, 3], [0.125, 0.5], 1),
        ("random", [0, 5], [0.3, 0.9], 1),
        ("attention", [2], [0.3], 3),
    ],
)
def test_cells_equal_separate_runs(tmp_path, criterion, layers, ratios, batch_size):
    """First and last legal layer per criterion (pool and random start at 0, attention at 1), and
    a batched sweep against runs of the same batch size."""
    _, cells = _sweep(tmp_path, criterion=criterion, layers=layers, ratios=ratios, batch_size=batch_size)
    n_cells = 1 + len(layers) * len([r for r in ratios if r < 1])
    assert _assert_cells_equal_runs(tmp_path, cells, criterion, "vtcshapes", batch_size) == n_cells
    assert len(cells) == n_cells * LIMIT


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_cells_equal_separate_runs_on_mrope_families(tmp_path, model):
    """Branches resumed on M-RoPE positions (and, on Qwen3-VL, with DeepStack added to the
    surviving tokens after layers 0 and 1, before and after the branch point) equal their runs."""
    _, cells = _sweep(tmp_path, model=model, random_weights=True, criterion="attention", layers=[1, 2], ratios=[0.5], batch_size=2)
    assert _assert_cells_equal_runs(tmp_path, cells, "attention", "vtcshapes", 2, model) == 3


@pytest.mark.full_grid
@pytest.mark.parametrize("task", ["vtcshapes", "vtcshapes_mc"])
def test_full_grid_equals_forty_runs(tmp_path, task):
    """10 ratios at 4 layers (ratio 1.0 is vanilla at each: 37 distinct runs), a generation task
    and a multiple-choice (log-likelihood) one."""
    _, cells = _sweep(tmp_path, task=task, layers=[1, 2, 3, 4], ratios=[round(0.1 * i, 1) for i in range(1, 11)])
    assert _assert_cells_equal_runs(tmp_path, cells, "attention", task) == 37


def test_resumed_sweep_computes_only_the_missing_samples(tmp_path, monkeypatch):
    from vtcbench import sweep_lmm

    folder, cells = _sweep(tmp_path, layers=[2], ratios=[0.5])
    samples = folder / "samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join(lines[:-1]) + "\n")  # as if killed before the last sample was written
    computed = []
    original = sweep_lmm.SweepLMM._sweep_generate

    def counting(self, jobs):
        computed.extend(job.request.doc_id for job in jobs)
        yield from original(self, jobs)

    monkeypatch.setattr(sweep_lmm.SweepLMM, "_sweep_generate", counting)
    _, resumed = _sweep(tmp_path, layers=[2], ratios=[0.5])
    assert computed == [json.loads(lines[-1])["doc_id"]]
    assert resumed == cells
    assert len(samples.read_text().splitlines()) == len(lines)


def test_outputs(tmp_path):
    folder, cells = _sweep(tmp_path, layers=[1, 3], ratios=[0.5, 1.0])
    curves = (folder / "curves.csv").read_text().splitlines()
    assert curves[0] == "layer,ratio,criterion,metric_name,metric,stderr,visual_tokens,tflops"
    assert len(curves) == 1 + 3
    assert (folder / "curves.png").stat().st_size > 10_000
    assert {c["score"] for c in cells} <= {0.0, 1.0}
    summary = json.loads((folder / "summary.json").read_text())
    vanilla, *branches = summary["curves"]
    assert vanilla["visual_tokens"] == 64 and vanilla["layer"] == ""
    # pdrop keeps int(64 * 0.5) = 32 tokens from layer K on, in a 6-layer model
    assert [b["visual_tokens"] for b in branches] == [(64 + 32 * 5) / 6, (64 * 3 + 32 * 3) / 6]
    assert all(b["tflops"] < vanilla["tflops"] for b in branches)


def test_grid_defaults_and_flops():
    assert default_layers(32) == [2, 8, 16, 24]
    assert default_layers(6) == [1, 2, 3, 4]
    assert pool_ratios(64)[-3:] == [0.25, 0.5, 1.0]
    facts = model_facts(load_config("vtc-tiny"))
    cells = plan_cells(SweepConfig(), facts)
    assert len(cells) == 1 + 4 * 9 and cells[0].id == "vanilla"
    assert plan_cells(SweepConfig(criterion="pool"), facts)[1].method("pool", 0).stride == 64


@pytest.mark.parametrize("criterion", ["attention", "pool", "random"])
def test_a_budget_solves_each_layers_share_to_the_closest_cost(criterion):
    """`--budget tokens=N`: one cell per layer, each the setting `budgets.solve` picks for that
    layer (an iso-cost curve), and its mean visual tokens as close to N as the knob allows."""
    from vtcbench.budgets import Budget, cost, solve

    facts = model_facts(load_config("vtc-tiny"))
    cells = plan_cells(SweepConfig(criterion=criterion, layers=[1, 2, 3], budget="tokens=40"), facts)
    assert [cell.layer for cell in cells] == [None, 1, 2, 3]
    for cell in cells[1:]:
        method = cell.method(criterion, 0)
        fixed = {key: value for key, value in method.params().items() if key not in method.budget_knobs}
        solved = solve(method.name, fixed, Budget("tokens", 40), facts)
        assert method.params() == solved.method.params()
        assert cost(method, facts, "tokens") == solved.cost
    full = plan_cells(SweepConfig(criterion=criterion, layers=[1], budget="tokens=64"), facts)
    assert [cell.layer for cell in full] == [None]  # a budget of every token: the vanilla cell alone
    if criterion == "attention":  # keep_ratio on its 0.001 grid: int(64 * r) tokens from layer K on, 6 layers
        assert [cost(cell.method(criterion, 0), facts, "tokens") for cell in cells[1:]] == [(64 + 5 * 35) / 6, (2 * 64 + 4 * 28) / 6, 40]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "tokens=16"], "--budget tokens=16: pdrop (layers=(2,)) reaches 21.33..64 tokens on this model"),
        (["--budget", "tokens=40", "--ratios", "0.5"], "--budget solves each layer's retained share; drop --ratios"),
        (["--budget", "flops=3"], "--budget 'flops=3' is not of the form tokens=N or tflops=X"),
        (["--ratios", "0,0.5"], "--ratios: 0 is outside the retained share's range; valid: (0, 1]"),
        (["--ratios", "1.5"], "--ratios: 1.5 is outside"),
        (["--layers", "6"], "valid: 1..5"),
        (["--layers", "0"], "valid: 1..5"),
        (["--criterion", "pool", "--ratios", "0.3"], "valid: 0.01562, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1"),
        (["--criterion", "entropy"], "unknown criterion 'entropy'; valid choices: attention, pool, random"),
        (["--task", "nosuch"], "unknown task 'nosuch'"),
        (["--ratios", "half"], "--ratios 'half' is not a comma-separated list of float values"),
    ],
)
def test_bad_input_is_refused_before_anything_loads(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["redundancy-sweep", *args, "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_branch_cache_shares_the_trunk_prefix_and_decoding_leaves_it_untouched():
    """Branches hold the trunk's prompt entries by reference (no copy per branch, which separate
    runs never pay); a decode step's update makes new tensors, so one branch cannot change another's."""
    import torch

    from vtcbench import transformers_seam as seam

    config = load_config("tiny")
    layers = config.text_config.num_hidden_layers
    prefix = [(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)) for _ in range(layers - 1)]
    saved = [(k.clone(), v.clone()) for k, v in prefix]
    first, second = seam.branch_cache(config, prefix), seam.branch_cache(config, prefix)
    assert all(first.layers[i].keys is prefix[i][0] and second.layers[i].values is prefix[i][1] for i in range(layers - 1))
    assert seam.cache_layer_lengths(first)[: layers - 1] == [5] * (layers - 1)
    first.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8), 0)
    assert first.layers[0].keys.shape[-2] == 6 and second.layers[0].keys.shape[-2] == 5
    assert all(torch.equal(k, sk) and torch.equal(v, sv) for (k, v), (sk, sv) in zip(prefix, saved))


def test_branches_run_together_equal_each_run_alone(tiny):
    """A sweep runs its branches' layers together (`run_together`: packed in one row where they
    can be): every branch gets the hidden states, the per-layer token counts and the cache
    entries it gets when it runs alone, to the bit; and a resumed prefill refuses an engine
    whose hooks are registered."""
    import torch
    from conftest import pixels, prompt_ids

    from vtcbench import transformers_seam as seam
    from vtcbench.engine import Trunk, compress, run_together
    from vtcbench.families import family_of
    from vtcbench.methods import get_method

    seam_packed = seam.packed_layer

    model = tiny("sdpa")
    n_layers = model.config.text_config.num_hidden_layers
    prompts = [prompt_ids(model, 3, 4, seed=0), prompt_ids(model, 5, 2, seed=1)]
    inputs = {"input_ids": torch.cat(prompts), "pixel_values": torch.cat([pixels(0), pixels(1)])}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    branches = [(1, 0.5), (1, 0.75), (2, 0.25), (n_layers - 1, 1.0)]
    with torch.no_grad():
        with Trunk(model, {layer for layer, _ in branches}) as trunk:
            model(**inputs, use_cache=True)

        def resumed():
            out = []
            for layer, ratio in branches:
                engine = compress(model, get_method("pdrop", layers=(layer,), keep_ratio=ratio))
                cache = trunk.branch_cache(layer)
                out.append((cache, engine.resume(layer, inputs, trunk, cache)))
            return out

        alone = resumed()
        for _, prefill in alone:
            run_together([prefill])
        together = resumed()
        packed = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(seam, "packed_layer", lambda layer, calls: packed.append(len(calls)) or seam_packed(layer, calls))
            run_together([prefill for _, prefill in together])
    assert packed[0] == 2 and packed[-1] == len(branches)  # layer 1: two branches; the last layer: all
    for (cache_a, a), (cache_b, b) in zip(alone, together):
        assert torch.equal(a.hidden, b.hidden)
        assert a.engine.applied_image_tokens_per_sample == b.engine.applied_image_tokens_per_sample
        assert all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(cache_a.layers, cache_b.layers))
    engine = compress(model, get_method("pdrop", layers=(1,), keep_ratio=0.5))
    with engine, pytest.raises(RuntimeError, match="outside `with engine`"):
        engine.resume(1, inputs, trunk, None)
    # a call of fewer rows than MKL computes alike in any product is not packed
    layer = family_of(model).language_model(model).layers[0]
    short = [((torch.randn(1, n, model.config.text_config.hidden_size),), {"position_embeddings": (None, None)}) for n in (11, 40)]
    assert not seam.can_pack(layer, short) and seam.can_pack(layer, [short[1], short[1]])


def test_a_product_row_gets_the_same_bits_beside_other_rows_from_min_packed_rows_on():
    """What packing rests on: a linear layer's output row for a call of MIN_PACKED_ROWS rows or
    more is bit-identical whether the call's rows run alone or in one product with other rows
    (the shapes of vtc-tiny's and llava-1.5-7b's decoder at an eighth of its width)."""
    import torch

    from vtcbench import transformers_seam as seam

    generator = torch.Generator().manual_seed(0)
    for k, n in [(128, 128), (128, 352), (352, 128), (512, 512), (512, 1376), (1376, 512)]:
        weight = torch.randn(n, k, generator=generator)
        for rows in [seam.MIN_PACKED_ROWS, 13, 16, 33, 64, 121, 582]:
            alone = torch.randn(1, rows, k, generator=generator)
            other = torch.randn(1, 137, k, generator=generator)
            packed = torch.nn.functional.linear(torch.cat([other, alone], dim=1), weight)[:, 137:]
            assert torch.equal(torch.nn.functional.linear(alone, weight), packed), (k, n, rows)
