"""Every family x every method acting through the engine's layer actions (in-LLM methods and
DivPrune's selection at the language model's input) x {eager, sdpa}, on each family's toy model
(`ModelSpec.toy`).

A new family is picked up with no edit here: register its toy alias. The invariants:
keep-all equals vanilla; a batch of images of different sizes (so different visual-token counts
on dynamic-resolution families) and prompts of different lengths equals each prompt alone, with
each sample's applied counts equal to the method's analytic plan; cached greedy decode equals
an uncached rerun of the whole sequence at every step; methods a family cannot run are refused
before anything runs. The oracles (FastV, PyramidDrop, LLaVolta run by hand on the gathered
M-RoPE positions and DeepStack features) are at the end.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from oracles import OraclePlan, language_model_inputs, mrope_oracle_greedy
from PIL import Image

from vtcbench.engine import compress
from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of
from vtcbench.methods import METHODS, get_method
from vtcbench.models import MODELS, load_model

#: where the toys run; `VTCBENCH_TEST_DEVICE=cuda` runs the invariants and oracles on a GPU in float32
#: (benchmarks/gpu_check.sh), with cuDNN's TF32 convolutions (the Qwen towers' patch embedding) off
DEVICE = os.environ.get("VTCBENCH_TEST_DEVICE", "cpu")
if DEVICE == "cuda":
    torch.backends.cudnn.allow_tf32 = False
TOYS = sorted(alias for alias, spec in MODELS.items() if spec.toy)
ATTENTION = ("eager", "sdpa")
# (width, height): 16, 12, 4 and 24 (Qwen3-VL: 20) visual tokens on the Qwen toys; 64 each on LLaVA's
SIZES = [(112, 112), (84, 112), (56, 56), (168, 112)]
QUESTIONS = ["what color is it ?", "how many are there in the picture , please ?", "why ?", "is it big ?"]
NEW_TOKENS = 3
# every in-LLM method on the 4-layer toys: first legal action layer and a later one
CASES = {
    "fastv-first": ("fastv", {"layer": 1, "drop_ratio": 0.5}),
    "fastv": ("fastv", {"layer": 2, "drop_ratio": 0.7}),
    "pdrop": ("pdrop", {"layers": (1, 3), "keep_ratio": 0.5}),
    "vico": ("vico", {"stages": 4, "keep_ratio": 0.5}),
    "llavolta-first": ("llavolta", {"layer": 0, "stride": 2}),
    "llavolta": ("llavolta", {"layer": 2, "stride": 2}),
    "random-first": ("random", {"layer": 0, "drop_ratio": 0.5}),
    "random": ("random", {"layer": 2, "drop_ratio": 0.3}),
    "kmeans": ("kmeans", {"layer": 1, "clusters": 4, "iters": 3}),
    "dart": ("dart", {"layer": 1, "pivot_image_tokens": 1, "pivot_text_tokens": 1, "truncation": 2}),
    "sparsevlm": ("sparsevlm", {"tokens": 192}),
    "divprune": ("divprune", {"ratio": 0.3}),
}
KEEP_ALL = {
    "fastv": {"layer": 1, "drop_ratio": 0.0},
    "pdrop": {"layers": (1, 3), "keep_ratio": 1.0},
    "vico": {"stages": 4, "keep_ratio": 1.0},
    "llavolta": {"layer": 0, "stride": 1},
    "random": {"layer": 2, "drop_ratio": 0.0},
    "divprune": {"ratio": 1.0},
}
IN_LLM = sorted(name for name, cls in METHODS.items() if cls.kind.in_llm)


def test_the_matrix_covers_every_family_and_layer_action_method():
    covered = {family_of(MODELS[alias].family).name for alias in TOYS}
    assert covered >= {"llava", "qwen2_vl", "qwen3_vl"}
    assert {name for name, _ in CASES.values()} == set(IN_LLM)


_models: dict = {}


def toy(alias: str, attn: str):
    if (alias, attn) not in _models:
        _models[alias, attn] = load_model(alias, random_weights=True, attn_implementation=attn, device=DEVICE)
    return _models[alias, attn]


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _inputs(model, processor, indices: list[int]) -> dict:
    family = family_of(model)
    texts = [family.prompt(QUESTIONS[i], 1, system=family.system_prompt(model.config)) for i in indices]
    images = [_image(SIZES[i], seed=i) for i in indices]
    return dict(processor(images=images, text=texts, padding=True, return_tensors="pt").to(DEVICE))


def _generate(model, inputs: dict, method, new_tokens: int = NEW_TOKENS):
    with torch.no_grad(), compress(model, method) as engine:
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    return out.sequences[:, -new_tokens:], torch.stack(out.logits, dim=1), engine.applied_image_tokens_per_sample


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("name", sorted(KEEP_ALL))
@pytest.mark.parametrize("alias", TOYS)
def test_keep_all_equals_vanilla(alias, name, attn):
    model, processor = toy(alias, attn)
    inputs = _inputs(model, processor, [0, 1, 2, 3])
    tokens, logits, counts = _generate(model, inputs, get_method("vanilla"))
    kept_tokens, kept_logits, kept_counts = _generate(model, inputs, get_method(name, **KEEP_ALL[name]))
    assert torch.equal(kept_tokens, tokens)
    torch.testing.assert_close(kept_logits, logits, atol=1e-4, rtol=1e-4)
    assert kept_counts == counts


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("alias", TOYS)
def test_mixed_batch_equals_each_prompt_alone_with_the_planned_counts(alias, case, attn):
    model, processor = toy(alias, attn)
    name, params = CASES[case]
    method = get_method(name, **params)
    tokens, logits, counts = _generate(model, _inputs(model, processor, [0, 1, 2, 3]), method)
    image_token = family_of(model).image_token_id(model.config)
    for row in range(4):
        alone = _inputs(model, processor, [row])
        alone_tokens, alone_logits, alone_counts = _generate(model, alone, method)
        assert tokens[row].tolist() == alone_tokens[0].tolist(), row
        torch.testing.assert_close(logits[row, 0], alone_logits[0, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-4, rtol=1e-4)
        n_image = int((alone["input_ids"] == image_token).sum())
        assert counts[row] == alone_counts[0] == method.image_tokens_per_layer(n_image, len(counts[row]))
    if name != "kmeans":  # (k-means keeps `clusters` whatever the count)
        assert len({tuple(c) for c in counts}) > 1 or family_of(model).fixed_image_grid


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("alias", TOYS)
def test_cached_decode_equals_an_uncached_rerun_at_every_step(alias, case):
    """The prompt plus the tokens generated so far, run whole without a cache under the method
    (the query stays the last prompt token), predicts each next token with the same logits."""
    model, processor = toy(alias, "sdpa")
    name, params = CASES[case]
    method = get_method(name, **params)
    inputs = _inputs(model, processor, [1])
    tokens, logits, _ = _generate(model, inputs, method, new_tokens=4)
    prompt_length = inputs["input_ids"].shape[1]
    for step in range(4):
        ids = torch.cat([inputs["input_ids"], tokens[:, :step]], dim=1)
        rerun = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
        if "mm_token_type_ids" in inputs:
            rerun["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, step))
        with torch.no_grad(), compress(model, method) as engine:
            engine.prompt_length = prompt_length
            last = model(**rerun, use_cache=False).logits[0, -1]
        torch.testing.assert_close(last, logits[0, step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("alias", TOYS)
def test_methods_a_family_cannot_run_are_refused_in_one_line(alias):
    model, _ = toy(alias, "sdpa")
    family = family_of(model)
    refused = [name for name, cls in METHODS.items() if family.refusal(cls)]
    assert bool(refused) != family.fixed_image_grid or family.name == "llava"
    for name in refused:
        with pytest.raises(VtcbenchError, match=f"^{name} cannot run on the {family.name} family: [^\n]+$"), compress(model, get_method(name)):
            pass


# -- oracles on the M-RoPE families ------------------------------------------------------------------

MROPE_TOYS = [alias for alias in TOYS if family_of(MODELS[alias].family).position_rows > 1]
ORACLE_CASES = {
    "fastv": ({"layer": 2, "drop_ratio": 0.5}, lambda n: OraclePlan("fastv", {2: n - n // 2}, "keep")),
    "pdrop": ({"layers": (1, 3), "keep_ratio": 0.5}, lambda n: OraclePlan("pdrop", {1: n // 2, 3: n // 4}, "compact")),
    "llavolta": ({"layer": 2, "stride": 2}, lambda n: OraclePlan("llavolta", {2: 2}, "pooled")),
    "llavolta-layer0": ({"layer": 0, "stride": 4}, lambda n: OraclePlan("llavolta", {0: 4}, "pooled")),
}


def official_mrope_rows(input_ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """Qwen's own rule for an unpadded prompt of text and single-frame images (`get_rope_index` of
    Qwen2-VL, Qwen2.5-VL and Qwen3-VL, e.g. QwenLM/Qwen2.5-VL's modeling code): a text token takes
    the next id on all three rows; an image starts at that id, temporal row constant, height and
    width rows advancing over its merged grid; the text after it continues at start + max(h, w)."""
    rows, at, index, grids = [], 0, 0, iter(grids)
    while index < len(input_ids):
        if input_ids[index] != image_token_id:
            rows.append([at, at, at])
            at, index = at + 1, index + 1
            continue
        _, height, width = next(grids)
        height, width = height // merge, width // merge
        rows += [[at, at + row, at + column] for row in range(height) for column in range(width)]
        at, index = at + max(height, width), index + height * width
    return torch.tensor(rows).T


@pytest.mark.parametrize("alias", MROPE_TOYS)
def test_mrope_positions_are_qwens_official_ones(alias):
    """The ids the model hands its language model, for a left-padded batch of a square and two
    non-square images. transformers 5.5.0-5.5.3 fails this on Qwen2.5-VL (an image's temporal
    row is start * tokens_per_second), which is why pyproject.toml's floor is 5.6."""
    model, processor = toy(alias, "eager")
    inputs = _inputs(model, processor, [0, 1, 3])
    family = family_of(model)
    image_token = family.image_token_id(model.config)
    merge = model.config.vision_config.spatial_merge_size
    with torch.no_grad():
        given = language_model_inputs(model, inputs)["position_ids"][-3:]  # 5.24 adds a text row first
    grids = iter(inputs["image_grid_thw"].tolist())
    for row, (ids, mask) in enumerate(zip(inputs["input_ids"].tolist(), inputs["attention_mask"].bool())):
        real = [token for token, keep in zip(ids, mask.tolist()) if keep]
        expected = official_mrope_rows(real, image_token, [next(grids)], merge)
        assert torch.equal(given[:, row, mask], expected), (row, given[:, row, mask], expected)


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
@pytest.mark.parametrize("alias", MROPE_TOYS)
def test_mrope_methods_equal_an_oracle_on_the_gathered_3d_positions(alias, case):
    """Greedy decoding with compressed caches equals the oracle rerunning the surviving tokens,
    with their original M-RoPE rows (pooled: the floor of the mean per row) and, on Qwen3-VL,
    DeepStack features added to exactly the surviving (or pooled) visual tokens."""
    params, plan = ORACLE_CASES[case]
    model, processor = toy(alias, "eager")
    inputs = _inputs(model, processor, [0])
    image_token = family_of(model).image_token_id(model.config)
    n_image = int((inputs["input_ids"] == image_token).sum())
    tokens, logits, _ = _generate(model, inputs, get_method(case.split("-")[0], **params), new_tokens=4)
    with torch.device(DEVICE):  # (the oracle's own tensors)
        expected_tokens, expected_logits = mrope_oracle_greedy(model, inputs, image_token, plan(n_image), 4)
    assert tokens[0].tolist() == expected_tokens
    torch.testing.assert_close(logits[0], torch.stack(expected_logits), atol=1e-4, rtol=1e-4)


# -- FLOPs: analytic equals measured on every family -----------------------------------------------------

FLOPS_CASES = {
    "vanilla": {},
    "fastv": {"layer": 2, "drop_ratio": 0.5},
    "pdrop": {"layers": (1, 3), "keep_ratio": 0.5},
    "llavolta": {"layer": 2, "stride": 2},
    "random": {"layer": 0, "drop_ratio": 0.5},
    "kmeans": {"layer": 1, "clusters": 4},
}


@pytest.mark.parametrize("name", sorted(FLOPS_CASES))
@pytest.mark.parametrize("alias", TOYS)
def test_analytic_flops_equal_the_measured_count_per_part(alias, name):
    """Vision tower (Qwen2.5-VL's windows, Qwen3-VL's DeepStack mergers), projector (merger) and
    language model (grouped-query projections, LM head, the method's scoring) agree with torch's
    flop counter within 1%, at the image's own size."""
    from vtcbench.families import model_facts
    from vtcbench.profilers.flops import analytic_flops
    from vtcbench.profilers.opcount import count_ops

    model, processor = toy(alias, "sdpa")
    inputs = _inputs(model, processor, [3])
    method = get_method(name, **FLOPS_CASES[name])
    n_image = int((inputs["input_ids"] == family_of(model).image_token_id(model.config)).sum())
    facts = model_facts(model, image_size=SIZES[3] if family_of(model).dynamic_resolution else None)
    assert facts.image_tokens == n_image
    report = analytic_flops(method, facts, model=alias, text_tokens=inputs["input_ids"].shape[1] - n_image)
    count = count_ops(model, inputs, method)
    assert count.tflops("vision_tower") == pytest.approx(report.tflops_vision_encoder, rel=0.01)
    assert count.tflops("projector") == pytest.approx(report.tflops_projector, rel=0.01)
    language = report.tflops_language_model
    assert count.tflops("language_model") == pytest.approx(language, rel=0.01)
    assert count.other_macs == 0


# -- through the CLI -----------------------------------------------------------------------------------------


def _cli(*args: str):
    from typer.testing import CliRunner

    from vtcbench.cli import app

    return CliRunner().invoke(app, list(args))


def _predictions(folder) -> dict:
    import json
    from pathlib import Path

    (run_folder,) = Path(folder).iterdir()
    lines = (run_folder / "samples.jsonl").read_text().splitlines()
    return {(r["doc_id"], r["request_index"]): (r["prediction"], r["image_tokens_per_layer"]) for r in map(json.loads, lines)}


@pytest.mark.parametrize("alias", [alias for alias in TOYS if MODELS[alias].family != "llava"])
def test_run_batch_of_4_equals_batch_of_1(alias, tmp_path):
    """`vtcbench run` through lmms-eval: vtcshapes' images at the family's own resolution, fastv
    in batches of 4 (left-padded, visual-token counts per sample) equals one prompt at a time."""
    common = ("run", "--model", alias, "--random-weights", "--method", "fastv", "--set", "layer=1", "--tasks", "vtcshapes",
              "--limit", "8")
    for batch in ("1", "4"):
        result = _cli(*common, "--batch-size", batch, "--out", str(tmp_path / batch))
        assert result.exit_code == 0, result.output
    single, batched = _predictions(tmp_path / "1"), _predictions(tmp_path / "4")
    assert batched == single and len(single) == 8
    assert any(prediction for prediction, _ in single.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (("run", "--model", "tiny-qwen2.5-vl", "--random-weights", "--method", "avgpool", "--tasks", "vtcshapes"),
         "avgpool cannot run on the qwen2_vl family: "),
        (("run", "--model", "tiny-qwen3-vl", "--random-weights", "--method", "voco", "--tasks", "vtcshapes"),
         "voco cannot run on the qwen3_vl family: "),
        (("flops", "--model", "qwen2.5-vl-7b", "--image-size", "2000x5"), "aspect ratio over 200"),
        (("flops", "--model", "qwen2.5-vl-7b", "--image-size", "big"), "not WIDTHxHEIGHT"),
        (("flops", "--model", "llava-1.5-7b", "--image-size", "640x480"), "fixed size"),
        (("flops", "--model", "qwen3-vl-8b", "--method", "stf"), "stf cannot run on the qwen3_vl family"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(args, message, tmp_path):
    out = tmp_path / "out"
    result = _cli(*args, *(("--out", str(out)) if args[0] == "run" else ()))
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0, result.output
    assert not out.exists()


# -- training on a Qwen model ------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["tiny-qwen2.5-vl", "vtc-tiny-qwen"])
def test_the_merged_unit_order_is_the_towers_window_order(alias):
    """Training's auxiliary losses read the merger's input and output, which Qwen2.5-VL's tower
    holds in window order: `unit_order` must be the permutation the tower undoes after its merger."""
    from vtcbench.models import load_config, random_model

    config = load_config(alias)
    model = random_model(config)
    family = family_of(model)
    grid = family.image_grid(config, (224, 168))
    pre = []
    handle = family.projector(model).register_forward_hook(lambda module, args, out: pre.append(out))
    patches = torch.randn(int(np.prod(grid)), 3 * 2 * 14 * 14)
    with torch.no_grad():
        final = family.vision_tower(model)(patches, grid_thw=torch.tensor([grid]))
    handle.remove()
    final = getattr(final, "pooler_output", final)
    final = final[0] if isinstance(final, (tuple, list)) else final
    order = family.unit_order(config, grid)
    assert not torch.equal(order, torch.arange(len(order)))  # the toy's windows do permute
    torch.testing.assert_close(pre[0][order.argsort()], final)


def test_train_a_qwen_model_and_load_it_back(tmp_path):
    """`vtcbench train --model vtc-tiny-qwen` (2 steps) writes a folder that loads offline, with
    its processor (no video processor without torchvision), and answers through the engine."""
    from vtcbench.training import TrainConfig, train

    result = train(TrainConfig(out=tmp_path / "qwen", model="vtc-tiny-qwen", steps=2, batch_size=4, test_per_family=2))
    assert set(result.accuracy["vanilla"]) >= {"color", "count", "overall"}
    model, processor = load_model(str(tmp_path / "qwen"))
    assert family_of(model).name == "qwen2_vl"
    image = Image.fromarray(np.zeros((112, 112, 3), dtype=np.uint8))
    inputs = processor(images=[image], text=[family_of(model).prompt("what ?", 1)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64  # 112 px scenes seen at 224 px
    tokens, _, counts = _generate(model, dict(inputs), get_method("fastv"), new_tokens=2)
    assert counts[0] == [64, 64, 32, 32, 32, 32]


def test_keep_indices_on_qwen_record_the_merged_grid(tmp_path):
    """Retention pictures on Qwen: the kept ranks index the merged 2x2 grid of the image, in raster order."""
    import json

    result = _cli("run", "--model", "tiny-qwen2.5-vl", "--random-weights", "--method", "fastv", "--set", "layer=1",
                  "--tasks", "vtcshapes", "--limit", "2", "--keep-indices", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    for record in records:
        rows, cols = record["image_grid"]
        n = record["image_tokens"]
        assert rows * cols == n and rows == cols  # vtcshapes' square scene, resized as lmms-eval's Qwen class does
        assert record["kept_image_tokens"]["0"] == list(range(n)) and len(record["kept_image_tokens"]["1"]) == n - n // 2
        assert (folder / record["retention_image"]).is_file()
