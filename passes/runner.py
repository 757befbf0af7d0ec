"""Apply graph passes in order, checking the graph after each one."""
from __future__ import annotations

from typing import Callable, Sequence

import torch.fx as fx

__all__ = ["run_passes", "PassError"]


class PassError(RuntimeError):
    """A pass failed or left an invalid graph; the message names the pass, module and node."""


def run_passes(graph: fx.Graph, passes: Sequence[Callable[[fx.Graph], fx.Graph]], owner: str) -> fx.Graph:
    for p in passes:
        name = getattr(p, "__name__", repr(p))
        try:
            graph = p(graph)
            graph.lint()
        except Exception as err:
            node = getattr(err, "node", None)
            where = f" at node {node.format_node()}" if node is not None else ""
            raise PassError(f"pass {name} failed on module {owner!r}{where}: {err}") from err
    return graph
