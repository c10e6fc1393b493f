"""Local data as users hold it: image columns in any parquet layout, bad documents named in one
line (or skipped with --skip-bad-documents), damaged files refused, no traceback."""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from task_data import LAYOUTS, relayout, replace_image, write_dataset
from typer.testing import CliRunner

from vtcbench.cli import app
from vtcbench.results import sample_score

runner = CliRunner()
LAYOUT_TASKS = ("pope", "textvqa", "gqa")
NOT_AN_IMAGE = b"these bytes are not an image"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))


def write(data_dir: Path, layout: str, tasks=LAYOUT_TASKS) -> Path:
    for short in tasks:
        for path in write_dataset(short, data_dir, n=6):
            if "image" in pq.read_schema(path).names:
                relayout(path, layout)
    return data_dir


def run(data_dir: Path, out: Path, tasks: str, *extra: str):
    return runner.invoke(app, ["run", "--model", "tiny", "--random-weights", "--tasks", tasks, "--data-dir", str(data_dir),
                               "--out", str(out), *extra])


def folder_of(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def one_line_exit_2(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback: a clean exit
    # besides lmms-eval's own progress bar over the documents, one line
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert "Traceback" not in result.output and len(lines) == 1, result.stderr
    message = lines[0]
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def by_layout(tmp_path_factory) -> dict[str, dict]:
    """Each layout's summary and predictions over POPE, TextVQA and GQA."""
    outcome = {}
    for layout in LAYOUTS:
        root = tmp_path_factory.mktemp(layout)
        result = runner.invoke(app, ["run", "--model", "tiny", "--random-weights", "--tasks", ",".join(LAYOUT_TASKS),
                                     "--data-dir", str(write(root / "data", layout)), "--out", str(root / "out")])
        assert result.exit_code == 0, result.output
        folder = folder_of(root / "out")
        summary = json.loads((folder / "summary.json").read_text())["tasks"]
        outcome[layout] = {
            "metrics": {task: entry["metrics"] for task, entry in summary.items()},
            "predictions": {(r["task"], r["doc_id"]): r["prediction"] for r in records(folder)},
            "skipped": [entry["skipped"] for entry in summary.values()],
        }
    return outcome


@pytest.mark.parametrize("layout", ["struct", "paths"])
def test_every_image_layout_runs_and_scores_as_the_tagged_one(by_layout, layout):
    tagged = by_layout["tagged"]
    assert len(tagged["predictions"]) == 18 and tagged["skipped"] == [[], [], []]
    assert by_layout[layout]["predictions"] == tagged["predictions"]
    assert by_layout[layout]["metrics"] == tagged["metrics"]


def test_a_column_that_holds_no_images_is_refused_before_the_run(tmp_path):
    write_dataset("pope", tmp_path / "data")
    path = tmp_path / "data" / "pope.parquet"
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(range(table.num_rows), pa.int64()))
    pq.write_table(table.replace_schema_metadata(None), path)
    message = one_line_exit_2(run(tmp_path / "data", tmp_path / "out", "pope"), "task 'pope'", "column 'image'", "int64")
    assert "cannot be read as images" in message
    assert not (tmp_path / "out").exists()


def test_a_truncated_parquet_file_is_one_line(tmp_path):
    write_dataset("textvqa", tmp_path / "data")
    path = tmp_path / "data" / "textvqa.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_exit_2(run(tmp_path / "data", tmp_path / "out", "textvqa"), "cannot read parquet file", "textvqa.parquet")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_image_stops_at_its_document_keeps_what_finished_and_resumes(tmp_path):
    data = tmp_path / "data"
    (path,) = write_dataset("pope", data)
    good = pq.read_table(path)
    replace_image(path, 3, NOT_AN_IMAGE)
    one_line_exit_2(run(data, tmp_path / "out", "pope"), "task 'pope', document 3", "its image cannot be read",
                    "UnidentifiedImageError", "--skip-bad-documents")
    folder = folder_of(tmp_path / "out")
    finished = records(folder)
    assert [r["doc_id"] for r in finished] == [0, 1, 2]
    assert not (folder / "summary.json").exists()

    pq.write_table(good, path)  # the user fixes the file and reruns: the finished documents are read back
    result = run(data, tmp_path / "out", "pope")
    assert result.exit_code == 0, result.output
    resumed = records(folder)
    assert sorted(r["doc_id"] for r in resumed) == list(range(6))
    assert [{k: v for k, v in r.items() if k != "metrics"} for r in resumed[:3]] == finished  # not recomputed


def test_skip_bad_documents_scores_the_others_and_lists_the_skipped_one(tmp_path):
    data = tmp_path / "data"
    (path,) = write_dataset("pope", data)
    replace_image(path, 3, NOT_AN_IMAGE)
    result = run(data, tmp_path / "out", "pope", "--skip-bad-documents")
    assert result.exit_code == 0, result.output
    assert "1 document(s) skipped" in result.output and "Traceback" not in result.output
    folder = folder_of(tmp_path / "out")
    entry = json.loads((folder / "summary.json").read_text())["tasks"]["vtc_local_pope"]
    ((skipped),) = entry["skipped"]
    assert skipped["doc_id"] == 3 and "UnidentifiedImageError" in skipped["cause"]
    scored = records(folder)
    assert sorted(r["doc_id"] for r in scored) == [0, 1, 2, 4, 5] and entry["samples"] == 5
    # lmms-eval's own aggregation over the five scored documents
    assert entry["metrics"]["pope_accuracy,none"] == pytest.approx(
        statistics.fmean(sample_score(r["metrics"]["pope_accuracy"]) for r in scored)
    )

    report = runner.invoke(app, ["report", "--results", str(tmp_path / "out")])
    assert report.exit_code == 0, report.output
    assert "left out by --skip-bad-documents" in report.output and "on pope: 1" in report.output


def test_a_missing_gqa_image_file_stops_or_is_skipped(tmp_path):
    data = tmp_path / "data"
    write(data, "paths", tasks=("gqa",))
    questions = pq.read_table(data / "gqa.parquet").to_pylist()
    images = dict(pq.read_table(data / "gqa_images.parquet").to_pylist()[i].values() for i in range(3))
    (data / images[questions[4]["imageId"]]).unlink()  # documents 4 and 5 ask about this image

    message = one_line_exit_2(run(data, tmp_path / "out", "gqa"), "task 'gqa', document 4", "FileNotFoundError")
    assert [r["doc_id"] for r in records(folder_of(tmp_path / "out"))] == [0, 1, 2, 3], message

    result = run(data, tmp_path / "out", "gqa", "--skip-bad-documents")  # resumes the same folder
    assert result.exit_code == 0, result.output
    entry = json.loads((folder_of(tmp_path / "out") / "summary.json").read_text())["tasks"]["vtc_local_gqa"]
    assert [s["doc_id"] for s in entry["skipped"]] == [4, 5] and entry["samples"] == 4


def test_a_prompt_longer_than_the_context_is_a_bad_document(tmp_path):
    data = tmp_path / "data"
    (path,) = write_dataset("pope", data)
    table = pq.read_table(path)
    questions = table.column("question").to_pylist()
    questions[2] = "Is there " + "a very " * 300 + "red square?"
    table = table.set_column(table.schema.get_field_index("question"), "question", pa.array(questions))
    pq.write_table(table, path)
    one_line_exit_2(run(data, tmp_path / "stop", "pope", "--batch-size", "4"), "task 'pope', document 2",
                    "does not fit the model's context of")

    result = run(data, tmp_path / "skip", "pope", "--batch-size", "4", "--skip-bad-documents")
    assert result.exit_code == 0, result.output
    entry = json.loads((folder_of(tmp_path / "skip") / "summary.json").read_text())["tasks"]["vtc_local_pope"]
    assert [s["doc_id"] for s in entry["skipped"]] == [2] and entry["samples"] == 5


def test_layouts_are_read_from_the_schema():
    from datasets import Features, Image, List, Value

    from vtcbench.tasks.local_images import image_casts, image_layout

    assert image_layout(Image()) == "image" and image_layout(List(Image())) == "image"
    assert image_layout({"bytes": Value("binary"), "path": Value("string")}) == "struct"
    assert image_layout(Value("binary")) == "bytes" and image_layout(Value("string")) == "path"
    assert image_layout(Value("int64")) is None
    features = Features({"image": Value("string"), "question": Value("string"), "thumb": {"bytes": Value("binary")}})
    assert image_casts(features, "here") == {"image": "path", "thumb": "struct"}


def test_relative_paths_resolve_against_the_data_folder(tmp_path):
    from vtcbench.tasks.local_images import absolute_paths

    assert absolute_paths("images/a.png", tmp_path) == str(tmp_path / "images" / "a.png")
    assert absolute_paths(["/x/b.png", None], tmp_path) == ["/x/b.png", None]


def test_bytes_of_a_png_decode_as_the_tagged_image(tmp_path):
    """Raw encoded bytes (a binary column) are a layout too."""
    from datasets import Dataset, Value
    from PIL import Image as PILImage

    from vtcbench.tasks.local_images import cast_images

    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4), (10, 20, 30)).save(buffer, format="PNG")
    dataset = Dataset.from_dict({"image": [buffer.getvalue()]}).cast_column("image", Value("binary"))
    assert cast_images(dataset, {"image": "bytes"}, tmp_path)[0]["image"].getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("layout", ["struct", "paths"])
def test_hub_snapshot_folders_in_other_layouts_load_as_images(tmp_path, layout):
    """A snapshot folder (`docvqa/DocVQA/validation-*.parquet`) and GQA's per-config folders, with
    their image columns untagged or as paths relative to the task's folder (`docvqa/`, `gqa/`)."""
    import shutil

    from lmms_eval.tasks import get_task_dict
    from PIL import Image as PILImage
    from task_data import colour_of

    from vtcbench.tasks import TASKS, local_task_config, task_manager

    snapshot = tmp_path / "data" / "docvqa" / "DocVQA"
    (path,) = write_dataset("docvqa", snapshot)
    relayout(path, layout, data_folder=tmp_path / "data" / "docvqa")
    path.rename(snapshot / "validation-00000-of-00001.parquet")
    gqa = tmp_path / "data" / "gqa"
    write_dataset("gqa", tmp_path / "flat")
    for config, file in (("testdev_balanced_instructions", "gqa"), ("testdev_balanced_images", "gqa_images")):
        (gqa / config).mkdir(parents=True)
        shutil.copy(tmp_path / "flat" / f"{file}.parquet", gqa / config / "testdev-00000-of-00001.parquet")
    relayout(gqa / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", layout, data_folder=gqa)

    for short, answer in (("docvqa", lambda doc: doc["answers"][0]), ("gqa", lambda doc: doc["answer"])):
        name = local_task_config(TASKS[short], tmp_path / "data", tmp_path / "work")
        task = get_task_dict([name], task_manager(tmp_path / "work", include_defaults=False))[name]
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        assert all(isinstance(doc["image"], PILImage.Image) for doc in docs)
        assert [colour_of(doc["image"]) for doc in docs] == [answer(doc) for doc in docs], short
