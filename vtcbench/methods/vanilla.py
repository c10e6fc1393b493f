"""No compression: the reference every method is compared against."""

from dataclasses import dataclass
from typing import ClassVar

from vtcbench.methods.base import Method, register
from vtcbench.methods.kinds import NONE, MethodKind


@register
@dataclass
class Vanilla(Method):
    """The unmodified model. The engine only counts its visual tokens (one hook on the multimodal
    model); no decoder layer is hooked."""

    name: ClassVar[str] = "vanilla"
    kind: ClassVar[MethodKind] = NONE
    description: ClassVar[str] = "no compression (the reference)"
