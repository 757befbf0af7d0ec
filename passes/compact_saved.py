"""The memory pass: batch norms after quantised layers, and ReLUs, keep compact saved tensors.

Runs after ``insert_quant_nodes``. A batch-norm module whose input is the output of a quantised
conv/linear call becomes :func:`~muppet_fx.compact.compact_batch_norm` with that layer's site
(the site tells at run time whether the output was quantised, and to how many bits); a ReLU
that is such a batch norm's only reader joins it (``relu=True``); other ReLU modules, functions
and methods become :func:`~muppet_fx.compact.compact_relu`. In-place ReLUs
are rewritten only where no other node reads their input, since the rewrite returns a new
tensor. Same values and gradients (see ``muppet_fx.compact``); less memory.
"""
from __future__ import annotations

import operator
import types

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from muppet_fx.compact import BATCH_NORMS, compact_add_relu, compact_batch_norm, compact_relu
from muppet_fx.ops import quant_conv, quant_linear
from muppet_fx.passes.mutation import written_in_place
from muppet_fx.passes.quantise_layers import RewriteContext, Rule, apply_first_rule

__all__ = ["COMPACT_RULES", "compact_saved_tensors"]

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_HOLDER = "_precision_state"


def _module(node: fx.Node, ctx: RewriteContext):
    return ctx.modules.get(node.target) if node.op == "call_module" else None


def _after_quantised_layer(node: fx.Node, ctx: RewriteContext) -> bool:
    """A batch norm reading a quantised layer's output that no node writes in place (it reads
    the mantissas the layer's quantiser wrote)."""
    x = node.args[0] if node.args else None
    return (type(_module(node, ctx)) in BATCH_NORMS and len(node.args) == 1 and not node.kwargs
            and isinstance(x, fx.Node) and x.op == "call_function" and x.target in (quant_conv, quant_linear)
            and not written_in_place(x, ctx.modules))


def _rewrite_batch_norm(node: fx.Node, ctx: RewriteContext) -> None:
    site = node.args[0].args[0]  # the producer's site node
    holder = getattr(ctx.sites, site.target.split(".", 1)[1])
    holder.feeds_batch_norm = True
    holder.output_values_unread = len(node.args[0].users) == 1
    bn = ctx.attr_node(node, node.target)
    node.op, node.target, node.args = "call_function", compact_batch_norm, (site, node.args[0], bn)


def _inplace(node: fx.Node, ctx: RewriteContext) -> bool:
    m = _module(node, ctx)
    if m is not None:
        return m.inplace
    if node.op == "call_method":
        return node.target == "relu_"
    return node.target is torch.relu_ or bool(node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False))


def _is_relu(node: fx.Node, ctx: RewriteContext) -> bool:
    plain = (type(_module(node, ctx)) is nn.ReLU or (node.op == "call_function" and node.target in _RELU_FUNCTIONS)
             or (node.op == "call_method" and node.target in ("relu", "relu_")))
    if not plain or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return not _inplace(node, ctx) or len(node.args[0].users) == 1


def _rewrite_relu(node: fx.Node, ctx: RewriteContext) -> None:
    if not hasattr(ctx.sites, _HOLDER):
        setattr(ctx.sites, _HOLDER, types.SimpleNamespace(state=ctx.state))
    with ctx.graph.inserting_before(node):
        holder = ctx.graph.get_attr(f"_muppet_sites.{_HOLDER}")
    node.op, node.target, node.args, node.kwargs = "call_function", compact_relu, (holder, node.args[0]), {}


def _relu_of_compact_batch_norm(node: fx.Node, ctx: RewriteContext) -> bool:
    bn = node.args[0] if node.args else None
    return (_is_relu(node, ctx) and isinstance(bn, fx.Node) and bn.op == "call_function"
            and bn.target is compact_batch_norm and len(bn.args) == 3 and len(bn.users) == 1)


def _fuse_relu(node: fx.Node, ctx: RewriteContext) -> None:
    bn = node.args[0]
    bn.args = (*bn.args, True)
    node.replace_all_uses_with(bn)
    ctx.graph.erase_node(node)


_ADDS = (operator.add, operator.iadd, torch.add)


def _relu_of_a_sum(node: fx.Node, ctx: RewriteContext) -> bool:
    """A ReLU whose input is ``a + b`` of two graph values read by nothing else (for an
    in-place ``a += b``, ``a`` read by nothing else either: the fused op leaves it unchanged)."""
    add = node.args[0] if node.args else None
    if not (_is_relu(node, ctx) and isinstance(add, fx.Node) and add.op == "call_function" and add.target in _ADDS
            and len(add.args) == 2 and not add.kwargs and len(add.users) == 1
            and all(isinstance(a, fx.Node) for a in add.args)):
        return False
    return add.target is not operator.iadd or len(add.args[0].users) == 1


def _fuse_add_relu(node: fx.Node, ctx: RewriteContext) -> None:
    _rewrite_relu(node, ctx)  # the holder of the run-time state
    add = node.args[1]
    node.target, node.args = compact_add_relu, (node.args[0], *add.args)
    ctx.graph.erase_node(add)


COMPACT_RULES: list[Rule] = [
    Rule("batch norm after a quantised layer", _after_quantised_layer, _rewrite_batch_norm),
    Rule("relu reading only a compact batch norm", _relu_of_compact_batch_norm, _fuse_relu),
    Rule("relu of a sum read by nothing else", _relu_of_a_sum, _fuse_add_relu),
    Rule("relu", _is_relu, _rewrite_relu),
]


def compact_saved_tensors(graph: fx.Graph, ctx: RewriteContext) -> fx.Graph:
    """Apply the first matching rule to every node (modules the filter rejects stay as they are)."""
    for node in list(graph.nodes):
        m = _module(node, ctx)
        if m is None or ctx.keep(m, ctx.prefix + node.target):
            apply_first_rule(node, ctx, COMPACT_RULES)
    return graph
