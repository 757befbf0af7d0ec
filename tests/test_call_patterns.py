"""Graphs per call pattern (``passes/trace.py``): arguments of ``forward`` that default to
``None`` or a bool steer its control flow, so each pattern of a call (which are ``None``, the
value of each bool, int or string) runs a graph traced for it.

Oracles: a twin module whose forward is one pattern's path written out, branches fixed as
attributes (same parameters, nearest rounding: outputs and gradients bit-identical); the
unprepared module at ``"fp32"``.
"""
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from muppet_fx import prepare
from muppet_fx.prepare import MAX_PATTERNS

NEAREST = dict(rounding="nearest", grad_rounding="nearest", ladder=(8, "fp32"))


class Block(nn.Module):
    """Optional tensors, a bool flag, a keyword-only argument that may be an int or a tensor."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.side = nn.Linear(8, 8)

    def forward(self, x, mask=None, extra=None, double: bool = False, *, shift=None):
        y = self.proj(x)
        if mask is not None:
            y = y.masked_fill(mask, 0.0)
        if extra is not None:
            y = y + self.side(extra)
        if double:
            y = y * 2
        if shift is not None:
            y = y + shift
        return self.proj(torch.relu(y))


class Path(nn.Module):
    """Block's forward for one pattern: the branches are attributes, the inputs required."""

    def __init__(self, block, mask, extra, double, shift):
        super().__init__()
        self.proj, self.side = block.proj, block.side
        self.has_mask, self.has_extra, self.double = mask is not None, extra is not None, double
        self.shift = shift if isinstance(shift, int) else None
        self.shift_tensor = isinstance(shift, torch.Tensor)

    def forward(self, x, mask, extra, shift):
        y = self.proj(x)
        if self.has_mask:
            y = y.masked_fill(mask, 0.0)
        if self.has_extra:
            y = y + self.side(extra)
        if self.double:
            y = y * 2
        if self.shift is not None:
            y = y + self.shift
        if self.shift_tensor:
            y = y + shift
        return self.proj(torch.relu(y))


_gen = torch.Generator().manual_seed(0)
X = torch.randn(4, 8, generator=_gen)
MASK = torch.rand(4, 8, generator=_gen) > 0.7
EXTRA = torch.randn(4, 8, generator=_gen)
SHIFT = torch.randn(8, generator=_gen)
PATTERNS = {  # name: (positional args after x, keyword args)
    "plain": ((), {}),
    "mask": ((MASK,), {}),
    "mask by keyword": ((), {"mask": MASK}),
    "extra, double": ((None, EXTRA, True), {}),
    "all tensors": ((MASK, EXTRA), {"double": True, "shift": SHIFT}),
    "int shift": ((), {"shift": 3}),
}


def _grads(model, out):
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _same(a, b):
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_each_call_pattern_runs_its_own_path(name):
    torch.manual_seed(0)
    block = Block()
    args, kwargs = PATTERNS[name]
    full = dict(zip(("mask", "extra", "double"), args)) | kwargs
    twin = Path(block, full.get("mask"), full.get("extra"), full.get("double", False), full.get("shift"))
    pm, pt = prepare(block, **NEAREST), prepare(twin, **NEAREST)
    twin_args = (X, full.get("mask"), full.get("extra"), full.get("shift"))

    out, ref = pm(X, *args, **kwargs), pt(*twin_args)
    assert torch.equal(out, ref)
    assert all(_same(a, b) for a, b in zip(_grads(block, out), _grads(block, ref)))
    pm.set_precision("fp32")
    assert torch.equal(pm(X, *args, **kwargs), block(X, *args, **kwargs))


def test_each_pattern_is_traced_once():
    torch.manual_seed(0)
    pm = prepare(Block(), **NEAREST)
    first = pm(X, MASK)
    assert len(pm._muppet_variants) == 2  # the prepared-time graph (tensors given) and this one
    assert torch.equal(pm(X, mask=MASK), first)  # positional or keyword: one pattern
    pm(X, shift=1)
    pm(X, shift=True)  # True == 1, but a bool and an int are different patterns
    pm(X, shift=1)
    assert len(pm._muppet_variants) == 4


class Gated(nn.Module):
    """Without ``extra``, forward branches on a tensor's value: that pattern has no graph."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, extra=None):
        y = self.proj(x)
        if extra is not None:
            return y + self.proj(extra)
        return y * 2 if x.sum() > 0 else self.proj(y)


def test_a_pattern_that_cannot_be_traced_runs_its_own_code_quantised():
    torch.manual_seed(0)
    model = Gated()
    pm = prepare(model, ladder=(16, "fp32"))  # its first graph: extra given
    for x in (X.abs(), -X.abs()):  # both branches of the data-dependent one
        out, ref = pm(x), model(x)
        assert not torch.equal(out, ref) and (out - ref).norm() <= 1e-3 * ref.norm()
    own_code = {name: s.calls for name, s in pm._muppet_state.sites.items() if ":linear#" in name}
    assert own_code == {":linear#0": 2, ":linear#1": 1}  # every product intercepted and quantised
    assert len(pm._muppet_variants) == 2
    assert "own code for calls with {'extra': None}" in pm.summary()


def test_patterns_beyond_the_limit_run_own_code():
    torch.manual_seed(0)
    model = Block()
    pm = prepare(model, ladder=(16, "fp32"))
    for k in range(MAX_PATTERNS + 3):  # an int that changes every call
        out = pm(X, shift=k)
        ref = model(X, shift=k)
        assert (out - ref).norm() <= 1e-3 * ref.norm(), k
    assert len(pm._muppet_variants) == MAX_PATTERNS


@dataclass
class Output(OrderedDict):
    """A model output in the style of many libraries: named fields, indexable by position."""
    logits: torch.Tensor = None
    hidden: torch.Tensor = None

    def __post_init__(self):
        for k, v in vars(self).items():
            if v is not None:
                self[k] = v

    def __getitem__(self, k):
        return list(self.values())[k] if isinstance(k, int) else super().__getitem__(k)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, return_dict: bool = True, output_hidden=None):
        h = torch.relu(self.body(x))
        logits = self.head(h)
        if not return_dict:
            return (logits, h) if output_hidden else (logits,)
        return Output(logits=logits, hidden=h if output_hidden else None)


def test_output_classes_and_flags():
    torch.manual_seed(0)
    model = Classifier()
    pm = prepare(model, ladder=(16, "fp32"))
    out = pm(X)
    assert type(out) is Output and list(out) == ["logits"] and out[0] is out.logits
    assert (out.logits - model(X).logits).norm() <= 1e-3 * model(X).logits.norm()
    assert type(pm(X, return_dict=False)) is tuple and len(pm(X, False, True)) == 2
    assert list(pm(X, output_hidden=True)) == ["logits", "hidden"]
    assert len(pm._muppet_variants) == 4
    assert not pm._muppet_state.opaque  # every pattern traced


class Noisy(nn.Module):
    """Code that reads ``training`` flags: its own (an auxiliary branch, functional dropout)
    and an inlined child's (a drop-path block, as torchvision's StochasticDepth)."""

    class DropPath(nn.Module):
        def forward(self, x):
            if not self.training:
                return x
            return x * (torch.rand(x.shape[0], 1) > 0.5) * 2.0

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
        self.drop = Noisy.DropPath()

    def forward(self, x):
        h = nn.functional.dropout(torch.relu(self.fc1(x)), 0.5, training=self.training)
        y = self.fc2(self.drop(h))
        if self.training:
            y = y * 2
        return y


@pytest.mark.parametrize("prepared_in", ["train", "eval"])
def test_training_flags_select_their_graph(prepared_in):
    """Whatever mode the model was prepared in, ``.eval()`` and ``.train()`` take effect at the
    fixed-point levels as in the model itself (the graph traced in one mode had baked the
    other's branches in)."""
    torch.manual_seed(0)
    net = Noisy().train(prepared_in == "train")
    pm = prepare(net, **NEAREST)
    x = torch.randn(64, 16)
    net.eval()
    pm.eval()
    want = net(x)
    for _ in range(2):  # the second call takes the cached graph
        assert torch.equal(pm(x), pm(x)) and torch.allclose(pm(x), want, rtol=0, atol=0.05)
    pm.train()
    out = pm(x)
    assert (out - want).norm() > 0.5 * want.norm()  # dropout, drop-path and the doubling run
    pm.eval()
    pm.drop.train()  # one child's flag alone: each row dropped (fc2's bias) or kept and doubled
    got = pm(x)
    with torch.no_grad():
        dropped = (got - net.fc2.bias).abs().amax(1) < 0.05
        kept = (got - net.fc2(2 * torch.relu(net.fc1(x)))).abs().amax(1) < 0.05
    assert (dropped | kept).all() and 0 < dropped.sum() < len(x)
    assert pm.training is False and net.training is False  # tracing in a mode leaves the flags alone
