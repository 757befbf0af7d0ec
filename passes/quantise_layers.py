"""The rewrite pass: every conv/linear/matmul node of a traced graph becomes a quantised op.

Rules are rows of one table, walked by one loop. A rule matches a node and rewrites it to a call
of a ``quant_*`` wrapper whose first argument is the layer's site (a ``get_attr`` of the
prepared model's ``_muppet_sites`` namespace). Modules the rules keep FP32 are recorded with a
reason, so the summary shows them.
"""
from __future__ import annotations

import operator
import re
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from muppet_fx.attention import AttentionSites, mha_unsupported_reason, quant_mha, quant_sdpa
from muppet_fx.ops import (quant_addmm, quant_conv, quant_conv_transpose, quant_conv_transpose_module,
                           quant_einsum, quant_linear, quant_matmul)
from muppet_fx.passes.mutation import written_in_place
from muppet_fx.passes.trace import TRANSPOSED_CONVS

__all__ = ["Rule", "RULES", "FUNCTION_RULES", "METHOD_RULES", "insert_quant_nodes", "apply_first_rule", "site_attr"]

# Function-level ops: target -> (op name, wrapper). The intercept mode uses the same table.
FUNCTION_RULES: dict[Callable, tuple[str, Callable]] = {
    F.linear: ("linear", quant_linear),
    F.conv1d: ("conv1d", quant_conv),
    F.conv2d: ("conv2d", quant_conv),
    F.conv3d: ("conv3d", quant_conv),
    F.conv_transpose1d: ("conv_transpose1d", quant_conv_transpose),
    F.conv_transpose2d: ("conv_transpose2d", quant_conv_transpose),
    F.conv_transpose3d: ("conv_transpose3d", quant_conv_transpose),
    torch.matmul: ("matmul", quant_matmul),
    operator.matmul: ("matmul", quant_matmul),
    torch.mm: ("mm", quant_matmul),
    torch.bmm: ("bmm", quant_matmul),
    torch.addmm: ("addmm", quant_addmm),
    torch.baddbmm: ("baddbmm", quant_addmm),
    F.scaled_dot_product_attention: ("sdpa", quant_sdpa),
    torch.einsum: ("einsum", quant_einsum),
}
METHOD_RULES: dict[str, tuple[str, Callable]] = {
    "matmul": ("matmul", quant_matmul), "__matmul__": ("matmul", quant_matmul),
    "mm": ("mm", quant_matmul), "bmm": ("bmm", quant_matmul),
    "addmm": ("addmm", quant_addmm), "baddbmm": ("baddbmm", quant_addmm),
}
FP32_MODULES: dict[type, str] = {
    nn.RNNBase: "recurrent layers stay FP32",
    nn.Bilinear: "bilinear layers are not routed",
}


def site_attr(name: str) -> str:
    """Attribute name of a site inside the ``_muppet_sites`` namespace."""
    return re.sub(r"\W", "_", name) or "_root"


@dataclass
class RewriteContext:
    graph: fx.Graph
    modules: dict[str, nn.Module]
    state: object
    prefix: str
    sites: object  # types.SimpleNamespace on the prepared model
    keep: Callable[[nn.Module, str], bool]
    leaves: frozenset = frozenset()  # submodule paths the graph calls as (prepared) modules

    def site_node(self, node: fx.Node, site) -> fx.Node:
        attr = site_attr(getattr(site, "name", None) or site.prefix)
        setattr(self.sites, attr, site)
        with self.graph.inserting_before(node):
            return self.graph.get_attr(f"_muppet_sites.{attr}")

    def attr_node(self, node: fx.Node, target: str) -> fx.Node:
        with self.graph.inserting_before(node):
            return self.graph.get_attr(target)


@dataclass(frozen=True)
class Rule:
    name: str
    matches: Callable[[fx.Node, RewriteContext], bool]
    rewrite: Callable[[fx.Node, RewriteContext], None]


def _module(node: fx.Node, ctx: RewriteContext):
    return ctx.modules.get(node.target) if node.op == "call_module" else None


def _weight_axis(ctx: RewriteContext) -> int | None:
    return 0 if ctx.state.config.weight_granularity == "channel" else None


def _rewrite_module_layer(node: fx.Node, ctx: RewriteContext) -> None:
    m = _module(node, ctx)
    name = ctx.prefix + node.target
    x = node.args[0]
    w = ctx.attr_node(node, f"{node.target}.weight")
    b = ctx.attr_node(node, f"{node.target}.bias") if m.bias is not None else None
    if isinstance(m, nn.Linear):
        site = ctx.state.site(name, "linear", _weight_axis(ctx), m.weight)
        node.target, node.args = quant_linear, (None, x, w, b)
    else:
        site = ctx.state.site(name, f"conv{m.weight.dim() - 2}d", _weight_axis(ctx), m.weight)
        if m.padding_mode != "zeros":
            with ctx.graph.inserting_before(node):
                x = ctx.graph.call_function(F.pad, (x, m._reversed_padding_repeated_twice),
                                            {"mode": m.padding_mode})
            padding = 0
        else:
            padding = m.padding
        node.target = quant_conv
        node.args = (None, x, w, b, m.stride, padding, m.dilation, m.groups)
    node.op, node.kwargs = "call_function", {}
    node.args = (ctx.site_node(node, site),) + node.args[1:]


def _rewrite_conv_transpose(node: fx.Node, ctx: RewriteContext) -> None:
    """``nn.ConvTranspose*d`` (``output_size`` included) as :func:`quant_conv_transpose_module`;
    the weight's exponents are per input channel under channel granularity (the output
    channels of the convolution whose input gradient this is)."""
    m = _module(node, ctx)
    site = ctx.state.site(ctx.prefix + node.target, f"conv_transpose{m.weight.dim() - 2}d", _weight_axis(ctx),
                          m.weight)
    module_node = ctx.attr_node(node, node.target)
    node.op, node.target = "call_function", quant_conv_transpose_module
    node.args = (ctx.site_node(node, site), module_node, *node.args)


def _rewrite_mha(node: fx.Node, ctx: RewriteContext) -> None:
    m = _module(node, ctx)
    name = ctx.prefix + node.target
    reason = mha_unsupported_reason(m)
    if reason:
        ctx.state.keep_fp32(name, "multihead_attention", reason)
        return
    module_node = ctx.attr_node(node, node.target)
    qkv = [node.args[i] if len(node.args) > i else node.kwargs.get(k) for i, k in enumerate(("query", "key", "value"))]
    sites = AttentionSites(ctx.state, name + ".", "matmul", m, self_attention=qkv[0] is qkv[1] is qkv[2])
    node.op, node.target = "call_function", quant_mha
    node.args = (ctx.site_node(node, sites), module_node, *node.args)


def _rewrite_function(node: fx.Node, ctx: RewriteContext) -> None:
    if node.op == "call_function":
        op, wrapper = FUNCTION_RULES[node.target]
    else:
        op, wrapper = METHOD_RULES[node.target]
    name = f"{ctx.prefix}{node.name}"
    if wrapper is quant_sdpa:
        site = AttentionSites(ctx.state, name + ".", "matmul")
    else:
        w = node.args[1] if len(node.args) > 1 else None
        is_param = isinstance(w, fx.Node) and w.op == "get_attr"
        axis = _weight_axis(ctx) if wrapper in (quant_linear, quant_conv, quant_conv_transpose) and is_param else None
        site = ctx.state.site(name, op, axis, _weight_of(node, wrapper, ctx))
    node.op, node.target = "call_function", wrapper
    node.args = (ctx.site_node(node, site), *node.args)


def _weight_of(node: fx.Node, wrapper, ctx: RewriteContext):
    """The parameter a product multiplies, for the policy's gradients: a layer's weight
    argument, else the first operand the module holds (``mat2`` before ``mat1`` of ``addmm``,
    either side of ``matmul`` or a two-operand ``einsum``); ``None`` if no operand is one."""
    args = node.args
    if wrapper is quant_einsum:
        operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    elif wrapper is quant_addmm:
        operands = args[2:0:-1]
    elif wrapper is quant_matmul:
        operands = args[1::-1]
    else:
        operands = args[1:2]
    for w in operands:
        value = _attribute(w, ctx) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        if isinstance(value, nn.Parameter):
            return value
    return None


def _attribute(node: fx.Node, ctx: RewriteContext):
    """The object a ``get_attr`` node reads (``None`` where its owner is not a known module)."""
    owner, _, attr = node.target.rpartition(".")
    return getattr(ctx.modules.get(owner), attr, None)


_TORCH_ROOTS = {"torch", "operator", "_operator", "math", "builtins", "muppet_fx"}


def _is_wrapped_function(node: fx.Node, ctx: RewriteContext) -> bool:
    """A call of a user function FX did not trace into (``torch.fx.wrap``): its products are
    invisible to the graph, so the call runs intercepted."""
    if node.op != "call_function" or not isinstance(node.target, types.FunctionType):
        return False
    root = (getattr(node.target, "__module__", None) or "builtins").split(".")[0]
    return root not in _TORCH_ROOTS


def _rewrite_wrapped_function(node: fx.Node, ctx: RewriteContext) -> None:
    from muppet_fx.intercept import InterceptScope, run_intercepted  # needs this module's tables

    scope = InterceptScope(ctx.state, f"{ctx.prefix}{node.name}", node.target)
    node.args = (ctx.site_node(node, scope), *node.args)
    node.target = run_intercepted


def _record_fp32(node: fx.Node, ctx: RewriteContext) -> None:
    m = _module(node, ctx)
    reason = next(r for t, r in FP32_MODULES.items() if isinstance(m, t))
    ctx.state.keep_fp32(ctx.prefix + node.target, type(m).__name__, reason)


def _owner(node: fx.Node, ctx: RewriteContext):
    """(module, fqn) of the innermost module whose code issued ``node``, if recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = next(reversed(stack))
    path = path if isinstance(path, str) else stack[path][0]
    m = ctx.modules.get(path)
    return None if m is None or not path else (m, ctx.prefix + path)


def views_a_shape(args, kwargs) -> bool:
    """Whether ``Tensor.view(*args, **kwargs)`` asks for a shape (not a dtype). At the
    fixed-point levels convolutions return channels-last maps (the layout their kernels read
    and write), of which a flattening ``x.view(n, -1)`` cannot be a view, so such calls run as
    ``reshape``: the same view wherever ``view`` succeeds, a copy in logical order where it
    would have raised."""
    return "dtype" not in kwargs and not any(isinstance(a, torch.dtype) for a in args[1:])


def _view_of_contiguous(view: fx.Node, graph: fx.Graph) -> None:
    """A view written in place (``h.view(n, -1).mul_(s)``) must alias its base, as a reshape's
    copy would not: the base is made contiguous (a copy of a channels-last map, then viewable)
    before the view, and the nodes from the view on read that contiguous value, which the
    write changes."""
    base = view.args[0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_before(view):
        dense = graph.call_method("contiguous", (base,))
    base.replace_all_uses_with(dense, delete_user_cb=lambda u: u is not dense and order.get(u, -1) >= order[view])


def _is_module(types):
    return lambda node, ctx: isinstance(_module(node, ctx), types)


RULES: list[Rule] = [
    Rule("conv/linear module", _is_module((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)), _rewrite_module_layer),
    Rule("transposed conv module", _is_module(TRANSPOSED_CONVS), _rewrite_conv_transpose),
    Rule("multihead attention", _is_module(nn.MultiheadAttention), _rewrite_mha),
    Rule("function", lambda n, c: n.op == "call_function" and n.target in FUNCTION_RULES, _rewrite_function),
    Rule("method", lambda n, c: n.op == "call_method" and n.target in METHOD_RULES, _rewrite_function),
    Rule("kept FP32", _is_module(tuple(FP32_MODULES)), _record_fp32),
    Rule("wrapped function", _is_wrapped_function, _rewrite_wrapped_function),
]


def insert_quant_nodes(graph: fx.Graph, ctx: RewriteContext) -> fx.Graph:
    """Apply the first matching rule to every node; modules the filter rejects stay FP32."""
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target == "view" and views_a_shape(node.args, node.kwargs):
            if written_in_place(node, ctx.modules):
                _view_of_contiguous(node, ctx.graph)
            else:
                node.target = "reshape"
            continue
        if node.op == "call_module" and node.target in ctx.leaves:
            continue
        m = _module(node, ctx)
        if m is not None and not ctx.keep(m, ctx.prefix + node.target):
            ctx.state.keep_fp32(ctx.prefix + node.target, type(m).__name__, "excluded by module_filter_fn")
            continue
        owner = _owner(node, ctx)
        if m is None and owner is not None and not ctx.keep(*owner) and node.op != "get_attr":
            if node.target in FUNCTION_RULES or node.target in METHOD_RULES:
                ctx.state.keep_fp32(f"{ctx.prefix}{node.name}", str(node.target), "excluded by module_filter_fn")
            continue
        apply_first_rule(node, ctx, RULES)
    return graph


def apply_first_rule(node: fx.Node, ctx: RewriteContext, rules: list[Rule]) -> None:
    """Rewrite ``node`` with the first rule of ``rules`` that matches it, if any."""
    rule = next((r for r in rules if r.matches(node, ctx)), None)
    if rule is not None:
        rule.rewrite(node, ctx)
