"""Uncertainty of a run's task metric, and of its difference from a reference run.

The interval is a percentile bootstrap over documents: resample the documents with replacement,
take the mean score, repeat; the 2.5th and 97.5th percentiles of those means. It needs the
per-document scores that `vtcbench run` stores (`metrics` in the record of each document's first
request), and applies only where their mean is lmms-eval's aggregate (accuracy, exact match,
ANLS, vtcshapes' families). Where the aggregation is not a mean (MME's pair scores) and vtcbench
knows the task, lmms-eval's own aggregation function is bootstrapped over documents (grouped as
it groups them; `aggregation.py`). Elsewhere (F1 and the like, unknown tasks, old folders) the
interval comes from lmms-eval's standard error in summary.json, or there is none.

Differences are paired: both runs' scores on the documents both scored, the documents
resampled together, so the variation shared by the two runs (easy and hard documents) cancels.
The generator is NumPy's `default_rng(seed)`, drawing the resamples' indices row by row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from vtcbench.report.aggregation import (
    AGGREGATION_RESAMPLES,
    bootstrap_aggregates,
    task_aggregation,
)
from vtcbench.results import sample_score

RESAMPLES = 10_000
LEVEL = 0.95
Z = 1.959963984540054  # the normal quantile of a two-sided 95% interval
_CHUNK_ELEMENTS = 2_000_000  # resampled indices held at once (16 MB)

BOOTSTRAP, AGGREGATE, STDERR, STDERR_CLT, NONE = "bootstrap", "aggregate", "stderr", "stderr_clt", "none"


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Estimate:
    """lmms-eval's aggregate of one metric for one run and task, with its 95% interval."""

    value: float
    interval: Interval | None
    source: str  # BOOTSTRAP, AGGREGATE, STDERR, STDERR_CLT or NONE: where the interval comes from
    scores: dict[int, float] | None  # per-document scores, when their mean is the aggregate
    #: per-document values and lmms-eval's aggregation of them, when that aggregation is not a
    #: mean but reproduces the reported number (MME's pair scores): bootstrapped as it is
    values: dict[int, Any] | None = None
    aggregate: Callable[[list], float] | None = None


@dataclass(frozen=True)
class Difference:
    """A run's metric minus the reference's, with the paired bootstrap interval when both decompose."""

    value: float
    interval: Interval | None
    documents: int  # documents both runs scored; 0 when only the aggregates could be compared

    @property
    def excludes_zero(self) -> bool:
        return self.interval is not None and self.interval.excludes_zero


def per_sample_scores(samples: list[dict[str, Any]], task: str, metric: str) -> dict[int, float] | None:
    """{doc_id: score} for `metric` (a name without filter) over the documents that carry it, or
    None when none does or any value is not a number (the metric does not decompose)."""
    scores: dict[int, float] = {}
    for record in samples:
        if record.get("task") != task or int(record.get("request_index", 0)) != 0:
            continue
        metrics = record.get("metrics")
        if not isinstance(metrics, dict) or metric not in metrics:
            continue
        score = sample_score(metrics[metric])
        if score is None:
            return None
        scores[int(record["doc_id"])] = score
    return scores or None


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of `resamples` resamples (with replacement) of `values`: indices drawn as rows of
    `integers(0, n, size=n)` from `default_rng(seed)`, in chunks to bound the memory."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def percentile_interval(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The 95% percentile-bootstrap interval of the mean of `values`."""
    return _percentiles(bootstrap_means(values, resamples, seed))


def stderr_interval(metrics: dict[str, Any], key: str) -> tuple[Interval, str] | None:
    """value ± 1.96 standard errors from lmms-eval's `<m>_stderr,<filter>`, else its CLT
    `<m>_stderr_clt,<filter>`, when numeric (lmms-eval writes "N/A" where it has none)."""
    name, _, filt = key.partition(",")
    value = metrics.get(key)
    if not _number(value):
        return None
    for source, suffix in ((STDERR, "_stderr"), (STDERR_CLT, "_stderr_clt")):
        stderr = metrics.get(f"{name}{suffix},{filt}" if filt else f"{name}{suffix}")
        if _number(stderr):
            return Interval(value - Z * stderr, value + Z * stderr), source
    return None


def estimate(
    task_metrics: dict[str, Any], samples: list[dict[str, Any]], task: str, key: str, *,
    resamples: int = RESAMPLES, seed: int = 0,
) -> Estimate | None:
    """The metric `key` (`name,filter`) of one run's task: None if the run did not report it."""
    value = task_metrics.get(key)
    if not _number(value):
        return None
    name = key.partition(",")[0]
    scores = per_sample_scores(samples, task, name)
    if scores is not None and _is_mean(scores, value):
        values = np.fromiter(scores.values(), dtype=float)
        return Estimate(float(value), percentile_interval(values, resamples, seed), BOOTSTRAP, scores)
    aggregated = _aggregated(samples, task, name, float(value), resamples, seed)
    if aggregated is not None:
        return aggregated
    fallback = stderr_interval(task_metrics, key)
    if fallback is not None:
        return Estimate(float(value), fallback[0], fallback[1], None)
    return Estimate(float(value), None, NONE, None)


def paired_difference(run: Estimate, reference: Estimate, *, resamples: int = RESAMPLES, seed: int = 0) -> Difference:
    """run - reference: the paired bootstrap over the documents both scored when both decompose
    (or both carry lmms-eval's aggregation); else the difference of the aggregates, without an
    interval."""
    if run.scores is not None and reference.scores is not None:
        common = sorted(run.scores.keys() & reference.scores.keys())
        if common:
            differences = np.array([run.scores[d] - reference.scores[d] for d in common])
            return Difference(float(differences.mean()), percentile_interval(differences, resamples, seed), len(common))
    if run.values is not None and reference.values is not None and run.aggregate is not None:
        common = sorted(run.values.keys() & reference.values.keys())
        if common:
            own, theirs = [run.values[d] for d in common], [reference.values[d] for d in common]
            draws = bootstrap_aggregates(run.aggregate, [own, theirs], resamples=min(resamples, AGGREGATION_RESAMPLES), seed=seed)
            differences = draws[:, 0] - draws[:, 1]
            value = run.aggregate(own) - run.aggregate(theirs)
            return Difference(float(value), _percentiles(differences), len(common))
    return Difference(run.value - reference.value, None, 0)


def _aggregated(samples: list[dict[str, Any]], task: str, name: str, value: float, resamples: int, seed: int) -> Estimate | None:
    """The bootstrap of lmms-eval's own aggregation of the per-document values, when the task's
    aggregation function is known and reproduces the reported number."""
    values = per_sample_values(samples, task, name)
    aggregate = task_aggregation(task, name) if values else None
    if aggregate is None:
        return None
    ordered = list(values.values())
    try:
        with _quiet():
            reproduced = aggregate(ordered)
    except Exception:  # values this aggregation cannot read (another version's records): no bootstrap
        return None
    if not (_number(reproduced) and abs(reproduced - value) <= 1e-6 * max(1.0, abs(value))):
        return None
    draws = bootstrap_aggregates(aggregate, [ordered], resamples=min(resamples, AGGREGATION_RESAMPLES), seed=seed)
    return Estimate(value, _percentiles(draws[:, 0]), AGGREGATE, None, values, aggregate)


def per_sample_values(samples: list[dict[str, Any]], task: str, metric: str) -> dict[int, Any]:
    """{doc_id: value} of `metric` as `process_results` returned it, over the documents that carry it."""
    return {
        int(record["doc_id"]): record["metrics"][metric]
        for record in samples
        if record.get("task") == task and int(record.get("request_index", 0)) == 0
        and isinstance(record.get("metrics"), dict) and metric in record["metrics"]
    }


def _percentiles(draws: np.ndarray) -> Interval:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(low), float(high))


@contextmanager
def _quiet() -> Iterator[None]:
    from loguru import logger

    logger.disable("lmms_eval")
    try:
        yield
    finally:
        logger.enable("lmms_eval")


def _is_mean(scores: dict[int, float], aggregate: float) -> bool:
    """Whether lmms-eval's aggregate is the plain mean of the per-document scores (then the
    bootstrap of the mean is the interval of the reported number)."""
    mean = math.fsum(scores.values()) / len(scores)
    return abs(mean - aggregate) <= 1e-6 * max(1.0, abs(aggregate))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
