"""Quantising code that FX cannot see: untraceable module forwards and ``torch.fx.wrap``-ed
functions run under a ``TorchFunctionMode`` that routes their conv/linear/matmul calls to the
quantised wrappers, with one site per call (``<owner>:<op>#<k>``, k counting within one run),
and their ReLUs to the masked ReLU that traced graphs get from the memory pass."""
from __future__ import annotations

import torch
from torch._C import (_get_function_stack_at, _len_torch_function_stack, _pop_torch_function_stack,
                      _push_on_torch_function_stack)
from torch.overrides import TorchFunctionMode

from muppet_fx.attention import AttentionSites
from muppet_fx.compact import compact_relu
from muppet_fx.passes.quantise_layers import FUNCTION_RULES, views_a_shape

__all__ = ["InterceptMode", "InterceptScope", "run_intercepted", "OutsideIntercepts"]

_RELUS = (torch.nn.functional.relu, torch.relu, torch.Tensor.relu)
_METHOD_FUNCTIONS = {torch.Tensor.matmul: torch.matmul, torch.Tensor.__matmul__: torch.matmul,
                     torch.Tensor.mm: torch.mm, torch.Tensor.bmm: torch.bmm,
                     torch.Tensor.addmm: torch.addmm, torch.Tensor.baddbmm: torch.baddbmm}


class InterceptMode(TorchFunctionMode):
    """Intercepts only calls made while ``owner`` is the innermost running prepared module, so
    children (prepared on their own, or kept FP32 on purpose) are left alone."""

    def __init__(self, owner):
        super().__init__()
        self.owner, self.counts = owner, {}
        self.state = owner._muppet_state  # for compact_relu

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.owner._muppet_state
        rule = FUNCTION_RULES.get(_METHOD_FUNCTIONS.get(func, func))
        mine = bool(st.stack) and st.stack[-1] is self.owner
        if rule is None or not mine:
            if mine and func is torch.Tensor.view and views_a_shape(args, kwargs):
                func = torch.Tensor.reshape  # as in traced graphs (views_a_shape)
            elif mine and func in _RELUS and len(args) == 1 and not kwargs.get("inplace"):
                with OutsideIntercepts():  # as in traced graphs (the memory pass)
                    return compact_relu(self, *args)
            return func(*args, **kwargs)
        op, wrapper = rule
        k = self.counts[op] = self.counts.get(op, -1) + 1
        name = f"{self.owner._muppet_path}:{op}#{k}"
        site = AttentionSites(st, name + ".", "matmul") if op == "sdpa" else st.site(name, op)
        with OutsideIntercepts():
            return wrapper(site, *args, **kwargs)


class OutsideIntercepts:
    """Lifts the intercept modes on top of torch's function-mode stack for a block: the
    quantised ops' and prepared children's own tensor calls, which no enclosing intercepted
    module may take (their owner is not the innermost running module), would otherwise pass
    through each enclosing mode's Python handler (6450 calls per step of a 2-layer Llama, a
    third of its time at 16 tokens). A user's mode below ours stays, as do modes under
    torch.compile (nothing is lifted there)."""

    def __enter__(self):
        self.lifted = []
        if not torch.compiler.is_compiling():
            while _len_torch_function_stack() and isinstance(
                    _get_function_stack_at(_len_torch_function_stack() - 1), InterceptMode):
                self.lifted.append(_pop_torch_function_stack())

    def __exit__(self, *exc):
        for mode in reversed(self.lifted):
            _push_on_torch_function_stack(mode)


class InterceptScope:
    """Stands in for a module as the owner of one intercepted call site of function ``fn``."""

    def __init__(self, state, name: str, fn):
        self._muppet_state, self._muppet_path, self.name, self.fn = state, name, name, fn


def run_intercepted(scope: InterceptScope, *args, **kwargs):
    """Call ``scope.fn`` with its products quantised (FP32 level: a plain call)."""
    st, fn = scope._muppet_state, scope.fn
    if not st.quantised:
        return fn(*args, **kwargs)
    with InterceptMode(scope):
        st.stack.append(scope)
        try:
            return fn(*args, **kwargs)
        finally:
            st.stack.pop()
