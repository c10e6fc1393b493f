"""ViCo (conical visual concentration), the supplement's S-stage schedule.

Supplement section on the schedule: PyramidDrop's ranking and keep rule with S equal stages, so
the drops happen at layers floor(L/S) * s for s = 1..S-1 (S=4 on 32 layers gives 8, 16, 24) and
stage s keeps int(N0 * lambda^s). Everything else (own-layer scoring, compacted positions)
follows PyramidDrop; see `pdrop.py`.

On M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) positions are not compacted: a 3-D numbering has
no compacted form, so the kept tokens keep their original ids (as the Qwen ports of
PyramidDrop-style methods do); this is a difference from the LLaVA rule above.
"""

from dataclasses import dataclass
from typing import ClassVar

from vtcbench.errors import VtcbenchError
from vtcbench.methods.base import check_positive, check_ratio, register
from vtcbench.methods.pdrop import StagedDrop


@register
@dataclass
class ViCo(StagedDrop):
    """ViCo's S-stage schedule (supplement section 2, Table 2): PyramidDrop with drops at
    floor(L/S) * s. No official code in the supplement; the ranking and keep rule follow
    PyramidDrop's official `Cooperx521/PyramidDrop`."""

    stages: int = 4
    keep_ratio: float = 0.5

    name: ClassVar[str] = "vico"
    description: ClassVar[str] = "PyramidDrop with S equal stages (drops at floor(L/S)*s)"

    def __post_init__(self) -> None:
        check_positive(self.name, "stages", self.stages)
        check_ratio(self.name, "keep_ratio", self.keep_ratio, low_open=True, high_closed=True)

    def stage_layers(self, n_layers: int) -> tuple[int, ...]:
        width = n_layers // self.stages
        return tuple(width * s for s in range(1, self.stages))

    def validate_for(self, n_image: int, n_layers: int) -> None:
        if self.stages > n_layers:
            raise VtcbenchError(f"{self.name}: stages={self.stages} is out of range; valid range: 1..{n_layers}")
