"""Measured op counts (docs/flops.md#measured-counts): the multiply-accumulates a real prefill forward
executes, attributed to the language model, the vision tower and the projector, in the same unit
as the analytic figures of `flops.py` (MACs, which the papers call FLOPs).

How: `torch.utils.flop_counter.FlopCounterMode` intercepts every aten op at dispatch and keeps
per-module totals through its module tracker; its FLOPs are 2 * MACs, so we halve them. Like the
analytic path it counts matmul-type ops only (linear, mm/bmm, convolution, attention); additions,
softmax, norms and pooling cost nothing. Ops it does not know are added here: the kernel
`scaled_dot_product_attention` dispatches to on CPU (without it the default sdpa backend counts
no attention at all, while eager's bmm does), `torch.cdist`'s kernels and `mv` (k-means'
distances and position means). The GPU sdpa kernels get the same formula, which takes
grouped-query keys with fewer heads (HF passes `enable_gqa` on CUDA).

Why this counter first and fvcore second (`fvcore_count.py`): fvcore's `FlopCountAnalysis`
counts a TorchScript trace, not what runs. Tracing eliminates dead code (with
`vision_feature_layer=-2` the CLIP tower's last layer feeds nothing LLaVA reads, so fvcore drops
it, although HF executes it every forward), and fvcore counts layer norms (5 per element), which
are not multiply-accumulates. On the language model neither applies, and there the two counters
agree exactly (tests), so `vtcbench profile` reports both for it; the vision tower and projector
come from this counter alone. Its name is recorded in every result (`OpCount.counter`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vtcbench.engine import compress
from vtcbench.errors import choices_error
from vtcbench.families import family_of
from vtcbench.methods.base import Method

COUNTER = "torch.utils.flop_counter"
TERA = 1e12

Part = Literal["total", "language_model", "vision_tower", "projector", "method_overhead", "other"]
PARTS: tuple[str, ...] = ("total", "language_model", "vision_tower", "projector", "method_overhead", "other")


@dataclass(frozen=True)
class OpCount:
    """Multiply-accumulates of one prefill forward over the whole batch given.

    `language_model_macs` covers the decoder layers, the final norm, the LM head (one position:
    the next token) and the method's scoring that runs inside the decoder; `method_overhead_macs`
    is that scoring alone (a part of `language_model_macs`). `other_macs` is whatever ran outside
    these modules (0 for LLaVA; a pre-LLM method's own layers in a projector hook would land here).
    """

    language_model_macs: int
    vision_tower_macs: int
    projector_macs: int
    method_overhead_macs: int
    other_macs: int
    counter: str = COUNTER

    @property
    def total_macs(self) -> int:
        return self.language_model_macs + self.vision_tower_macs + self.projector_macs + self.other_macs

    def tflops(self, part: Part = "total") -> float:
        """Tera-MACs of one part: the unit of `FlopsReport.tflops_*` (the papers' "TFLOPs")."""
        if part not in PARTS:
            raise choices_error("op-count part", part, PARTS)
        return getattr(self, f"{part}_macs") / TERA

    def to_dict(self) -> dict:
        return {**asdict(self), "total_macs": self.total_macs}


def count_ops(model: nn.Module, inputs: dict, method: Method | None = None) -> OpCount:
    """Count one prefill forward of a model of any family: `use_cache=False`, logits of the last
    position only (`logits_to_keep=1`, as generation computes them), under `torch.no_grad`.

    With a method, the forward runs under the compression engine (`engine.prepare` shortens the
    prompt of a pre-LLM method first), so the count is what the compressed model executes. Batch
    totals: the analytic `FlopsReport` is per sample, so compare with a batch of one.
    """
    engine = compress(model, method) if method is not None else None
    with engine if engine is not None else nullcontext(), torch.no_grad():
        if engine is not None:
            inputs = engine.prepare(inputs)
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            meter = _Meter(counter)
            if engine is not None:
                engine.overhead = meter
            model(**inputs, use_cache=False, logits_to_keep=1)

    flops = counter.get_flop_counts()
    names = {module: name for name, module in model.named_modules()}
    root = type(model).__name__  # the module tracker names modules "<root class>.<path>"

    def macs(module: nn.Module | None) -> int:
        if module is None:
            return 0
        return sum(flops.get(f"{root}.{names[module]}", {}).values()) // 2

    def overhead_in(module: nn.Module) -> int:  # the method's MACs while `module` ran (its hooks included)
        return sum(flops for parents, flops in meter.intervals if f"{root}.{names[module]}" in parents) // 2

    family = family_of(model)
    language_module = family.language_model(model)
    # the language model's figure includes the method's work inside it (in-LLM scoring), as the
    # analytic `tflops_language_model` does; a selection at the projector is the method's alone
    language = macs(language_module) + macs(model.get_output_embeddings())
    tower, projector_module = family.vision_tower(model), family.projector(model)
    inside = any(m is projector_module for m in tower.modules())  # Qwen's merger is inside its tower
    projector = macs(projector_module) - overhead_in(projector_module)
    vision = macs(tower) - overhead_in(tower) - (projector if inside else 0)
    overhead = meter.flops // 2
    total = counter.get_total_flops() // 2
    return OpCount(
        language_model_macs=language,
        vision_tower_macs=vision,
        projector_macs=projector,
        method_overhead_macs=overhead,
        other_macs=total - language - vision - projector - (overhead - overhead_in(language_module)),
    )


class _Meter:
    """The engine's `overhead` wrapper: adds up the FLOPs counted while the method works."""

    def __init__(self, counter: FlopCounterMode):
        self.counter = counter
        self.flops = 0
        self.intervals: list[tuple[frozenset[str], int]] = []  # (modules running, FLOPs) per stretch of work
        self._start = 0

    def __call__(self) -> _Meter:
        return self

    def __enter__(self) -> None:
        self._start = self.counter.get_total_flops()

    def __exit__(self, *exc) -> None:
        flops = self.counter.get_total_flops() - self._start
        self.flops += flops
        self.intervals.append((frozenset(self.counter.mod_tracker.parents), flops))


# -- formulas FlopCounterMode lacks (FLOPs = 2 * MACs, from shapes, as torch's own formulas) -----------


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """q.K^T and A.V over every query head (grouped-query keys broadcast); causal masking is not
    discounted, as in torch's GPU formulas and the analytic 2n^2d."""
    *batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * heads * queries * keys * (head_dim + value_dim)


def _euclidean_dist_flops(x1_shape, x2_shape, *args, out_shape=None, **kwargs) -> int:
    """cdist's matmul path: [x1*-2, |x1|^2, 1] @ [x2, 1, |x2|^2]^T, inner size d + 2."""
    *batch, n, dim = x1_shape
    return 2 * math.prod(batch) * n * x2_shape[-2] * (dim + 2)


def _cdist_flops(x1_shape, x2_shape, *args, out_shape=None, **kwargs) -> int:
    """cdist's direct path (small inputs): one difference-power-accumulate per coordinate pair."""
    *batch, n, dim = x1_shape
    return 2 * math.prod(batch) * n * x2_shape[-2] * dim


def _mv_flops(matrix_shape, vector_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * matrix_shape[0] * matrix_shape[1]


_aten = torch.ops.aten
_EXTRA_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    _aten._scaled_dot_product_flash_attention: _sdpa_flops,
    _aten._scaled_dot_product_efficient_attention: _sdpa_flops,
    _aten._scaled_dot_product_cudnn_attention: _sdpa_flops,
    _aten._euclidean_dist: _euclidean_dist_flops,
    _aten._cdist_forward: _cdist_flops,
    _aten.mv: _mv_flops,
}
