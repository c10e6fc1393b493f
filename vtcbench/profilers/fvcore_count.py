"""A second measured counter: fvcore's `FlopCountAnalysis` on the language model's prefill.

`opcount.py` counts what runs (torch's dispatcher); fvcore, the counter most researchers know,
counts a TorchScript trace of the same forward. Two independent mechanisms that agree on the
language model make the measured figure hard to doubt. The comparison stops at the language
model (decoder layers, the method's scoring inside them, and the LM head on the last position):
in the vision tower a trace drops what feeds nothing (the CLIP layer after
`vision_feature_layer=-2`, which HF still executes) and fvcore counts layer norms, which are not
multiply-accumulates (docs/flops.md).

fvcore counts one multiply-accumulate as one flop, the unit of the analytic figures. It has no
handler for `scaled_dot_product_attention`, `cdist`, or a matrix-vector `matmul` (its own matmul
handler asserts two matrices); those get handlers here with the formulas `opcount.py` uses.

Where it traces: a TorchScript trace runs transformers' own code with traced sizes, and up to
5.23 transformers' mask code takes a traced sequence length for its legacy `cache_position`
argument and fails (IndexError in `sdpa_mask`); from 5.24 the trace goes through. A failed trace
raises `TraceFailed`, which `vtcbench profile` reports in place of the second count.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from vtcbench.engine import compress
from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of
from vtcbench.methods.base import Method


class TraceFailed(VtcbenchError):
    """fvcore's TorchScript trace of the model failed (the first counter is unaffected)."""


class _KeywordModel(nn.Module):
    """Tracing passes positional tensors; the model's forward takes keywords."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = dict(zip(self.names, tensors))
        return self.model(**inputs, use_cache=False, logits_to_keep=1, return_dict=False)[0]


def fvcore_language_model_macs(model: nn.Module, inputs: dict, method: Method | None = None) -> int:
    """Multiply-accumulates of the language model in one prefill forward, as fvcore counts them
    (same forward as `opcount.count_ops`: no cache, logits of the last position, the engine on)."""
    from fvcore.nn import FlopCountAnalysis

    engine = compress(model, method) if method is not None else None
    with engine if engine is not None else nullcontext(), torch.no_grad():
        if engine is not None:
            inputs = engine.prepare(inputs)
        names = [name for name, value in inputs.items() if isinstance(value, torch.Tensor)]
        wrapper = _KeywordModel(model, names)
        analysis = FlopCountAnalysis(wrapper, tuple(inputs[name] for name in names))
        analysis.set_op_handle(
            "aten::scaled_dot_product_attention", _sdpa_macs, "aten::cdist", _cdist_macs, "aten::matmul", _matmul_macs
        )
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        try:
            by_module = analysis.by_module()  # traces the forward
        except Exception as error:  # the trace runs transformers' code: whatever it raises means "does not trace"
            import transformers

            detail = (str(error).strip().splitlines() or [""])[0]
            raise TraceFailed(
                f"fvcore could not trace {type(model).__name__} under transformers {transformers.__version__} "
                f"({type(error).__name__}: {detail})"
            ) from error
    module_names = {module: name for name, module in wrapper.named_modules()}
    return by_module[module_names[family_of(model).language_model(model)]] + by_module[module_names[model.get_output_embeddings()]]


def _shapes(values) -> list[list[int]]:
    from fvcore.nn.jit_handles import get_shape

    return [get_shape(value) for value in values]


def _sdpa_macs(inputs, outputs) -> int:
    """q.K^T and A.V over every query head, as `opcount._sdpa_flops` / 2."""
    query, key, value = _shapes(inputs[:3])
    *batch, heads, queries, head_dim = query
    return math.prod(batch) * heads * queries * key[-2] * (head_dim + value[-1])


def _cdist_macs(inputs, outputs) -> int:
    """k-means' distances: cdist's default mode takes its matmul path (inner size d + 2) when
    either side has more than 25 rows, else one multiply-accumulate per coordinate pair."""
    x1, x2 = _shapes(inputs[:2])
    *batch, n, dim = x1
    inner = dim + 2 if n > 25 or x2[-2] > 25 else dim
    return math.prod(batch) * n * x2[-2] * inner


def _matmul_macs(inputs, outputs) -> int:
    """torch.matmul with any ranks: the output's elements times the contracted size."""
    first, _ = _shapes(inputs[:2])
    (output,) = _shapes(outputs)
    return math.prod(output) * first[-1]
