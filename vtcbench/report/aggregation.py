"""lmms-eval's own aggregation of a metric, for the metrics that are not a mean over documents.

MME's score, for one, sums per category the accuracy and the "accuracy+" (both questions of an
image right) of its image pairs: its interval needs the bootstrap of that aggregation itself,
resampling documents as lmms-eval groups them (the pairs, by `question_id`). The aggregation
function is read from the task's YAML (`metric_list[].aggregation`), as lmms-eval reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: resamples of an aggregation bootstrap: each runs the task's own (Python) aggregation
AGGREGATION_RESAMPLES = 1000


@functools.cache
def task_aggregation(task: str, metric: str) -> Callable[[list], float] | None:
    """The aggregation function lmms-eval applies to `metric` of `task` (an lmms-eval task name,
    local runs' `vtc_local_` prefix allowed), or None for a task vtcbench does not know."""
    from lmms_eval import utils

    from vtcbench.errors import VtcbenchError
    from vtcbench.tasks.registry import TASKS, short_name, task_yaml

    info = TASKS.get(short_name(task))
    if info is None:
        return None
    try:
        config = utils.load_yaml_config(str(task_yaml(info)), mode="full")
    except (VtcbenchError, OSError, ImportError):
        return None
    for entry in config.get("metric_list", []):
        if entry.get("metric") == metric and callable(entry.get("aggregation")):
            return entry["aggregation"]
    return None


def groups(values: Sequence[Any]) -> list[list[int]]:
    """Indices of `values` resampled together: documents sharing a `question_id` (MME's image
    pairs), each other document alone."""
    by_question: dict[Any, list[int]] = {}
    for index, value in enumerate(values):
        key = value.get("question_id", ("document", index)) if isinstance(value, dict) else ("document", index)
        by_question.setdefault(key, []).append(index)
    return list(by_question.values())


def resample(values: Sequence[Any], chosen: Sequence[list[int]]) -> list[Any]:
    """The documents of the drawn groups; a group drawn again gets a new `question_id`, so the
    aggregation sees it as another pair rather than a pair of four."""
    out = []
    for draw, group in enumerate(chosen):
        for index in group:
            value = values[index]
            out.append({**value, "question_id": (value.get("question_id"), draw)} if isinstance(value, dict) else value)
    return out


def bootstrap_aggregates(
    aggregate: Callable[[list], float], samples: Sequence[Sequence[Any]], *, resamples: int, seed: int,
) -> np.ndarray:
    """Per resample, `aggregate` of each sequence in `samples` (documents aligned across them:
    one run's values, or a run's and its reference's for a paired difference), [resamples, k]."""
    from loguru import logger

    index_groups = groups(samples[0])
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(samples)))
    logger.disable("lmms_eval")  # MME's aggregation logs every category at each call
    try:
        for row in range(resamples):
            chosen = [index_groups[g] for g in rng.integers(0, len(index_groups), size=len(index_groups))]
            out[row] = [aggregate(resample(values, chosen)) for values in samples]
    finally:
        logger.enable("lmms_eval")
    return out
