"""Qwen through lmms-eval: vtcbench does to a request what lmms-eval 0.7.3's own class for the
model type does (`lmms_eval/models/simple/qwen2_vl.py`, `qwen2_5_vl.py`, `qwen3_vl.py`), so that
its answers are that class's.

The answers themselves are compared with the `qwen2_5_vl` class, run as users run it and driven
by lmms-eval's `simple_evaluate` (the `*_as_lmms_evals_own_class` tests): the shipped
vtc-tiny-qwen on 200 vtcshapes questions, and a random-weight tiny Qwen2.5-VL at the class's
default pixel bounds. The class needs `qwen_vl_utils` and `decord` (the test extra installs both)
and torchvision, which does not load beside the CPU torch of the README's install: there these
two tests skip, saying so, and they run in CI's lowest and newest environments, whose torch and
torchvision are a matching pair. The other tests check each convention on its own, with the
values the classes' source gives, and that a saved Qwen folder runs through `vtcbench run`.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models.model_utils.media_encoder import encode_image_to_data_url
from PIL import Image
from typer.testing import CliRunner

from vtcbench.cli import app
from vtcbench.families import family_of
from vtcbench.lmms_model import VtcbenchLMM, generation_settings
from vtcbench.methods import get_method
from vtcbench.models import load_model
from vtcbench.results import RunFolder

QWEN_TOYS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl")
_models: dict[str, tuple] = {}


def toy(alias: str) -> tuple:
    if alias not in _models:
        _models[alias] = load_model(alias, random_weights=True)
    return _models[alias]


def _noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


@pytest.fixture(scope="module")
def qwen25_folder(tmp_path_factory) -> Path:
    """tiny-qwen2.5-vl's seeded random weights and offline processor, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-qwen2.5-vl")
    model, processor = load_model("tiny-qwen2.5-vl", random_weights=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _class_cannot_load() -> str | None:
    """Why lmms-eval's own `qwen2_5_vl` class cannot run here, or None."""
    try:
        import decord  # noqa: F401  (lmms-eval's qwen2_5_vl module imports it)
        import qwen_vl_utils  # noqa: F401  (imports torchvision)
    except Exception as error:  # ImportError, or torchvision's "operator torchvision::nms does not exist"
        first = str(error).strip().splitlines()
        return (f"lmms-eval's qwen2_5_vl class needs decord, qwen-vl-utils and a torchvision that loads "
                f"({type(error).__name__}: {first[0] if first else ''})")
    return None


def class_answers(folder: Path, samples: int, workdir: Path, **pixels: int) -> dict[int, str]:
    """lmms-eval's own `qwen2_5_vl` class on the first `samples` vtcshapes questions, by doc id:
    constructed on the folder (bfloat16, as it always loads), `device_map="cpu"` besides `device`
    (its default "auto" sends the inputs to CUDA whatever `device` says), `pixels` its min/max."""
    import argparse

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL

    from vtcbench.runner import load_tasks, task_names
    from vtcbench.tasks import resolve_tasks

    model = Qwen2_5_VL(pretrained=str(folder), device="cpu", device_map="cpu", batch_size=1, **pixels)
    names, manager = task_names(resolve_tasks(["vtcshapes"]), None, workdir)
    results = simple_evaluate(
        model=model, tasks=load_tasks(names, manager), task_manager=manager, limit=samples, log_samples=True,
        cli_args=argparse.Namespace(output_path=str(workdir), process_with_media=False), verbosity="ERROR",
    )
    return {int(s["doc_id"]): s["resps"][0][0] for s in results["samples"][names[0]]}


def _run(folder: Path, out: Path, method: str, *settings: str, limit: int = 6, dtype: str = "auto") -> list[dict]:
    args = ["run", "--model", str(folder), "--method", method, "--tasks", "vtcshapes", "--limit", str(limit), "--device", "cpu",
            "--dtype", dtype, "--out", str(out)]
    for setting in settings:
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_folder,) = [p for p in out.iterdir() if p.is_dir()]
    return sorted((json.loads(line) for line in (run_folder / "samples.jsonl").read_text().splitlines()), key=lambda r: r["doc_id"])


def test_a_saved_qwen_folder_runs_with_the_class_pixel_bounds_and_keep_all_fastv_answers_alike(qwen25_folder, tmp_path, monkeypatch):
    """The folder's processor loads without torchvision; the 112-pixel vtcshapes images get the
    class's bounds (min 256*28*28 pixels: 448x448, 256 merged tokens), not the folder's (4..64
    merged tokens: 16)."""
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    vanilla = _run(qwen25_folder, tmp_path / "vanilla", "vanilla")
    keep_all = _run(qwen25_folder, tmp_path / "fastv", "fastv", "drop_ratio=0")
    assert [r["image_tokens"] for r in vanilla] == [256] * 6
    assert any(r["prediction"] for r in vanilla)
    assert [r["prediction"] for r in keep_all] == [r["prediction"] for r in vanilla]


@pytest.mark.skipif(_class_cannot_load() is not None, reason=str(_class_cannot_load()))
def test_vtc_tiny_qwen_answers_200_questions_as_lmms_evals_own_class(tmp_path, monkeypatch):
    """The shipped model; the class gets the model's own pixel bounds (224x224: 64 visual tokens),
    which `vtcbench run` takes from the config (`vtcbench_pixel_bounds`)."""
    from vtcbench.models import MODELS

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = Path(MODELS["vtc-tiny-qwen"].source)
    (tmp_path / "class").mkdir()
    reference = class_answers(folder, 200, tmp_path / "class", min_pixels=224 * 224, max_pixels=224 * 224)
    ours = _run(folder, tmp_path / "vanilla", "vanilla", limit=200, dtype="bfloat16")
    assert len(reference) == 200 and [r["image_tokens"] for r in ours] == [64] * 200
    assert {r["doc_id"]: r["prediction"] for r in ours} == reference


@pytest.mark.skipif(_class_cannot_load() is not None, reason=str(_class_cannot_load()))
def test_a_random_tiny_qwen25_answers_as_lmms_evals_own_class_at_its_default_pixels(qwen25_folder, tmp_path, monkeypatch):
    """The class's default bounds (256 merged tokens for a vtcshapes image); vanilla and fastv at keep-all."""
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "class").mkdir()
    reference = class_answers(qwen25_folder, 12, tmp_path / "class")
    assert any(reference.values())  # an all-empty comparison would prove nothing
    for method, settings in (("vanilla", ()), ("fastv", ("drop_ratio=0",))):
        ours = _run(qwen25_folder, tmp_path / method, method, *settings, limit=12, dtype="bfloat16")
        assert {r["doc_id"]: r["prediction"] for r in ours} == reference, method


@pytest.mark.parametrize(
    ("alias", "bounds"),
    [("tiny-qwen2-vl", (3136, 602112)), ("tiny-qwen2.5-vl", (200704, 1605632)), ("tiny-qwen3-vl", (200704, 1605632))],
)
def test_the_processor_takes_the_class_pixel_bounds_and_the_callers_is_left_alone(alias, bounds):
    model, processor = toy(alias)

    def pixel_bounds(processor) -> tuple[int, int]:
        size = processor.image_processor.size
        return size.shortest_edge, size.longest_edge

    before = pixel_bounds(processor)
    evaluated = family_of(model).evaluation_processor(processor, model.config)
    assert pixel_bounds(evaluated) == bounds
    assert pixel_bounds(processor) == before != bounds  # the toy's own: 4..64 merged tokens
    assert evaluated.tokenizer is processor.tokenizer


def test_llava_keeps_its_processor_and_rgb_images():
    model, processor = toy("tiny")
    family = family_of(model)
    image = _noise(60, 40, "RGBA")
    assert family.evaluation_processor(processor, model.config) is processor
    (kept,) = family.evaluation_images([image], model.config)
    assert kept.size == (60, 40) and np.array_equal(np.asarray(kept), np.asarray(image.convert("RGB")))


def _from_data_url(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split("base64,", 1)[1]))).convert("RGB")


@pytest.mark.parametrize(
    ("alias", "jpeg", "sizes"),
    [
        # qwen2_vl: 3136..602112 pixels in multiples of 28 (112x112 and 300x200 fit as they are, rounded)
        ("tiny-qwen2-vl", True, {(112, 112): (112, 112), (300, 200): (308, 196)}),
        # qwen2_5_vl: at least 200704 pixels, multiples of 28
        ("tiny-qwen2.5-vl", True, {(112, 112): (448, 448), (300, 200): (560, 392)}),
        # qwen3_vl: the same bounds, multiples of 32 (image_patch_size=16), the PIL image itself
        ("tiny-qwen3-vl", False, {(112, 112): (448, 448), (300, 200): (576, 384)}),
    ],
)
def test_images_reach_the_processor_as_the_class_sends_them(alias, jpeg, sizes):
    """qwen2_vl / qwen2_5_vl send a JPEG data URL of quality 85 (RGB first: an alpha channel is
    dropped); qwen3_vl the image, which qwen_vl_utils puts onto white when it has alpha; then
    `fetch_image` resizes with PIL's default filter to its `smart_resize`."""
    model, _ = toy(alias)
    for (width, height), target in sizes.items():
        for mode in ("RGB", "RGBA"):
            image = _noise(width, height, mode)
            if jpeg:
                sent = _from_data_url(encode_image_to_data_url(
                    image, image_format="JPEG", mime_type="image/jpeg", convert_rgb=True, quality=85))
            elif mode == "RGBA":
                sent = Image.new("RGB", image.size, (255, 255, 255))
                sent.paste(image, mask=image.split()[3])
            else:
                sent = image
            (prepared,) = family_of(model).evaluation_images([image], model.config)
            assert prepared.mode == "RGB" and prepared.size == target
            assert np.array_equal(np.asarray(prepared), np.asarray(sent.resize(target)))


def _lmm(alias: str, tmp_path: Path) -> VtcbenchLMM:
    model, processor = toy(alias)
    folder = RunFolder.open(tmp_path / alias, {"model": alias, "method": "vanilla"}, {"git_revision": "x"})
    lmm = VtcbenchLMM(model, processor, get_method("vanilla"), folder, show_progress=False)
    lmm.task_dict = {"toy": {"test": [{"image": _noise(112, 112), "question": "What color is the circle ?"}]}}
    return lmm


def _request(gen_kwargs: dict) -> Instance:
    args = ("What color is the circle ?", gen_kwargs, lambda doc: [doc["image"]], 0, "toy", "test")
    return Instance(request_type="generate_until", arguments=args, idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1})


@pytest.mark.parametrize(
    ("alias", "default_tokens", "stops", "answer", "eos_passed"),
    [
        ("tiny", 128, ["\n\n", "blue"], "red", False),  # vtcbench's own rules, unchanged for LLaVA
        ("tiny-qwen2-vl", 128, ["\n\n", "blue"], "red", True),
        ("tiny-qwen2.5-vl", 32768, ["blue"], "red ", True),  # drops "\n\n", returns the text unstripped
        ("tiny-qwen3-vl", 128, ["blue"], "red ", True),
    ],
)
def test_answers_follow_the_class_rules(alias, default_tokens, stops, answer, eos_passed, tmp_path, monkeypatch):
    """Default length, ignored stop strings, stripping, and whether `generate` ends at the
    tokenizer's eos only (Qwen's hub generation configs also list <|endoftext|>)."""
    lmm = _lmm(alias, tmp_path)
    assert generation_settings(_request({"until": ["\n\n", "blue"]}), lmm.rules) == (default_tokens, stops)
    ids = torch.tensor([lmm.tokenizer("red blue", add_special_tokens=False)["input_ids"]])
    assert lmm._answers(ids, stops) == [(answer, 2)]

    seen: dict = {}
    generate = lmm.model.generate

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(lmm.model, "generate", recording)
    (text,) = lmm.generate_until([_request({"max_new_tokens": 3})])
    assert isinstance(text, str) and seen["max_new_tokens"] == 3
    assert ("eos_token_id" in seen) == eos_passed
    if eos_passed:
        assert seen["eos_token_id"] == lmm.tokenizer.eos_token_id
