"""Training-time compression schedules: which method is active during which share of the steps.

LLaVolta (Chen et al., 2024, section 3.3 and Table 1): training is split into equal stages; every
stage but the last pools the image tokens (K = layer, S = stride), the last trains without
compression. The paper's layers are for 32-layer Vicuna-7B: the shallow layer K=2 is kept as is,
the deep layer K=16 (half the depth) becomes n_layers // 2. Strides are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtcbench.errors import choices_error
from vtcbench.methods import Method, get_method

_DEEP = "deep"  # placeholder for n_layers // 2

#: name -> stages of (layer, stride), None = no compression; all stages get equal shares
_LLAVOLTA: dict[str, tuple[tuple[int | str, int] | None, ...]] = {
    "llavolta-2stage": ((2, 8), None),
    "llavolta-3stage-deeper": ((2, 8), (_DEEP, 8), None),
    "llavolta-3stage-wider": ((2, 8), (2, 2), None),
    "llavolta-4stage": ((2, 8), (_DEEP, 8), (_DEEP, 2), None),  # "deeper then wider", best average in Table 2
    "llavolta-4stage-wider": ((2, 8), (2, 2), (_DEEP, 2), None),  # "wider then deeper"
}
SCHEDULES: tuple[str, ...] = tuple(_LLAVOLTA)


@dataclass(frozen=True)
class Stage:
    first_step: int
    method: Method


def stages(schedule: str | None, method: Method, steps: int, n_layers: int) -> list[Stage]:
    """The stages of a run of `steps`: one stage with `method` when no schedule is given."""
    if schedule is None:
        return [Stage(0, method)]
    if schedule not in _LLAVOLTA:
        raise choices_error("schedule", schedule, SCHEDULES)
    plan = _LLAVOLTA[schedule]
    out = []
    for index, entry in enumerate(plan):
        if entry is None:
            stage_method = get_method("vanilla")
        else:
            layer, stride = entry
            stage_method = get_method("llavolta", layer=n_layers // 2 if layer == _DEEP else layer, stride=stride)
        out.append(Stage(index * steps // len(plan), stage_method))
    return out


def describe(stage_list: list[Stage], steps: int) -> str:
    bounds = [s.first_step for s in stage_list] + [steps]
    return "; ".join(
        f"steps {start}-{end - 1}: {label(stage.method)}" for stage, start, end in zip(stage_list, bounds, bounds[1:])
    )


def label(method: Method) -> str:
    params = ",".join(f"{k}={v}" for k, v in method.params().items())
    return f"{method.name}({params})" if params else method.name
