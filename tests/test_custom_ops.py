"""Eager calls of the quantised products run the custom ops' bodies without the dispatcher
(``muppet_fx.custom_ops.call``): the same values and gradients, bit for bit, as the ops
themselves; fake tensors and compiled graphs still get the ops."""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import profile

from muppet_fx import custom_ops, ops, prepare


class Mixed(nn.Module):
    """A convolution, a matmul, an einsum and a linear layer (with its output quantiser)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 6)
        self.proj = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        h = torch.matmul(self.fc(h), self.proj)
        return torch.einsum("bi,ij->bj", h, self.proj)


def _run(monkeypatch, through_op: bool, bits: int):
    if through_op:
        monkeypatch.setattr(ops, "call", lambda op, *args: op(*args))
    torch.manual_seed(0)
    pm = prepare(Mixed(), ladder=(bits, "fp32"))
    x = torch.randn(4, 3, 9, 11, requires_grad=True)
    with profile() as prof:
        out = pm(x)
        out.square().sum().backward()
    monkeypatch.undo()
    names = {e.name for e in prof.events()}
    return out, x.grad, [p.grad for p in pm.parameters()], names


def test_eager_calls_skip_the_dispatcher_and_match_the_ops(monkeypatch):
    for bits in (8, 12):
        out, gx, grads, names = _run(monkeypatch, False, bits)
        out_op, gx_op, grads_op, names_op = _run(monkeypatch, True, bits)
        assert "muppet_fx::conv" in names_op and "muppet_fx::conv_backward" in names_op
        assert not any(n.startswith("muppet_fx::") for n in names), sorted(n for n in names if "muppet" in n)
        assert torch.equal(out, out_op) and torch.equal(gx, gx_op)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_op))


def test_without_gradients_the_body_runs_alone():
    torch.manual_seed(0)
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    args = (x, w, None, 8, 8, "nearest", "nearest", None, True, "aten", False)
    with torch.no_grad():
        direct = custom_ops.call(ops._linear, *args)
    via_op = ops._linear(*args)
    assert all(torch.equal(a, b) for a, b in zip(direct, via_op))
    assert not any(t.requires_grad for t in direct)


def test_fake_and_meta_tensors_take_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
        y = custom_ops.call(ops._conv, x, w, None, [1, 1], [1, 1], [1, 1], 1, 8, 8, "stochastic", "stochastic",
                            None, True, "aten", False)[0]
    assert y.shape == (2, 4, 8, 8)
    x, w = torch.randn(2, 7, device="meta"), torch.randn(3, 7, device="meta")
    y = custom_ops.call(ops._linear, x, w, None, 8, 8, "nearest", "nearest", None, True, "aten", False)[0]
    assert y.shape == (2, 3) and y.device.type == "meta"


def test_torch_func_wrappers_take_the_op(monkeypatch):
    """Under ``torch.func`` transforms the inputs are wrapper tensors of plain type; the body's C
    kernels must never see them, so the op (and its dispatcher rules) gets the call."""
    seen = []
    real = ops._linear
    monkeypatch.setattr(custom_ops, "_BODY", {**custom_ops._BODY, real: lambda *a: seen.append(a)})
    monkeypatch.setattr(custom_ops, "_EAGER", {real: types.SimpleNamespace(apply=lambda *a: seen.append(a))})
    x, w = torch.randn(2, 7), torch.randn(3, 7)

    def f(x):
        try:
            custom_ops.call(real, x, w, None, 8, 8, "nearest", "nearest", None, True, "aten", False)
        except Exception:  # what the op does with a functorch wrapper is the op's business
            pass
        return x.sum()

    torch.func.grad(f)(x)
    assert not seen
