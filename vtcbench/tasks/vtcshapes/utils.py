"""lmms-eval hooks of the vtcshapes task (vtcshapes.yaml loads them as `utils.<name>`).

The prompt is the bare question: vtcbench's model adds `<image>` and the chat template. Scoring
is exact match after normalising; metrics follow lmms-eval's MME pattern: `process_results`
returns, under `overall` and under the doc's family, the same {question_id, family, score}
record, so each family's aggregation sees that family's docs only (a family with no docs under
--limit then has no metric rather than a made-up one). `score` is the key lmms-eval's CLT
standard error reads. Each aggregation still keeps only its own family, so handing it every
record gives the same number.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from vtcbench.shapes import COLORS, COUNTS, LETTERS


def vtcshapes_doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [doc["image"].convert("RGB")]


def vtcshapes_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def normalise(answer: str) -> str:
    """'  Red. ' -> 'red' (answers are one word; models add case and a full stop)."""
    return answer.strip().rstrip(".").strip().lower()


def vtcshapes_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    record = {
        "question_id": doc["question_id"],
        "family": doc["family"],
        "score": float(normalise(results[0]) == normalise(doc["answer"])),
    }
    return {"overall": record, doc["family"]: record}


def accuracy(results: list[dict[str, Any]], family: str | None = None) -> float:
    """Mean score of the records of `family` (all records when None); NaN when there are none."""
    scores = [r["score"] for r in results if family is None or r["family"] == family]
    return sum(scores) / len(scores) if scores else math.nan


def vtcshapes_aggregate_overall(results: list[dict[str, Any]]) -> float:
    return accuracy(results)


def vtcshapes_aggregate_color(results: list[dict[str, Any]]) -> float:
    return accuracy(results, "color")


def vtcshapes_aggregate_presence(results: list[dict[str, Any]]) -> float:
    return accuracy(results, "presence")


def vtcshapes_aggregate_count(results: list[dict[str, Any]]) -> float:
    return accuracy(results, "count")


def vtcshapes_aggregate_text(results: list[dict[str, Any]]) -> float:
    return accuracy(results, "text")


# -- vtcshapes_mc (vtcshapes_mc.yaml): the same docs and prompt, scored by log-likelihood -------------

#: each family's answer set, spelt as the dataset spells its answers (shapes.py: lower-case colour
#: names, "yes"/"no", the counts as digits, capital letters)
MC_CHOICES: dict[str, list[str]] = {
    "color": list(COLORS),
    "presence": ["yes", "no"],
    "count": [str(n) for n in COUNTS],
    "text": list(LETTERS),
}


def vtcshapes_mc_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The doc's family's answer set: lmms-eval asks the model for the log-likelihood of each as the
    continuation of the prompt. The task sets `target_delimiter: ""` because vtcbench's prompt
    already ends `ASSISTANT:` and adds one space before a continuation (models.vicuna_v1_prompt)."""
    return list(MC_CHOICES[doc["family"]])


def vtcshapes_mc_doc_to_target(doc: dict[str, Any]) -> int:
    """The index of the doc's answer in its choices (lmms-eval reads an int target as an index);
    an answer outside its family's set is bad data, so it fails here rather than scoring 0."""
    choices = vtcshapes_mc_doc_to_choice(doc)
    if doc["answer"] not in choices:
        raise ValueError(
            f"vtcshapes_mc: answer {doc['answer']!r} of {doc['question_id']} is not a {doc['family']} choice {choices}"
        )
    return choices.index(doc["answer"])

