"""Idioms of users' models and training code that the fixed-point levels must take as the
model itself does: ``.view`` after a convolution, empty batches, whole-model pickling, nested
preparation, other dtypes, autocast, fully masked attention rows, optimiser closures.

Oracles: the same model written with the equivalent call (``reshape`` for ``view``), the
unprepared model, or PyTorch's own behaviour (finite outputs, clear errors)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from muppet_fx import prepare

NEAREST = dict(rounding="nearest", grad_rounding="nearest")


class LeNet(nn.Module):
    def __init__(self, flatten="view", branch=False):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 16, 5), nn.Conv2d(16, 16, 5), nn.Linear(16 * 4 * 4, 10)
        self.flatten, self.branch = flatten, branch

    def forward(self, x):
        if self.branch and x.sum() > 1e9:  # data-dependent: its own code runs, intercepted
            x = x * 0
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.view(x.size(0), -1) if self.flatten == "view" else x.reshape(x.size(0), -1))


def _run(net, x, bits):
    pm = prepare(net, ladder=(bits, "fp32"), **NEAREST)
    xi = x.clone().requires_grad_()
    out = pm(xi)
    out.square().sum().backward()
    return out, xi.grad, [p.grad.clone() for p in net.parameters()]


def test_view_after_a_convolution_flattens_as_reshape_does():
    """At the fixed-point levels convolutions return channels-last maps; a LeNet-style
    ``x.view(n, -1)`` raised there. Traced and intercepted code both give reshape's result."""
    x = torch.randn(3, 1, 28, 28)
    for branch in (False, True):
        for bits in (8, 16):
            torch.manual_seed(0)
            got = _run(LeNet("view", branch), x, bits)
            torch.manual_seed(0)
            want = _run(LeNet("reshape", branch), x, bits)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))
    y = torch.randn(4, 6)  # a dtype view is left as it is
    assert prepare(_DtypeView())(y).dtype == torch.int32


class _DtypeView(nn.Module):
    def forward(self, y):
        return y.view(torch.int32)
