"""Custom ops whose eager calls skip the dispatcher.

The quantised products are ``torch.library`` custom ops so that ``torch.compile`` and export see
them as opaque nodes with fake implementations. Called eagerly, each one still goes through the
custom-op machinery (argument normalisation, alias checks, the autograd wrapper), which measured
about 0.24 ms per layer for a forward and backward on a 2-core CPU: 5 ms of a ResNet-20 training
step. :func:`call` runs the op's Python body directly where nothing needs the op itself, through
a ``torch.autograd.Function`` with the op's own autograd formula when gradients are wanted; the
results are the same tensors the op would return (same code), so eager and compiled runs agree.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["custom_op", "register_autograd", "call", "transformed"]

_BODY: dict = {}   # op -> the decorated Python function
_EAGER: dict = {}  # op -> autograd.Function running that function


def custom_op(name: str):
    """``torch.library.custom_op(name, mutates_args=())`` that keeps the decorated body for :func:`call`."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _BODY[op] = fn
        return op
    return wrap


def register_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd(backward, setup_context=...)``, and the same formula for eager calls."""
    op.register_autograd(backward, setup_context=setup_context)
    body = _BODY[op]

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = body(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            if torch.is_grad_enabled():  # create_graph=True: these formulas are not differentiable
                raise NotImplementedError(
                    f"a second derivative (backward with create_graph=True, e.g. a gradient penalty) "
                    f"through the quantised op {body.__name__.lstrip('_')!r} is not supported at the "
                    "fixed-point levels; compute such terms at the 'fp32' level")
            return backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"{body.__name__.lstrip('_')}_eager"
    _EAGER[op] = Eager


_functorch = getattr(torch._C, "_functorch", None)
_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", lambda t: False)
_grad_tracking = getattr(_functorch, "is_gradtrackingtensor", lambda t: False)


def transformed(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper (inside ``grad``, ``vmap``, ``jacrev``, ...)."""
    return _wrapped(t)


def _plain(t: Tensor) -> bool:
    """A real tensor the body can compute on (not fake, meta or a ``torch.func`` wrapper)."""
    return type(t) in (Tensor, torch.nn.Parameter) and t.device.type in ("cpu", "cuda") and not _wrapped(t)


_OTHER_FLOATS = (torch.float64, torch.float16, torch.bfloat16)


def call(op, *args):
    """``op(*args)``; eagerly, on real tensors, the op's body without the dispatcher.

    The bodies compute in float32 whatever the floating types of the operands (a float64 or
    half model, or activations that autocast made bfloat16: converting 16-bit floats is exact,
    and the fixed-point grid is coarser than float32 in any case), and with autocast off: the
    level's word length sets the products' precision, which autocast would otherwise lower to
    bfloat16 on the FP32 routes. Callers return results in the input's type."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if any(t.dtype in _OTHER_FLOATS for t in tensors):
        args = tuple(a.float() if isinstance(a, Tensor) and a.dtype in _OTHER_FLOATS else a for a in args)
        tensors = [a for a in args if isinstance(a, Tensor)]
    device = tensors[0].device.type if tensors else "cpu"
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return _call(op, args, tensors)
    return _call(op, args, tensors)


def _call(op, args, tensors):
    if torch.compiler.is_compiling():
        return op(*args)
    if not all(_plain(t) for t in tensors):
        if any(_grad_tracking(t) for t in tensors):
            name = _BODY[op].__name__.lstrip("_") if op in _BODY else str(op)
            raise NotImplementedError(
                f"torch.func transforms that differentiate (grad, vjp, jacrev, hessian) cannot run "
                f"through the quantised op {name!r}: PyTorch's custom ops do not "
                "support them. At the fixed-point levels take gradients with loss.backward() or "
                "torch.autograd.grad (per-sample gradients: a loop or hooks); at the 'fp32' level "
                "the model's own ops run and torch.func works")
        return op(*args)
    eager = _EAGER.get(op)
    if eager is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return eager.apply(*args)
    with torch.no_grad():  # as the op's body runs, below autograd
        return _BODY[op](*args)
