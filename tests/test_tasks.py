"""Task registry and offline datasets, through lmms-eval 0.7.3's own task code (no mocks).

The five local datasets (tests/task_data.py) are loaded by lmms-eval's TaskManager from the
include YAMLs vtcbench writes; its doc_to_visual / doc_to_text / process_results and metric
aggregations then run on them. Everything is offline.
"""

from __future__ import annotations

import argparse
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import task_data
from PIL import Image

from vtcbench.errors import VtcbenchError
from vtcbench.tasks import (
    TASKS,
    list_tasks,
    local_task_config,
    resolve_tasks,
    short_name,
    task_manager,
)

SHORT_NAMES = {
    "gqa": "gqa", "textvqa": "textvqa_val", "pope": "pope", "mme": "mme", "docvqa": "docvqa_val",
    "sqa": "scienceqa_img", "mmb": "mmbench_en_dev", "seed": "seedbench", "mmstar": "mmstar", "ai2d": "ai2d",
    "chartqa": "chartqa", "vqav2": "vqav2_val", "vizwiz": "vizwiz_vqa_val", "infovqa": "infovqa_val",
}
# metric -> its value for a perfect model on the 6-row fixtures
PERFECT = {
    "gqa": {"exact_match": 1.0},
    "textvqa": {"exact_match": 1.0},
    "pope": {"pope_accuracy": 1.0, "pope_f1_score": 1.0},
    "mme": {"mme_perception_score": 400.0, "mme_cognition_score": 200.0},  # 2 + 1 subtasks, 100 acc + 100 acc+
    "docvqa": {"anls": 1.0},
}
POST_PROMPT = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory):
    """Keep lmms-eval's parquet -> arrow conversions out of the user's HF cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
        yield


@pytest.fixture(scope="session")
def local(tmp_path_factory, datasets_cache):
    """The five fixtures, their include YAMLs, and the lmms-eval task objects built from them."""
    from lmms_eval.tasks import get_task_dict

    data_dir = task_data.write_all(tmp_path_factory.mktemp("data"))
    workdir = tmp_path_factory.mktemp("tasks")
    names = {short: local_task_config(TASKS[short], data_dir, workdir) for short in task_data.SHORT_NAMES}
    manager = task_manager(workdir, include_defaults=False)
    objects = get_task_dict(list(names.values()), manager)
    return {"data_dir": data_dir, "workdir": workdir, "names": names, "tasks": {s: objects[n] for s, n in names.items()}}


def _docs(task):
    return task.test_docs() if task.has_test_docs() else task.validation_docs()


def _aggregate(task, docs, predict) -> dict[str, float]:
    """lmms-eval's process_results per doc, then the task's own aggregation per metric."""
    per_metric: dict[str, list] = {}
    for doc in docs:
        for metric, value in task.process_results(doc, [predict(doc)]).items():
            per_metric.setdefault(metric, []).append(value)
    return {m: task.aggregation()[m](values) for m, values in per_metric.items() if m != "submission"}


# ---------------------------------------------------------------------------------------------
# names


class _NoIndex:
    def __getattr__(self, name):
        raise AssertionError("short names must resolve without lmms-eval's task index")


def test_short_names_resolve_without_the_task_index():
    infos = resolve_tasks(list(SHORT_NAMES) , allow_judge=True, task_manager=_NoIndex())
    assert {i.short: i.lmms_name for i in infos} == SHORT_NAMES
    assert [r["short"] for r in list_tasks()] == [*SHORT_NAMES, "vtcshapes", "vtcshapes_mc"]  # + vtcbench's own
    assert short_name("vtc_local_textvqa_val") == "textvqa" and short_name("ok_vqa_val2014") == "ok_vqa_val2014"
    assert short_name("vtc_local_vtcshapes") == "vtcshapes"


def test_duplicates_collapse_and_lmms_names_of_short_tasks_resolve():
    infos = resolve_tasks(["textvqa", "textvqa_val", " gqa ", "gqa"], task_manager=_NoIndex())
    assert [i.short for i in infos] == ["textvqa", "gqa"]


def test_other_lmms_eval_tasks_pass_through():
    (info,) = resolve_tasks(["ok_vqa_val2014"])
    assert (info.short, info.lmms_name, info.needs_judge, info.needs_submission) == (
        "ok_vqa_val2014", "ok_vqa_val2014", False, False,
    )
    (static,) = resolve_tasks(["mmbench_en_dev_static"])  # lmms-eval's judge-free MMBench
    assert not static.needs_judge


def test_unknown_task_is_one_line_with_close_names():
    with pytest.raises(VtcbenchError) as error:
        resolve_tasks(["gqa", "textvqa_vall"])
    message = str(error.value)
    assert "\n" not in message and "'textvqa_vall'" in message
    assert "textvqa_val" in message and "vtcbench tasks" in message


def test_judge_and_submission_tasks_need_opt_in():
    with pytest.raises(VtcbenchError, match="--allow-judge"):
        resolve_tasks(["pope", "mmb"])
    assert resolve_tasks(["mmb"], allow_judge=True)[0].lmms_name == "mmbench_en_dev"
    with pytest.raises(VtcbenchError, match="--allow-judge"):
        resolve_tasks(["llava_in_the_wild"])  # pass-through, GPT-4 judged
    with pytest.raises(VtcbenchError, match="--allow-submission"):
        resolve_tasks(["docvqa_test"])
    assert resolve_tasks(["docvqa_test"], allow_submission=True)[0].needs_submission


def test_short_name_flags_agree_with_the_task_yamls():
    from vtcbench.tasks.registry import _flags

    manager = task_manager()
    for info in TASKS.values():
        assert _flags(info.lmms_name, manager) == (info.needs_judge, info.needs_submission), info.short


# ---------------------------------------------------------------------------------------------
# local datasets through lmms-eval's task code


@pytest.mark.parametrize("short", task_data.SHORT_NAMES)
def test_local_task_runs_lmms_eval_task_code(local, short):
    task = local["tasks"][short]
    assert task.config.task == local["names"][short] == f"vtc_local_{TASKS[short].lmms_name}"
    docs = _docs(task)
    assert len(docs) == 6
    expected = dict(task_data.FEATURES["gqa" if short == "gqa" else short])
    if short == "gqa":
        expected["image"] = task_data.Image()  # joined by vtcbench's offline process_docs
    assert dict(docs.features) == expected  # the hub schema survives lmms-eval's loader

    for doc in docs:
        visuals = task.doc_to_visual(doc)
        assert len(visuals) == 1 and isinstance(visuals[0], Image.Image) and visuals[0].mode == "RGB"
        answer = task_data.correct_prediction(short, doc).lower()
        if short in ("gqa", "textvqa", "docvqa"):  # the answer is the colour in the image
            assert task_data.colour_of(visuals[0]) == answer
        prompt = task.doc_to_text(doc)
        assert isinstance(prompt, str) and prompt.endswith(POST_PROMPT)
        assert doc["question"].split()[1].lower() in prompt.lower()

    right = _aggregate(task, docs, lambda d: task_data.correct_prediction(short, d))
    wrong = _aggregate(task, docs, lambda d: task_data.wrong_prediction(short, d))
    for metric, perfect in PERFECT[short].items():
        assert right[metric] == pytest.approx(perfect), metric
        assert wrong[metric] < right[metric], metric


def test_simple_evaluate_scores_local_tasks(local, tmp_path, monkeypatch):
    """lmms-eval's evaluator end to end with a model object that reads the answer off the image."""
    from lmms_eval.api.model import lmms
    from lmms_eval.evaluator import simple_evaluate

    class ColourReader(lmms):
        def generate_until(self, requests):
            answers = []
            for request in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.arguments
                assert isinstance(gen_kwargs, dict) and context.endswith(POST_PROMPT)
                colour = task_data.colour_of(doc_to_visual(self.task_dict[task][split][doc_id])[0])
                if context.startswith("Is "):
                    answers.append("Yes" if f" {colour} " in context or f" {colour}?" in context else "No")
                else:
                    answers.append(colour)
            return answers

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    monkeypatch.chdir(tmp_path)
    manager = task_manager(local["workdir"])  # lmms-eval's tasks and the local ones
    assert {"vtc_local_pope", "pope", "ok_vqa_val2014"} <= set(manager.all_tasks)
    results = simple_evaluate(
        model=ColourReader(), tasks=list(local["names"].values()), task_manager=manager,
        limit=4, log_samples=False, verbosity="ERROR", bootstrap_iters=0,
        cli_args=argparse.Namespace(output_path=str(tmp_path / "run"), process_with_media=True),
    )["results"]
    assert results["vtc_local_gqa"]["exact_match,none"] == 1.0
    assert results["vtc_local_textvqa_val"]["exact_match,none"] == 1.0
    assert results["vtc_local_pope"]["pope_accuracy,none"] == 1.0
    assert results["vtc_local_mme"]["mme_perception_score,none"] == 400.0  # limit 4: two pairs
    assert results["vtc_local_docvqa_val"]["anls,none"] == 1.0
    assert not (tmp_path / "submissions").exists() and any((tmp_path / "run" / "submissions").iterdir())


# ---------------------------------------------------------------------------------------------
# local data layouts and their errors


def _load(workdir, name):
    from lmms_eval.tasks import get_task_dict

    return get_task_dict([name], task_manager(workdir, include_defaults=False))[name]


def test_saved_datasets_load(tmp_path, datasets_cache):
    from datasets import DatasetDict, load_dataset

    task_data.write_dataset("pope", tmp_path / "raw")
    pope = load_dataset("parquet", data_files={"test": str(tmp_path / "raw" / "pope.parquet")}, split="test",
                        cache_dir=str(tmp_path / "cache"))
    DatasetDict({"test": pope}).save_to_disk(str(tmp_path / "dict" / "pope"))
    pope.save_to_disk(str(tmp_path / "plain" / "pope"))
    for layout in ("dict", "plain"):
        workdir = tmp_path / f"work-{layout}"
        name = local_task_config(TASKS["pope"], tmp_path / layout, workdir)
        text = (workdir / f"{name}.yaml").read_text()
        assert ("load_from_disk: true" in text) == (layout == "dict")
        docs = _docs(_load(workdir, name))
        assert len(docs) == 6 and dict(docs.features) == dict(task_data.FEATURES["pope"])


def test_gqa_images_inline_need_no_images_file(tmp_path, datasets_cache):
    task_data.write_dataset("gqa", tmp_path / "data", images_inline=True)
    name = local_task_config(TASKS["gqa"], tmp_path / "data", tmp_path / "work")
    assert "make_image_docs" in (tmp_path / "work" / f"{name}_docs.py").read_text()
    docs = _docs(_load(tmp_path / "work", name))
    assert [task_data.colour_of(d["image"]) for d in docs] == [d["answer"] for d in docs]


def test_hub_snapshot_layout_picks_the_split(tmp_path):
    snapshot = tmp_path / "data" / "docvqa" / "DocVQA"
    task_data.write_dataset("docvqa", snapshot)
    (snapshot / "docvqa.parquet").rename(snapshot / "validation-00000-of-00001.parquet")
    shutil.copy(snapshot / "validation-00000-of-00001.parquet", snapshot / "test-00000-of-00001.parquet")
    name = local_task_config(TASKS["docvqa"], tmp_path / "data", tmp_path / "work")
    text = (tmp_path / "work" / f"{name}.yaml").read_text()
    assert "validation-00000-of-00001.parquet" in text and "test-00000" not in text

    gqa = tmp_path / "data" / "gqa"  # lmms-lab/GQA: one folder per config
    task_data.write_dataset("gqa", tmp_path / "flat")
    for config, file in (("testdev_balanced_instructions", "gqa"), ("testdev_balanced_images", "gqa_images")):
        (gqa / config).mkdir(parents=True)
        shutil.copy(tmp_path / "flat" / f"{file}.parquet", gqa / config / "testdev-00000-of-00001.parquet")
    name = local_task_config(TASKS["gqa"], tmp_path / "data", tmp_path / "work")
    assert "testdev_balanced_instructions" in (tmp_path / "work" / f"{name}.yaml").read_text()
    assert "testdev_balanced_images" in (tmp_path / "work" / f"{name}_docs.py").read_text()


def test_missing_local_data_is_one_clear_line(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(VtcbenchError) as error:
        local_task_config(TASKS["pope"], tmp_path / "data", tmp_path / "work")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "data" / "pope.parquet") in message

    task_data.write_dataset("gqa", tmp_path / "data")
    (tmp_path / "data" / "gqa_images.parquet").unlink()
    with pytest.raises(VtcbenchError, match="gqa_images.parquet") as error:
        local_task_config(TASKS["gqa"], tmp_path / "data", tmp_path / "work")
    assert "\n" not in str(error.value)


def test_local_data_with_wrong_schema_or_ids_is_refused(tmp_path):
    from datasets import Dataset, Features

    task_data.write_dataset("gqa", tmp_path / "data", n=6)
    task_data.write_dataset("gqa", tmp_path / "few", n=2)  # images of the first question pair only
    shutil.copy(tmp_path / "few" / "gqa_images.parquet", tmp_path / "data" / "gqa_images.parquet")
    with pytest.raises(VtcbenchError, match="miss 2 imageId"):
        local_task_config(TASKS["gqa"], tmp_path / "data", tmp_path / "work")

    rows = [{k: v for k, v in row.items() if k != "answer"} for row in task_data.pope_rows(2)]
    features = Features({k: v for k, v in task_data.FEATURES["pope"].items() if k != "answer"})
    Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "data" / "pope.parquet"))
    with pytest.raises(VtcbenchError, match="lacks column.*answer"):
        local_task_config(TASKS["pope"], tmp_path / "data", tmp_path / "work")
