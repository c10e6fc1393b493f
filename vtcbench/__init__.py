"""vtcbench: benchmark and profile visual token compression in LLaVA-family models.

    from vtcbench import load_model, get_method, compress
"""

from __future__ import annotations

from typing import Any

__all__ = ["compress", "get_method", "load_model", "VtcbenchError"]
_EXPORTS = {
    "compress": "vtcbench.engine",
    "get_method": "vtcbench.methods",
    "load_model": "vtcbench.models",
    "VtcbenchError": "vtcbench.errors",
}


def __getattr__(name: str) -> Any:
    """Import lazily so `vtcbench --help` does not pay for torch and transformers."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vtcbench' has no attribute {name!r}")
