"""No compression: the reference every method is compared against."""

from dataclasses import dataclass
from typing import ClassVar

from vtcbench.methods.base import Method, Where, register


@register
@dataclass
class Vanilla(Method):
    """The unmodified model. The engine attaches no hooks for it."""

    name: ClassVar[str] = "vanilla"
    where: ClassVar[Where] = "none"
    description: ClassVar[str] = "no compression (the reference)"
