"""Tracing with torch.fx, keeping untraceable submodules as leaves.

``trace_with_leaves(module)`` traces ``module``; when a submodule's forward cannot be traced
symbolically (data-dependent control flow, iteration over a proxy, ...), that submodule becomes a
leaf and tracing restarts. It returns the graph and the paths of the submodules kept opaque, which
the caller prepares recursively. If ``module``'s own code cannot be traced, ``graph`` is ``None``.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

__all__ = ["MuppetTracer", "trace_with_leaves", "LEAF_TYPES", "TRANSPOSED_CONVS"]

TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Modules the rewrite rules act on as a whole (or keep FP32 as a whole).
LEAF_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention, nn.RNNBase,
              *TRANSPOSED_CONVS, nn.Bilinear)


class MuppetTracer(fx.Tracer):
    """Leaves: the rule table's module types, parameter-free torch.nn primitives, and the opaque
    paths found so far. Records the innermost module whose tracing raised."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque = opaque
        self.failed_path: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque or isinstance(m, LEAF_TYPES):
            return True
        return m.__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential) \
            and next(m.children(), None) is None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                try:
                    self.failed_path = self.path_of_module(m)
                except NameError:  # a module not registered as a submodule: blame the caller
                    pass
            raise


def trace_with_leaves(module: nn.Module) -> tuple[fx.Graph | None, list[str], list[str]]:
    """Returns ``(graph or None, opaque submodule paths, reasons)``."""
    opaque: list[str] = []
    reasons: list[str] = []
    while True:
        tracer = MuppetTracer(set(opaque))
        try:
            graph = tracer.trace(module)
            return graph, opaque, reasons
        except Exception as err:  # any failure: isolate the innermost module that raised
            path = tracer.failed_path
            if not path or path in opaque:
                reasons.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                return None, opaque, reasons
            opaque.append(path)
            reasons.append(f"{path}: {type(err).__name__}")
