"""Image columns of local data in the layouts users hold them, read as images.

lmms-eval's tasks call `doc["image"].convert("RGB")`: the column must be datasets' `Image`
feature, which the hub's parquet files tag in their schema metadata. Files written by pandas,
pyarrow or most export tools hold the same data without the tag, and some datasets keep paths.
`image_casts` reads what a column holds (from the schema, before anything loads) and names the
layout; `make_image_docs` builds the `process_docs` that casts the columns to `Image` when
lmms-eval loads the data:

- "image": datasets' `Image` feature (hub parquet, `save_to_disk` folders): used as it is;
- "struct": a struct of `bytes` and/or `path` without the tag: cast, the values are the same;
- "bytes": encoded image files (binary): cast;
- "path": path strings, absolute or relative to the data folder (the folder that `--data-dir`
  names for `<task>.parquet`, the task's own folder for `<task>/`): made absolute, then cast.

A list of any of these (several images per document) is cast to a list of `Image`. The column
`image`, and any untagged struct of bytes/path, is read this way; an `image` column in another
layout is refused in one line naming the task, the column and what it holds. Decoding happens
when a document is read, so a file that is missing or corrupt surfaces per document
(`vtcbench.lmms_model`: the run stops at it in one line, or skips it with --skip-bad-documents).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtcbench.errors import VtcbenchError

IMAGE_COLUMN = "image"  # the column every shipped task's doc_to_visual reads
_EXPECTED = "datasets' Image feature, a struct of bytes/path, encoded image bytes, or path strings"


def image_layout(feature: Any) -> str | None:
    """The layout of a `datasets` feature as an image column ("image", "struct", "bytes" or "path"), None if none."""
    from datasets import Image, LargeList, List, Sequence, Value

    if isinstance(feature, (List, LargeList, Sequence)):
        return image_layout(feature.feature)
    if isinstance(feature, list) and len(feature) == 1:
        return image_layout(feature[0])
    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, dict) and feature and set(feature) <= {"bytes", "path"}:
        return "struct"
    if isinstance(feature, Value):
        if feature.dtype in ("binary", "large_binary"):
            return "bytes"
        if feature.dtype in ("string", "large_string"):
            return "path"
    return None


def describe(feature: Any) -> str:
    """What a column holds, in a few words (for the refusal)."""
    from datasets import LargeList, List, Sequence, Value

    if isinstance(feature, (List, LargeList, Sequence)):
        return f"lists of {describe(feature.feature)}"
    if isinstance(feature, list) and len(feature) == 1:
        return f"lists of {describe(feature[0])}"
    if isinstance(feature, Value):
        return feature.dtype
    if isinstance(feature, dict):
        return f"structs of {', '.join(feature)}"
    return type(feature).__name__


def image_casts(features: Any, where: str) -> dict[str, str]:
    """{column: layout} of the image columns that need a cast; the rest are datasets' Image.

    Raises VtcbenchError (one line, naming `where`, e.g. "task 'pope' at D/pope.parquet") when
    the `image` column holds anything else."""
    casts: dict[str, str] = {}
    for column, feature in features.items():
        layout = image_layout(feature)
        if column == IMAGE_COLUMN and layout is None:
            raise VtcbenchError(
                f"{where}: column {column!r} holds {describe(feature)}, which cannot be read as images (expected {_EXPECTED})"
            )
        if layout in ("bytes", "path") and column != IMAGE_COLUMN:
            continue  # other binary / string columns are what they say
        if layout is not None and layout != "image":
            casts[column] = layout
    return casts


def absolute_paths(value: Any, base: Path) -> Any:
    """A path string (or a list of them) made absolute against `base`; None stays None."""
    if value is None:
        return None
    if isinstance(value, list):
        return [absolute_paths(v, base) for v in value]
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def cast_images(dataset, casts: dict[str, str], base: Path):
    """`dataset` with the `casts` columns as datasets' Image (or lists of Image)."""
    from datasets import Image, LargeList, List, Sequence

    for column, layout in casts.items():
        if layout == "path":
            dataset = dataset.map(
                lambda doc, c=column: {c: absolute_paths(doc[c], base)}, desc=f"Resolving image paths ({column})",
            )
        listed = isinstance(dataset.features[column], (List, LargeList, Sequence, list))
        dataset = dataset.cast_column(column, List(Image()) if listed else Image())
    return dataset


def make_image_docs(casts: dict[str, str], base: str, then_yaml: str | None = None) -> Callable:
    """A `process_docs` that casts the image columns, then runs the task's own `process_docs`
    (read from its YAML `then_yaml`, when it has one)."""

    def process_docs(dataset):
        dataset = cast_images(dataset, casts, Path(base))
        if then_yaml is not None:
            from lmms_eval import utils

            original = utils.load_yaml_config(then_yaml, mode="full").get("process_docs")
            if original is not None:
                dataset = original(dataset)
        return dataset

    return process_docs
