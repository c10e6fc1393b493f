"""Latency: one timer over CUDA events (GPU) or perf_counter (CPU), and robust statistics.

As in optimum-benchmark's latency tracker: marks are recorded without synchronising (CUDA
events go into the stream), and the timer synchronises once, at read-out, so timing does not
change what it measures. Phases are named; a phase may occur several times per iteration (the
method's scoring at several layers, one decode step per token).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Latency:
    """Milliseconds over iterations: median and the 10th/90th percentiles."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    n: int

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> Latency:
        if not samples_ms:
            raise ValueError("no samples to summarise")
        ordered = sorted(samples_ms)
        return cls(
            median_ms=statistics.median(ordered),
            p10_ms=_percentile(ordered, 0.10),
            p90_ms=_percentile(ordered, 0.90),
            mean_ms=statistics.fmean(ordered),
            n=len(ordered),
        )


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class PhaseTimer:
    """Named, possibly repeated phases; CUDA events on a GPU device, perf_counter otherwise."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._open: dict[str, object] = {}
        self._spans: list[tuple[str, object, object]] = []

    def _mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._open[name] = self._mark()

    def stop(self, name: str) -> None:
        self._spans.append((name, self._open.pop(name), self._mark()))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def read(self) -> dict[str, list[float]]:
        """Durations in ms per phase name, in order; synchronises once and clears the timer."""
        if self.cuda:
            torch.cuda.synchronize()
        durations: dict[str, list[float]] = defaultdict(list)
        for name, begin, end in self._spans:
            ms = begin.elapsed_time(end) if self.cuda else (end - begin) * 1000.0
            durations[name].append(ms)
        self._spans.clear()
        self._open.clear()
        return dict(durations)


class TokenMarker:
    """A generate() logits processor that marks each token's logits (first call = end of prefill).

    Timing from inside `generate` without touching the model: consecutive marks give per-token
    decode times, the first mark the time to first token.
    """

    def __init__(self, timer: PhaseTimer):
        self.timer = timer
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.calls == 0:
            self.timer.stop("ttft")
        else:
            self.timer.stop("decode_token")
        self.timer.start("decode_token")
        self.calls += 1
        return scores
