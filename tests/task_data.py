"""Small local datasets in the exact schema of the hub datasets lmms-eval 0.7.3 evaluates.

Each writer produces `n` rows (default 6) with tiny generated images (56x56: a coloured square
on a grey background) as parquet through `datasets.Dataset.to_parquet`, so the image column is
datasets' `Image` feature (struct<bytes, path> with the feature metadata in the file), exactly as
the hub parquet files store it. The answer to every question is the square's colour (or yes/no).

Schemas: the `dataset_info` of each dataset card (column names, order and types as listed there);
which fields lmms-eval reads is in the comment of each writer.

- gqa: `lmms-lab/GQA`, config `testdev_balanced_instructions` (split testdev) as of commit 6ac3999,
  and `testdev_balanced_images` (id, image); lmms-eval 0.7.3 reads `lmms-lab-encoder/GQA`, taken
  to be the same data under a new namespace (the hub is unreachable from here to check).
  `groups`/`types` are structs, `annotations` a `sequence:` of structs (datasets stores it as a
  struct of lists), `semantic` a list of structs, `entailed`/`equivalent` strings.
- textvqa_val: `lmms-lab/textvqa` (default config, split validation).
- pope: `lmms-lab/POPE` (default config, split test).
- mme: `lmms-lab/MME` (split test).
- docvqa_val: `lmms-lab/DocVQA`, config `DocVQA` (split validation).
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
}
COLOUR_NAMES = list(COLOURS)

_STR = Value("string")
_OBJECT_REF = {"objectId": _STR, "value": _STR}

FEATURES: dict[str, Features] = {
    # lmms-lab/GQA testdev_balanced_instructions
    "gqa": Features(
        {
            "id": _STR,
            "imageId": _STR,
            "question": _STR,
            "answer": _STR,
            "fullAnswer": _STR,
            "isBalanced": Value("bool"),
            "groups": {"global": _STR, "local": _STR},
            "entailed": _STR,
            "equivalent": _STR,
            "types": {"structural": _STR, "semantic": _STR, "detailed": _STR},
            "annotations": {"question": List(_OBJECT_REF), "answer": List(_OBJECT_REF), "fullAnswer": List(_OBJECT_REF)},
            "semantic": List({"operation": _STR, "argument": _STR, "dependencies": List(Value("int32"))}),
            "semanticStr": _STR,
        }
    ),
    # lmms-lab/GQA testdev_balanced_images
    "gqa_images": Features({"id": _STR, "image": Image()}),
    # lmms-lab/textvqa
    "textvqa": Features(
        {
            "image_id": _STR,
            "question_id": Value("int32"),
            "question": _STR,
            "question_tokens": List(_STR),
            "image": Image(),
            "image_width": Value("int32"),
            "image_height": Value("int32"),
            "flickr_original_url": _STR,
            "flickr_300k_url": _STR,
            "answers": List(_STR),
            "image_classes": List(_STR),
            "set_name": _STR,
            "ocr_tokens": List(_STR),
        }
    ),
    # lmms-lab/POPE
    "pope": Features(
        {
            "id": _STR,
            "question_id": _STR,
            "question": _STR,
            "answer": _STR,
            "image_source": _STR,
            "image": Image(),
            "category": _STR,
        }
    ),
    # lmms-lab/MME
    "mme": Features({"question_id": _STR, "image": Image(), "question": _STR, "answer": _STR, "category": _STR}),
    # lmms-lab/DocVQA, config DocVQA
    "docvqa": Features(
        {
            "questionId": _STR,
            "question": _STR,
            "question_types": List(_STR),
            "image": Image(),
            "docId": Value("int64"),
            "ucsf_document_id": _STR,
            "ucsf_document_page_no": _STR,
            "answers": List(_STR),
            "data_split": _STR,
        }
    ),
}

# short name -> (lmms-eval task, split it evaluates)
SPLITS = {"gqa": "testdev", "textvqa": "validation", "pope": "test", "mme": "test", "docvqa": "validation"}
SHORT_NAMES = tuple(SPLITS)


def square(colour: str, size: int = 56) -> PILImage.Image:
    """A `colour` square in the middle of a grey `size` x `size` RGB image."""
    image = PILImage.new("RGB", (size, size), (128, 128, 128))
    quarter = size // 4
    image.paste(COLOURS[colour], (quarter, quarter, size - quarter, size - quarter))
    return image


def colour_of(image: PILImage.Image) -> str:
    """The colour name of the square in an image made by `square`."""
    rgb = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb)))


def _colour(i: int) -> str:
    return COLOUR_NAMES[i % len(COLOUR_NAMES)]


def gqa_rows(n: int) -> tuple[list[dict], list[dict]]:
    """Questions (two per image) and the images they point at by `imageId`.

    lmms-eval reads: question (prompt), answer (target, exact_match), imageId (its process_docs
    joins `image` from the images config by `id`).
    """
    n_images = (n + 1) // 2
    images = [{"id": f"n{161313 + k}", "image": square(_colour(k))} for k in range(n_images)]
    questions = []
    for i in range(n):
        image = images[i // 2]
        colour = _colour(i // 2)
        ref = {"objectId": f"{1000 + i}", "value": "square"}
        questions.append(
            {
                "id": f"{201307251 + i}",
                "imageId": image["id"],
                "question": "What color is the square?" if i % 2 == 0 else "Which color is the square in the middle?",
                "answer": colour,
                "fullAnswer": f"The square is {colour}.",
                "isBalanced": True,
                "groups": {"global": "color", "local": "10q-square_color"},
                "entailed": "",
                "equivalent": f"['{201307251 + i}']",
                "types": {"structural": "query", "semantic": "attr", "detailed": "colorObj"},
                "annotations": {"question": [ref], "answer": [], "fullAnswer": [ref]},
                "semantic": [
                    {"operation": "select", "argument": f"square ({1000 + i})", "dependencies": []},
                    {"operation": "query", "argument": "color", "dependencies": [0]},
                ],
                "semanticStr": f"select: square ({1000 + i})->query: color [0]",
            }
        )
    return questions, images


def textvqa_rows(n: int) -> list[dict]:
    """lmms-eval reads: image, question (capitalised, prompt), answers (10, VQA accuracy), question_id."""
    rows = []
    for i in range(n):
        colour = _colour(i)
        question = "what color is the square?"
        rows.append(
            {
                "image_id": f"{0x3A8AE2EF43B901 + i:016x}",
                "question_id": 34602 + i,
                "question": question,
                "question_tokens": question.rstrip("?").split() + ["?"],
                "image": square(colour),
                "image_width": 56,
                "image_height": 56,
                "flickr_original_url": f"https://farm2.staticflickr.com/{4000 + i}/example_o.jpg",
                "flickr_300k_url": f"https://c4.staticflickr.com/{4000 + i}/example_z.jpg",
                "answers": [colour] * 8 + [f"dark {colour}", "unanswerable"],
                "image_classes": ["Square", "Colour"],
                "set_name": "val",
                "ocr_tokens": [],
            }
        )
    return rows


def pope_rows(n: int) -> list[dict]:
    """lmms-eval reads: image, question, answer (yes/no), question_id; category is reported."""
    categories = ("adversarial", "popular", "random")
    rows = []
    for i in range(n):
        colour = _colour(i // 2)
        asked = colour if i % 2 == 0 else _colour(i // 2 + 1)
        rows.append(
            {
                "id": str(i),
                "question_id": str(i + 1),
                "question": f"Is there a {asked} square in the image?",
                "answer": "yes" if asked == colour else "no",
                "image_source": f"COCO_val2014_{310196 + i:012d}",
                "image": square(colour),
                "category": categories[i % 3],
            }
        )
    return rows


def mme_rows(n: int) -> list[dict]:
    """Pairs of questions on one image (MME's score needs both: `assert len(scores) == 2`).

    lmms-eval reads: image, question, answer (Yes/No), category (perception or cognition
    subtask), question_id (the image's path, shared by the pair).
    """
    categories = ("color", "existence", "commonsense_reasoning")
    rows = []
    for i in range(n):
        pair = i // 2
        colour = _colour(pair)
        asked = colour if i % 2 == 0 else _colour(pair + 1)
        category = categories[pair % len(categories)]
        rows.append(
            {
                "question_id": f"{category}/{pair:012d}.png",
                "image": square(colour),
                "question": f"Is the square {asked}? Please answer yes or no.",
                "answer": "Yes" if asked == colour else "No",
                "category": category,
            }
        )
    return rows


def docvqa_rows(n: int) -> list[dict]:
    """lmms-eval reads: image, question, answers (ANLS against the best of them)."""
    rows = []
    for i in range(n):
        colour = _colour(i)
        rows.append(
            {
                "questionId": str(49153 + i),
                "question": "What is the colour of the box?",
                "question_types": ["figure/diagram"],
                "image": square(colour),
                "docId": 14465 + i,
                "ucsf_document_id": f"xnbl{37 + i:04d}",
                "ucsf_document_page_no": "1",
                "answers": [colour, f"{colour} box"],
                "data_split": "val",
            }
        )
    return rows


def write_dataset(short: str, data_dir: Path, n: int = 6, *, images_inline: bool = False) -> list[Path]:
    """Write `data_dir/<short>.parquet` (and `gqa_images.parquet` for gqa); return the paths.

    `images_inline=True` (gqa only) writes the questions with their `image` column already joined
    instead of the separate images file.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{short}.parquet"
    if short == "gqa":
        questions, images = gqa_rows(n)
        if images_inline:
            by_id = {row["id"]: row["image"] for row in images}
            rows = [{**q, "image": by_id[q["imageId"]]} for q in questions]
            features = Features({**FEATURES["gqa"], "image": Image()})
            Dataset.from_list(rows, features=features).to_parquet(str(path))
            return [path]
        Dataset.from_list(questions, features=FEATURES["gqa"]).to_parquet(str(path))
        images_path = data_dir / "gqa_images.parquet"
        Dataset.from_list(images, features=FEATURES["gqa_images"]).to_parquet(str(images_path))
        return [path, images_path]
    rows = {"textvqa": textvqa_rows, "pope": pope_rows, "mme": mme_rows, "docvqa": docvqa_rows}[short](n)
    Dataset.from_list(rows, features=FEATURES[short]).to_parquet(str(path))
    return [path]


def write_all(data_dir: Path, n: int = 6) -> Path:
    """All five datasets into `data_dir` (the layout `--data-dir` expects); returns data_dir."""
    for short in SHORT_NAMES:
        write_dataset(short, data_dir, n)
    return Path(data_dir)


def correct_prediction(short: str, doc: dict) -> str:
    """What a perfect model answers for `doc` (as a model would phrase it)."""
    if short in ("gqa", "pope"):
        return doc["answer"].capitalize()
    if short == "mme":
        return doc["answer"]
    if short in ("textvqa", "docvqa"):
        return doc["answers"][0]
    raise KeyError(short)


def wrong_prediction(short: str, doc: dict) -> str:
    """An answer that is wrong for `doc`."""
    if short in ("pope", "mme"):
        return "No" if correct_prediction(short, doc).lower() == "yes" else "Yes"
    return "a sandwich"


LAYOUTS = ("tagged", "struct", "paths")


def relayout(path: Path, layout: str, column: str = "image", data_folder: Path | None = None) -> None:
    """Rewrite a parquet file written above with its image column in another layout, as tools
    other than `datasets` write it: "tagged" (as written: datasets' Image feature), "struct" (the
    same bytes/path struct without the feature tag in the schema metadata, as pandas and pyarrow
    write it), "paths" (each image saved under `images/` in `data_folder`, by default the file's
    folder, the column holding the path relative to it)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if layout == "tagged":
        return
    table = table.replace_schema_metadata(None)  # no datasets features: a plain struct
    if layout == "paths":
        folder = (data_folder or path.parent) / "images"
        folder.mkdir(exist_ok=True)
        names = []
        for row, value in enumerate(table.column(column).to_pylist()):
            name = f"{path.stem}_{row}.png"
            PILImage.open(io.BytesIO(value["bytes"])).save(folder / name)
            names.append(f"images/{name}")
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(names, pa.string()))
    elif layout != "struct":
        raise ValueError(layout)
    pq.write_table(table, path)


def replace_image(path: Path, row: int, data: bytes, column: str = "image") -> None:
    """Put `data` as the encoded image of `row` (e.g. bytes that are not an image)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = {"bytes": data, "path": values[row].get("path")}
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))
    pq.write_table(table, path)
