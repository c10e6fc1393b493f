"""Compression methods, one file each, registered by name (see `base.py` for the protocol)."""

from vtcbench.methods import (  # noqa: F401
    avgpool,
    cdpruner,
    dart,
    divprune,
    fastv,
    kmeans,
    llavolta,
    pdrop,
    prumerge_plus,
    random_drop,
    sparsevlm,
    stf,
    tokenconcat,
    vanilla,
    vico,
    visionzip,
    vispruner,
    voco,
)
from vtcbench.methods.base import (
    METHODS,
    Keep,
    LayerContext,
    Method,
    Replace,
    check_before_loading,
    get_method,
    method_class,
    parse_set_options,
)

__all__ = [
    "METHODS", "Keep", "LayerContext", "Method", "Replace", "check_before_loading", "get_method", "method_class",
    "parse_set_options",
]
