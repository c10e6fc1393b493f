"""GQA without the hub: join a local copy of the images config onto the questions.

lmms-eval 0.7.3's `gqa.yaml` loads the questions (`lmms-lab-encoder/GQA`, config
`testdev_balanced_instructions`, split `testdev`) and its `process_docs`
(`lmms_eval/tasks/gqa/utils.py::gqa_process_docs`) then calls
`load_dataset("lmms-lab-encoder/GQA", "testdev_balanced_images", split="testdev", token=True)`
and adds to every question the image whose `id` equals the question's `imageId`. That second
download is hard-coded, so an offline run replaces `process_docs` through the include YAML with
the function built here, which does the same join from local files (parquet, a `save_to_disk`
folder, or a saved `DatasetDict`), read with pyarrow: no hub, no datasets cache.

`vtcbench.tasks.registry.local_task_config` writes a two-line module next to the include YAML
(`process_docs = make_process_docs(...)`), because a YAML `!function` names a function, not a call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from vtcbench.errors import VtcbenchError
from vtcbench.tasks.local_images import absolute_paths


def _read_table(kind: str, files: Iterable[str | Path], columns: list[str]):
    """A pyarrow table of `columns` from parquet files or datasets' arrow (stream) files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for file in files:
        if kind == "parquet":
            tables.append(pq.read_table(file, columns=columns))
        else:  # "arrow": the files `Dataset.save_to_disk` writes (Arrow IPC stream format)
            with pa.memory_map(str(file)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    table = pa.ipc.open_file(source).read_all()
            tables.append(table.select(columns))
    if not tables:
        raise VtcbenchError("no data files given")
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_column(kind: str, files: Iterable[str | Path], column: str) -> list:
    """One column of a local dataset as Python values (used to check ids before lmms-eval runs)."""
    return _read_table(kind, files, [column]).column(column).to_pylist()


def arrow_files_of_saved_dataset(folder: Path) -> list[Path]:
    """The data files of a `Dataset.save_to_disk` folder (listed in its state.json)."""
    state = json.loads((folder / "state.json").read_text())
    return [folder / entry["filename"] for entry in state["_data_files"]]


def make_process_docs(
    kind: str, files: list[str], *, layout: str = "image", base: str = ".", image_column: str = "image",
) -> Callable:
    """A `process_docs` that adds `image` (by `imageId`) from the local images table.

    `kind` is "parquet" or "arrow"; `files` hold the images config's rows (`id`, `image`), the
    schema of `lmms-lab/GQA`'s `testdev_balanced_images`, with `image` in any layout of
    `local_images` (`layout`; path strings are resolved against `base`). Images are passed through
    as stored (bytes or paths), not decoded and re-encoded; `gqa_doc_to_visual` converts them to
    RGB as upstream does.
    """
    files = [str(f) for f in files]

    def process_docs(dataset):
        import datasets

        if image_column in dataset.column_names:
            return dataset
        table = _read_table(kind, files, ["id", image_column])
        values = table.column(image_column).to_pylist()
        if layout == "path":
            values = [absolute_paths(value, Path(base)) for value in values]
        images = dict(zip(table.column("id").to_pylist(), values))
        missing = sorted(set(dataset["imageId"]) - images.keys())
        if missing:
            raise VtcbenchError(
                f"GQA images {files[0]}: {len(missing)} imageId(s) of the questions have no image, e.g. {missing[0]!r}"
            )
        features = dataset.features.copy()
        features[image_column] = datasets.Image()
        return dataset.map(
            lambda doc: {image_column: images[doc["imageId"]]},
            features=features,
            desc="Joining local GQA images",
        )

    return process_docs
