"""Which graph values later nodes change in place.

The passes share a layer's output between readers as the mantissas its quantiser wrote (the
compact batch norm reads them instead of the float map) and turn shape views into reshapes.
Both assume the value is not written afterwards: ``h.clamp_()``, ``h[mask] = 0`` or
``h.view(n, -1).mul_(s)`` between a convolution and its batch norm must reach the batch norm
as they do in the model. :func:`written_in_place` finds such writes, through views of the value.
"""
from __future__ import annotations

import functools
import inspect
import operator

import torch.fx as fx
import torch.nn as nn

__all__ = ["written_in_place"]

_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                       operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}
# methods whose result shares the value's memory, so writing the result writes the value
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute",
                 "t", "T", "mT", "unsqueeze", "squeeze", "narrow", "select", "expand", "expand_as",
                 "as_strided", "unfold", "chunk", "split", "unbind", "detach", "contiguous", "movedim",
                 "swapaxes", "diagonal", "real", "imag"}


@functools.cache
def _inplace_parameter(fn) -> inspect.Signature | None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return signature if "inplace" in signature.parameters else None


def _writes_first_argument(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op != "call_function":
        return False
    if node.target in _IN_PLACE_OPERATORS:
        return True
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):  # torch.relu_, torch.clamp_, ...
        return True
    signature = _inplace_parameter(node.target)
    if signature is None:
        return False
    try:
        return bool(signature.bind(*node.args, **node.kwargs).arguments.get("inplace", False))
    except TypeError:
        return False


def _is_view(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op == "call_function" and node.target is operator.getitem))


def written_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node of the graph writes ``node``'s value in place, directly or through a
    view of it (``modules``: the graph's submodules by target, for ``inplace=True`` ones)."""
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        if _writes_first_argument(user, modules):
            return True
        if _is_view(user) and written_in_place(user, modules):
            return True
    return False
