"""vtcshapes: the generator, its parquet file, and the shipped lmms-eval task end to end, offline."""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vtcbench import shapes
from vtcbench.tasks import TASKS, local_task_config, shipped_data, short_name
from vtcbench.tasks.vtcshapes import utils

METRICS = ("overall", *shapes.FAMILIES)


@pytest.fixture(scope="module")
def held_out() -> list[shapes.Sample]:
    return shapes.split(shapes.TEST_SEED, shapes.TEST_PER_FAMILY)


def _words(question: str) -> list[str]:
    return question.replace("?", " ?").split()


# ---------------------------------------------------------------------------------------------
# the generator


def test_generator_is_deterministic_in_its_seed():
    def key(samples):
        return [(s.scene, s.family, s.question, s.answer) for s in samples]

    assert key(shapes.split(7, 10)) == key(shapes.split(7, 10))
    assert key(shapes.split(7, 10)) != key(shapes.split(8, 10))
    a, b = shapes.split(7, 1)[0].scene, shapes.split(7, 1)[0].scene
    assert np.array_equal(a.render(), b.render())


def test_held_out_split_is_balanced(held_out):
    assert Counter(s.family for s in held_out) == {f: shapes.TEST_PER_FAMILY for f in shapes.FAMILIES}
    presence = [s.answer for s in held_out if s.family == "presence"]
    assert abs(presence.count("yes") / len(presence) - 0.5) <= 0.1
    assert {s.answer for s in held_out if s.family == "count"} == {"1", "2", "3"}


def test_questions_and_answers_are_vocabulary_words_and_true_of_the_scene(held_out):
    for s in held_out:
        objects = s.scene.objects
        assert len({cell for cell, _, _ in objects} | {s.scene.letter_cell}) == len(objects) + 1
        assert s.answer in shapes.WORDS and " " not in s.answer
        assert all(word in shapes.WORDS for word in _words(s.question)), s.question
        words = _words(s.question)
        if s.family == "color":
            shape = words[-2]
            matching = [colour for _, colour, kind in objects if kind == shape]
            assert matching == [s.answer], (s.question, objects)  # the shape is unique
        elif s.family == "presence":
            assert words[:3] == ["Is", "there", "a"] and words[4:] == ["in", "the", "image", "?"], s.question
            present = words[3] in {k for _, _, k in objects}
            assert s.answer == ("yes" if present else "no"), (s.question, objects)
        elif s.family == "count":
            colour = words[2]
            assert s.answer == str(sum(c == colour for _, c, _ in objects)), (s.question, objects)
        else:
            assert s.answer == s.scene.letter


def test_objects_and_the_letter_never_touch_and_labels_cover_their_cells(held_out):
    """Each object is SPAN x SPAN cells (visual tokens), the letter one; one empty cell between any two."""
    from vtcbench.api import (
        EXAMPLE_SCENE,  # the default image of `vtcbench generate` too
    )

    for scene in [EXAMPLE_SCENE, *(s.scene for s in held_out[:100])]:
        boxes = [(*divmod(cell, shapes.GRID), shapes.SPAN) for cell, _, _ in scene.objects]
        boxes.append((*divmod(scene.letter_cell, shapes.GRID), 1))
        for i, (r1, c1, n1) in enumerate(boxes):
            assert r1 + n1 <= shapes.GRID and c1 + n1 <= shapes.GRID
            for r2, c2, n2 in boxes[i + 1 :]:
                apart = r1 + n1 < r2 or r2 + n2 < r1 or c1 + n1 < c2 or c2 + n2 < c1
                assert apart, scene
        colour, content = scene.cell_labels()
        assert (content > 0).sum() == shapes.SPAN**2 * len(scene.objects) + 1
        image = scene.render().reshape(shapes.GRID, shapes.CELL, shapes.GRID, shapes.CELL, 3)
        lit = image.any(axis=(1, 3, 4)).reshape(-1)
        assert np.array_equal(lit, content > 0)  # every labelled cell has pixels, no other cell does


def test_a_training_conversation_asks_everything_about_one_scene():
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(400):
        turns = shapes.conversation(rng)
        scene = turns[0].scene
        assert all(t.scene is scene for t in turns)
        colours = [c for _, c, _ in scene.objects]
        kinds = [s for _, _, s in scene.objects]
        asked = {t.question for t in turns}
        assert {f"How many {c} shapes are there?" for c in colours if colours.count(c) <= 3} <= asked
        assert {f"What color is the {s}?" for s in kinds if kinds.count(s) == 1} <= asked
        assert {f"Is there a {s} in the image?" for s in shapes.SHAPES} <= asked
        assert len(asked) == len(turns)  # no question twice: a repeat is answered by copying
        for t in turns:
            if t.family == "count":
                assert t.answer == str(colours.count(t.question.split()[2]))
                counts.append(t.answer)
            if t.family == "presence":
                assert t.answer == ("yes" if t.question.split()[3] in kinds else "no")
    # the held-out split's counts are uniform: training's must not teach a prior for "1"
    assert all(0.28 < counts.count(answer) / len(counts) < 0.4 for answer in "123"), Counter(counts)


# ---------------------------------------------------------------------------------------------
# the parquet file


def test_write_dataset_round_trip(tmp_path):
    from datasets import Features
    from datasets import Image as ImageFeature
    from pyarrow import parquet

    path = shapes.write_dataset(tmp_path / "out" / "vtcshapes.parquet", seed=3, per_family=2)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert Features.from_arrow_schema(parquet.read_schema(path))["image"] == ImageFeature()
    frame = pd.read_parquet(path)
    samples = shapes.split(3, 2)
    assert list(frame.columns) == ["question_id", "image", "question", "answer", "family"]
    assert list(frame.question_id) == [f"vtcshapes-{i:05d}" for i in range(8)]
    assert list(frame.question) == [s.question for s in samples]
    assert list(frame.answer) == [s.answer for s in samples]
    assert list(frame.family) == [s.family for s in samples]
    for row, sample in zip(frame.itertuples(), samples):
        assert row.image["path"] is None
        image = Image.open(io.BytesIO(row.image["bytes"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (112, 112))
        assert np.array_equal(np.asarray(image), sample.scene.render())


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    from datasets import Dataset

    def fail(self, target, **kwargs):
        Path(target).write_bytes(b"PAR1 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "to_parquet", fail)
    with pytest.raises(KeyboardInterrupt):
        shapes.write_dataset(tmp_path / "vtcshapes.parquet", seed=3, per_family=1)
    assert not any(tmp_path.iterdir())


def test_default_dataset_is_written_once_into_the_cache(cache):
    path = shapes.default_dataset()
    expected = Path(os.environ["VTCBENCH_CACHE"]) / "vtcshapes" / (
        f"v{shapes.VERSION}-seed{shapes.TEST_SEED}-n{shapes.TEST_PER_FAMILY}"
    ) / "vtcshapes.parquet"
    assert path == expected and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert shapes.default_dataset() == path and path.stat().st_mtime_ns == stamp
    assert len(pd.read_parquet(path, columns=["question_id"])) == 4 * shapes.TEST_PER_FAMILY


# ---------------------------------------------------------------------------------------------
# the lmms-eval task


def test_registry_knows_vtcshapes(cache, tmp_path):
    info = TASKS["vtcshapes"]
    assert info.shipped_yaml and not info.needs_judge and not info.needs_submission
    assert short_name("vtc_local_vtcshapes") == "vtcshapes"
    default = shapes.default_dataset().parent
    assert shipped_data(info, None) == default
    assert shipped_data(info, tmp_path) == default  # a --data-dir without vtcshapes.parquet
    (tmp_path / "vtcshapes.parquet").write_bytes(shapes.default_dataset().read_bytes())
    assert shipped_data(info, tmp_path) == tmp_path


def test_aggregations_on_a_worked_example():
    hits = [("color", 1), ("color", 0), ("color", 1), ("presence", 0), ("presence", 1), ("count", 1)]
    records = [{"question_id": f"q{i}", "family": f, "score": float(h)} for i, (f, h) in enumerate(hits)]
    assert utils.vtcshapes_aggregate_color(records) == pytest.approx(2 / 3)
    assert utils.vtcshapes_aggregate_presence(records) == 0.5
    assert utils.vtcshapes_aggregate_count(records) == 1.0
    assert math.isnan(utils.vtcshapes_aggregate_text(records))
    assert utils.vtcshapes_aggregate_overall(records) == pytest.approx(4 / 6)
    doc = {"question_id": "q", "family": "text", "answer": "K"}
    assert utils.vtcshapes_process_results(doc, [" k. "]) == {
        "overall": {"question_id": "q", "family": "text", "score": 1.0},
        "text": {"question_id": "q", "family": "text", "score": 1.0},
    }
    assert utils.vtcshapes_process_results(doc, ["X"])["text"]["score"] == 0.0


def test_the_task_through_lmms_eval_scores_a_perfect_and_a_yes_sayer(cache, tmp_path):
    """lmms-eval's own loading of the shipped YAML (include YAML on the default parquet)."""
    from lmms_eval.tasks import get_task_dict

    from vtcbench.tasks import task_manager

    info = TASKS["vtcshapes"]
    name = local_task_config(info, shipped_data(info, None), tmp_path)
    task = get_task_dict([name], task_manager(tmp_path, include_defaults=False))[name]
    docs = task.test_docs().remove_columns("image")  # scoring needs no pixels
    image, text = task.doc_to_visual(task.test_docs()[0]), task.doc_to_text(docs[0])
    assert [(i.mode, i.size) for i in image] == [("RGB", (112, 112))] and text == docs[0]["question"]
    assert task.config.generation_kwargs["max_new_tokens"] == 4 and not task.config.generation_kwargs["do_sample"]
    assert all(task.higher_is_better()[m] for m in METRICS)

    def score(predict) -> dict[str, float]:
        per_metric: dict[str, list] = {}
        for doc in docs:
            for metric, value in task.process_results(doc, [predict(doc)]).items():
                per_metric.setdefault(metric, []).append(value)
        return {m: task.aggregation()[m](values) for m, values in per_metric.items()}

    assert score(lambda doc: f" {doc['answer'].capitalize()}.") == {m: 1.0 for m in METRICS}
    yes = sum(doc["answer"] == "yes" for doc in docs)
    assert score(lambda doc: "Yes") == pytest.approx(
        {"overall": yes / len(docs), "color": 0.0, "presence": yes / shapes.TEST_PER_FAMILY, "count": 0.0, "text": 0.0}
    )


def test_mixed_run_without_data_dir_knows_both_tasks(cache, tmp_path):
    from vtcbench.runner import task_names
    from vtcbench.tasks import resolve_tasks

    names, manager = task_names(resolve_tasks(["vtcshapes", "gqa"]), None, tmp_path)
    assert names == ["vtc_local_vtcshapes", "gqa"]
    assert set(names) <= set(manager.task_index)


def test_run_end_to_end_with_random_weights(cache, tmp_path):
    """A real run, then the same run resumed from samples whose predictions were set to known
    hits (resumed samples are read back, not recomputed), so the metrics are not all zero."""
    from vtcbench.runner import RunConfig, run

    config = RunConfig(model="tiny", method="vanilla", tasks=["vtcshapes"], limit=8, out=tmp_path,
                       random_weights=True, show_progress=False)
    docs = pd.read_parquet(shapes.default_dataset(), columns=["answer", "family"])
    folder = run(config).folder
    _check_metrics_against_samples(folder, docs)

    correct = {0, 1, 2, 5, 7}  # families interleave: color presence count text color presence count text
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    for record in records:
        if record["doc_id"] in correct:
            record["prediction"] = docs.answer[record["doc_id"]].capitalize() + "."
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").unlink()
    assert run(config).folder == folder
    metrics = _check_metrics_against_samples(folder, docs)
    assert metrics == pytest.approx({"overall": 5 / 8, "color": 0.5, "presence": 1.0, "count": 0.5, "text": 0.5})


def _check_metrics_against_samples(folder: Path, docs: pd.DataFrame) -> dict[str, float]:
    """summary.json's five metrics equal the exact matches recomputed from samples.jsonl."""
    entry = json.loads((folder / "summary.json").read_text())["tasks"]["vtc_local_vtcshapes"]
    metrics = entry["metrics"]
    assert {m for m in metrics if "stderr" not in m} == {f"{m},none" for m in METRICS}
    assert entry["samples"] == 8
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    hits = {r["doc_id"]: float(utils.normalise(r["prediction"]) == utils.normalise(docs.answer[r["doc_id"]]))
            for r in records}
    assert sorted(hits) == list(range(8))
    assert metrics["overall,none"] == pytest.approx(statistics.fmean(hits.values()))
    for family in shapes.FAMILIES:
        of_family = [hit for doc_id, hit in hits.items() if docs.family[doc_id] == family]
        assert len(of_family) == 2
        assert metrics[f"{family},none"] == pytest.approx(statistics.fmean(of_family))
    return {m: metrics[f"{m},none"] for m in METRICS}
