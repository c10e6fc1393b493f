"""vtcshapes_mc: the shipped multiple-choice variant of vtcshapes, scored by log-likelihood, offline."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pandas as pd
import pytest

from vtcbench import shapes
from vtcbench.tasks import TASKS, local_task_config, shipped_data, short_name
from vtcbench.tasks.vtcshapes import utils


@pytest.fixture(scope="module")
def task(cache, tmp_path_factory):
    """The task as lmms-eval builds it from the shipped YAML on the default vtcshapes parquet."""
    from lmms_eval.tasks import get_task_dict

    from vtcbench.tasks import task_manager

    info = TASKS["vtcshapes_mc"]
    workdir = tmp_path_factory.mktemp("work")
    name = local_task_config(info, shipped_data(info, None), workdir)
    assert name == "vtc_local_vtcshapes_mc"
    return get_task_dict([name], task_manager(workdir, include_defaults=False))[name]


def test_registry_reads_vtcshapes_data(cache, tmp_path):
    info = TASKS["vtcshapes_mc"]
    assert info.shipped_yaml and not info.needs_judge and not info.needs_submission
    assert short_name("vtc_local_vtcshapes_mc") == "vtcshapes_mc"
    default = shapes.default_dataset().parent
    assert shipped_data(info, None) == default
    assert shipped_data(info, tmp_path) == default  # a --data-dir without vtcshapes data
    (tmp_path / "vtcshapes.parquet").write_bytes(shapes.default_dataset().read_bytes())
    assert shipped_data(info, tmp_path) == tmp_path  # vtcshapes' own file serves the variant


def test_choices_and_target_of_one_doc_per_family_are_the_datasets_answer(task):
    assert task.OUTPUT_TYPE == "multiple_choice" and task.higher_is_better() == {"acc": True}
    docs = task.test_docs().remove_columns("image")
    first = {}
    for index, family in enumerate(docs["family"]):
        first.setdefault(family, index)
    assert set(first) == set(shapes.FAMILIES)
    expected = {
        "color": list(shapes.COLORS),
        "presence": ["yes", "no"],
        "count": [str(n) for n in shapes.COUNTS],
        "text": list(shapes.LETTERS),
    }
    frame = pd.read_parquet(shapes.default_dataset(), columns=["question", "answer", "family"])
    for family, index in first.items():
        doc = docs[index]
        assert frame.family[index] == family and doc["answer"] == frame.answer[index]
        choices, target = task.doc_to_choice(doc), task.doc_to_target(doc)
        assert choices == expected[family]
        assert choices[target] == frame.answer[index]
        assert task.doc_to_text(doc) == frame.question[index]  # vtcshapes' bare question
        requests = task.construct_requests(
            index, task.doc_to_text(doc), metadata={"task": task.config.task, "doc_id": index, "repeats": 1, "split": "test"}
        )
        assert [r.request_type for r in requests] == ["loglikelihood"] * len(choices)
        assert [r.arguments[1] for r in requests] == choices  # target_delimiter "": the prompt adds the space


def test_targets_are_the_answers_index():
    doc = {"question_id": "q", "family": "presence", "answer": "no"}
    assert utils.vtcshapes_mc_doc_to_target(doc) == 1
    with pytest.raises(ValueError, match="not a presence choice"):
        utils.vtcshapes_mc_doc_to_target({**doc, "answer": "Yes"})


def test_run_with_vtc_tiny_sends_loglikelihood_requests(cache, tmp_path):
    from vtcbench.runner import RunConfig, run

    folder = run(RunConfig(model="vtc-tiny", method="vanilla", tasks=["vtcshapes_mc"], limit=8, out=tmp_path,
                           show_progress=False)).folder
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    families = pd.read_parquet(shapes.default_dataset(), columns=["family"]).family
    assert sorted({r["doc_id"] for r in records}) == list(range(8))
    assert len(records) == sum(len(utils.MC_CHOICES[families[i]]) for i in range(8))  # one per choice
    assert all(r["request_type"] == "loglikelihood" for r in records)
    assert all(r["prediction"][0] >= 0 for r in records)  # a loss, as lmms-eval's own models return
    metrics = json.loads((folder / "summary.json").read_text())["tasks"]["vtc_local_vtcshapes_mc"]["metrics"]
    # the trained model answers these (vanilla: 95.6% as generation); scoring the choices the wrong
    # way round (the argmin over log P) would give about 0
    assert metrics["acc,none"] >= 0.75
