"""``torch.compile`` of a prepared model: the compiled graph calls the same batch-norm and ReLU
kernels as eager training (opaque custom ops), and its results are eager's bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from muppet_fx import compact, prepare
from muppet_fx.kernels import batch_norm_cpu, relu_cpu

from .test_compact import Net

needs_c = pytest.mark.skipif(batch_norm_cpu._library() is None or relu_cpu._library() is None,
                             reason="no C compiler: the batch-norm and ReLU kernels are not built")


class Block(nn.Module):
    """A stem and one residual block: conv-BN-ReLU joined, and the ReLU of a residual sum."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        a = F.relu(self.b0(self.c0(x)))
        h = F.relu(self.b1(self.c1(a)))
        h = F.relu(self.b2(self.c2(h)) + a)
        return self.fc(h.mean((2, 3)))


def _step(net, model, x):
    for p in model.parameters():
        p.grad = None
    out = net(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return [out.detach()] + [p.grad.clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]


def _prepared(make, bits):
    torch.manual_seed(0)
    model = make()
    return model, prepare(model, ladder=(bits, "fp32"), rounding="nearest", grad_rounding="nearest")


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)


@needs_c
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_compiled_training_step_is_bit_identical_to_eager(bits):
    """Inductor-compiled forward and backward against eager, nearest rounding: outputs, every
    gradient and the running statistics equal, over two steps (the second reads the first's
    running statistics and counters). Where the stock ops run instead (a batch norm after a sum),
    Inductor's own kernels round differently and the results are not bit-identical."""
    model, pm = _prepared(Block, bits)
    start = copy.deepcopy(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(pm)
    got = [_step(compiled, model, X) for _ in range(2)]
    model.load_state_dict(start)
    for step in got:
        for g, w in zip(step, _step(pm, model, X)):
            assert torch.equal(g, w), (g - w).abs().max()


@needs_c
def test_compiled_graph_calls_the_mantissa_kernels():
    """The graph dynamo captures holds one batch-norm op per batch norm after a quantised layer
    (ReLU joined where it is the only reader), one ReLU op per other ReLU the pass rewrote, and
    the stock batch norm only where its input is not a layer's output (``Net.b3``)."""
    _, pm = _prepared(Net, 8)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(pm, backend=capture)(X).sum().backward()
    calls = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert calls.count("muppet_fx.grid_batch_norm.default") == 3  # b1 (+r1), b2 (+relu), b4 (+relu)
    assert sum("batch_norm" in c and "grid" not in c for c in calls) == 1  # b3
    assert calls.count("muppet_fx.masked_relu.default") == 1  # relu of b3's output


@needs_c
def test_compiled_ops_leave_no_recorded_absmax():
    """The kernels record the absmax of what they write for the next quantiser; their compiled
    ops drop it, since Inductor may reuse a dead output's tensor for a later kernel's result
    and write it without bumping its version counter (the record would then be stale)."""
    m = torch.randint(-127, 128, (4, 8, 6, 6), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    s = torch.tensor(5, dtype=torch.int32)
    x = m.float() * 2.0 ** -5
    stats = torch.zeros(8), torch.ones(8)
    eager = compact._bn_forward(m, s, None, None, *stats, 0.1, 1e-5, True)[0]
    assert getattr(eager, "_muppet_absmax", None) is not None  # the kernel records
    y = torch.ops.muppet_fx.grid_batch_norm(x, m, s, None, None, *stats, 0.1, 1e-5, True)[0]
    assert torch.equal(y, eager) and getattr(y, "_muppet_absmax", None) is None
    r = torch.ops.muppet_fx.masked_relu(x, x)[0]
    assert torch.equal(r, F.relu(x + x)) and getattr(r, "_muppet_absmax", None) is None
    g = torch.ops.muppet_fx.grid_batch_norm_backward(torch.randn(x.shape).contiguous(
        memory_format=torch.channels_last), m, s, None, *_stats(x), torch.empty(0, dtype=torch.uint8),
        1e-5, True, False, False)[0]
    assert g.shape == x.shape and getattr(g, "_muppet_absmax", None) is None


def _stats(x):
    mean = x.mean((0, 2, 3))
    return mean, (x.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()


@needs_c
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bits", [8, 16])
def test_batch_norm_op_passes_opcheck(bits, relu):
    """Schema, fake tensors (shapes and strides) and the autograd registration of the compiled
    path's batch-norm op agree with its implementation."""
    dtype = torch.int8 if bits == 8 else torch.int16
    top = 2 ** (bits - 1) - 1
    m = torch.randint(-top, top + 1, (4, 8, 6, 6), dtype=dtype).contiguous(memory_format=torch.channels_last)
    s = torch.tensor(bits, dtype=torch.int32)
    x = (m.float() * 2.0 ** -bits).requires_grad_()
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    torch.library.opcheck(torch.ops.muppet_fx.grid_batch_norm.default,
                          (x, m, s, w, b, torch.zeros(8), torch.ones(8), 0.1, 1e-5, relu))


@needs_c
@pytest.mark.parametrize("two", [True, False])
def test_relu_op_passes_opcheck(two):
    a = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_() if two else None
    torch.library.opcheck(torch.ops.muppet_fx.masked_relu.default, (a, b))
