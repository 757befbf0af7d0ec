"""The FX pass on hand-made modules (SPEC sections 2 and 4).

Oracles: the unprepared model (bit-identical at "fp32"), a straight-through fake-quantised
re-implementation (gradients), and a count of the products the original model runs.
"""
import copy
from collections import namedtuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import muppet_fx
from muppet_fx import MuppetConfig, fake_quantise, prepare

from .helpers import _flat, count_products

Pair = namedtuple("Pair", "a b")


class FunctionalNet(nn.Module):
    """Bare parameters used through F.conv2d / F.linear, a layer reused twice, tuple output."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.b = nn.Parameter(torch.zeros(4))
        self.fc = nn.Linear(16, 16)
        self.head = nn.Parameter(torch.randn(5, 16) * 0.2)

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w, self.b, padding=1))
        y = F.adaptive_avg_pool2d(y, 2).flatten(1)
        y = self.fc(self.fc(y))  # reused
        return F.linear(y, self.head), y.mean()


class HandAttention(nn.Module):
    """Attention written with @, bmm and softmax; dict output."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, dim=-1)
        return {"out": torch.bmm(att, v), "scores": att}


class DataDependent(nn.Module):
    """A submodule with Python control flow on tensor values, plus a direct matmul."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)

    def forward(self, x):
        if x.sum() > 0:
            x = self.a(x)
        return torch.matmul(x, self.w)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(6, 6)
        self.dd = DataDependent()
        self.rnn = nn.LSTM(6, 6, batch_first=True)
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x):
        y = self.dd(self.pre(x))
        y, _ = self.rnn(y)
        y, w = self.mha(y, y, y)
        return Pair(y, w)


class Gate(nn.Module):
    """Data-dependent control flow around a transposed convolution (runs intercepted)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)

    def forward(self, x):
        return self.up(x) if x.mean() > -1 else x


class Upsampler(nn.Module):
    """Transposed convolutions: a module called with ``output_size``, F.conv_transpose2d on a
    bare parameter, one inside untraceable code, a 1-d one."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)
        self.w = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.gate = Gate()
        self.up1d = nn.ConvTranspose1d(2, 3, 4, stride=2, padding=1)

    def forward(self, x):
        y = self.up(torch.relu(self.down(x)), output_size=x.shape[2:])
        y = F.conv_transpose2d(torch.relu(y), self.w, stride=1, padding=1, groups=2)
        y = self.gate(y)
        return self.up1d(y.flatten(2)[:, :2])


def _inputs(model):
    return {FunctionalNet: (torch.randn(2, 3, 8, 8),), HandAttention: (torch.randn(2, 5, 8),),
            Outer: (torch.randn(3, 4, 6).abs(),), Upsampler: (torch.randn(2, 3, 9, 9),)}[type(model)]


MODELS = [FunctionalNet, HandAttention, Outer, Upsampler]


@pytest.mark.parametrize("cls", MODELS)
def test_fp32_level_bit_identical(cls):
    """Oracle: the unprepared model, exactly."""
    model = cls().eval()
    x = _inputs(model)
    pm = prepare(model)
    pm.set_precision("fp32")
    ref, out = model(*x), pm(*x)
    assert type(out) is type(ref)
    assert all(torch.equal(a, b) for a, b in zip(_flat(ref), _flat(out)))


@pytest.mark.parametrize("cls", MODELS)
def test_every_product_is_quantised_and_trains(cls):
    """Sites executed == products the original runs; 8-bit step gives finite grads everywhere."""
    model = cls()
    x = _inputs(model)
    expected = count_products(model, x)
    pm = prepare(model)
    out = pm(*x)
    assert sum(s.calls for s in pm._muppet_state.sites.values()) == expected
    loss = sum(t.float().sum() for t in _flat(out))
    loss.backward()
    ref_grads = {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in ref_grads:
            assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("fast, avx2", [(True, True), (False, False), (False, True)])
def test_summary_says_why_a_cpu_without_int8_dot_products_gains_no_speed(fast, avx2, monkeypatch):
    from muppet_fx.kernels import gemm_avx2, gemm_cpu

    monkeypatch.setattr(gemm_cpu, "fast_int8", lambda: fast)
    monkeypatch.setattr(gemm_avx2, "available", lambda: avx2)
    pm = prepare(nn.Sequential(nn.Linear(4, 3)), ladder=(8, "fp32"), backend="aten")
    remark = "no int8 dot-product instructions"
    assert (remark in pm.summary()) == (not fast)
    assert ("FP32 on the dequantised operands" in pm.summary()) == (not fast)
    assert ("8-bit products run on the AVX2 integer kernel" in pm.summary()) == (avx2 and not fast)
    exact = prepare(nn.Sequential(nn.Linear(4, 3)), ladder=(8, "fp32"), backend="aten", exact=True)
    assert ("as floats (exact)" in exact.summary()) == (not fast)
    assert remark not in prepare(nn.Sequential(nn.Linear(4, 3)), backend="emulate").summary()


def test_recurrent_and_opaque_are_reported():
    pm = prepare(Outer())
    pm(*_inputs(Outer()))
    table = pm.summary()
    assert "recurrent layers stay FP32" in table and "rnn" in table
    assert "dd" in pm._muppet_state.opaque  # data-dependent submodule runs intercepted
    names = set(pm._muppet_state.sites)
    assert {"pre", "dd.a", "dd:matmul#0", "mha.in_proj", "mha.qk", "mha.av", "mha.out_proj"} <= names


class Nested(nn.Module):
    """Data-dependent code (runs intercepted) around ``inner``, with a product of its own."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.inner(torch.matmul(x, self.w))


def test_each_intercept_mode_sees_only_its_own_modules_code(monkeypatch):
    """An intercepted module's mode handles the torch calls of its own code only: neither a
    nested prepared module's calls nor the quantised ops' internals pass through it."""
    from muppet_fx.intercept import InterceptMode

    seen = []
    handler = InterceptMode.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append((self.owner, self.owner._muppet_state.stack[-1], getattr(func, "__name__", "")))
        return handler(self, func, types, args, kwargs)

    monkeypatch.setattr(InterceptMode, "__torch_function__", spy)
    torch.manual_seed(0)
    model = Nested(Nested(nn.Sequential(nn.Linear(6, 6), nn.ReLU())))
    pm = prepare(model, ladder=(16, "fp32"))
    x = torch.randn(3, 6).abs()
    out = pm(x)
    assert set(pm._muppet_state.opaque) == {"Nested", "inner"}
    assert {":matmul#0", "inner:matmul#0", "inner.inner.0"} <= set(pm._muppet_state.sites)
    assert seen and all(owner is running for owner, running, _ in seen)
    assert not {"data_ptr", "numel", "empty_like"} & {name for *_, name in seen}
    assert (out - model(x)).norm() <= 1e-3 * model(x).norm()


def test_parameters_are_shared_objects_and_model_untouched():
    model = Outer()
    before = type(model.dd), dict(model.named_modules())
    pm = prepare(model)
    assert [id(p) for p in pm.parameters()] == [id(p) for p in model.parameters()]
    assert list(pm.state_dict()) == list(model.state_dict())
    assert type(model.dd) is before[0] and dict(model.named_modules()) == before[1]
    assert isinstance(pm, Outer)


def _ste(x, bits):
    """Straight-through nearest fake-quantiser."""
    return x + (fake_quantise(x.detach(), bits, "nearest", backend="reference") - x).detach()


class _GradQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits):
        ctx.bits = bits
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return fake_quantise(g, ctx.bits, "nearest", backend="reference"), None


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_gradients_match_straight_through_oracle(bits):
    """Oracle: autograd through STE quantisers of x, w and the output, and a gradient quantiser
    in front of the product, i.e. the analytic gradient of the quantised forward."""
    torch.manual_seed(1)
    lin = nn.Linear(7, 5)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(3, 7, requires_grad=True)
    xi = torch.randn(2, 2, 5, 5, requires_grad=True)
    r1, r2 = torch.randn(3, 5), torch.randn(2, 3, 5, 5)

    def oracle_linear(x):
        y = F.linear(_ste(x, bits), _ste(lin.weight, bits), lin.bias)
        return _ste(_GradQ.apply(y, bits), bits)

    def oracle_conv(x):
        y = F.conv2d(_ste(x, bits), _ste(conv.weight, bits), conv.bias, padding=1)
        return _ste(_GradQ.apply(y, bits), bits)

    for module, inp, r, oracle in ((lin, x, r1, oracle_linear), (conv, xi, r2, oracle_conv)):
        params = [inp, *module.parameters()]
        want = torch.autograd.grad((oracle(inp) * r).sum(), params)
        pm = prepare(module, ladder=(bits, "fp32"), rounding="nearest", grad_rounding="nearest")
        out = pm(inp)
        assert torch.equal(out, oracle(inp).detach())
        got = torch.autograd.grad((out * r).sum(), params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_saved_for_backward_is_low_precision():
    """What backward keeps is int8 mantissas and exponents, not FP32 copies."""
    lin = nn.Linear(64, 64)
    pm = prepare(lin)
    x = torch.randn(32, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pm(x)
    big = [t for t in saved if t.numel() >= 64 * 32]
    assert big and all(t.dtype == torch.int8 for t in big), [t.dtype for t in saved]


def test_backward_allocates_no_gradients_for_the_mantissa_outputs():
    """The layer ops also return their operands' mantissas and exponents (saved for backward),
    which never receive a gradient: autograd must not build zero tensors of their shapes (it
    did, one per output and layer, until the ops turned off materialised gradients)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    made = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.new_zeros, torch.ops.aten.zeros_like):
                made.append(func)
            return func(*args, **(kwargs or {}))

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    pm = prepare(net, ladder=(8, "fp32"))
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    a, b = torch.randn(3, 5, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    mm = prepare(_MatMul(), ladder=(8, "fp32"))
    loss = pm(x).sum() + mm(a, b).sum()
    with Watch():
        loss.backward()
    assert made == []
    assert x.grad is not None and a.grad is not None and net[0].weight.grad is not None


class _MatMul(nn.Module):
    def forward(self, a, b):
        return a @ b


def test_set_precision_and_errors():
    pm = prepare(nn.Linear(3, 3), ladder=(8, 12, "fp32"))
    assert pm.precision == 8
    pm.set_precision(12)
    assert pm.precision == 12 and pm._muppet_state.fwd_bits == 12
    with pytest.raises(ValueError, match=r"16.*\(8, 12, 'fp32'\)"):
        pm.set_precision(16)
    with pytest.raises(TypeError, match="nn.Module"):
        prepare(lambda x: x)
    with pytest.raises(ValueError, match="unknown config option.*'bitz'"):
        prepare(nn.Linear(3, 3), bitz=3)
    with pytest.raises(ValueError, match="backend='fast'.*valid choices"):
        prepare(nn.Linear(3, 3), backend="fast")
    with pytest.raises(ValueError, match="ladder entry 40"):
        MuppetConfig(ladder=(8, 40))
    with pytest.raises(ValueError, match="'fp32' may only come last"):
        MuppetConfig(ladder=("fp32", 8))
    with pytest.raises(TypeError, match="already prepared"):
        prepare(pm)


def test_deepcopy_state_dict_and_to():
    torch.manual_seed(0)
    model = FunctionalNet()
    pm = prepare(model, rounding="nearest")
    x = torch.randn(2, 3, 8, 8)
    clone = copy.deepcopy(pm)
    assert all(a is not b for a, b in zip(clone.parameters(), pm.parameters()))
    assert torch.equal(clone(x)[0], pm(x)[0])
    clone.set_precision(12)
    assert pm.precision == 8  # independent state
    sd = pm.state_dict()
    other = prepare(FunctionalNet(), rounding="nearest")
    other.load_state_dict(sd)
    assert torch.equal(other(x)[0], pm(x)[0])
    moved = pm.to(torch.device("cpu"))
    assert torch.equal(moved(x)[0], pm(x)[0])


def test_module_filter_keeps_fp32():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    pm = prepare(net, module_filter_fn=lambda m, fqn: fqn != "2")
    pm(torch.randn(3, 4))
    assert set(pm._muppet_state.sites) == {"0"}
    assert "excluded by module_filter_fn" in pm.summary()


def test_torch_compile_matches_eager():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    pm = prepare(net, rounding="nearest", grad_rounding="nearest")
    x = torch.randn(2, 3, 8, 8)
    eager = pm(x)
    compiled = torch.compile(pm, backend="aot_eager")
    out = compiled(x)
    assert torch.equal(out, eager)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


class ConvThenFunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.w = nn.Parameter(torch.randn(3, 4 * 6 * 6))

    def forward(self, x):
        return F.linear(F.relu(self.conv(x)).flatten(1), self.w)


class Transformer(nn.Module):
    """An encoder layer (its fast path is untraceable: its children run as prepared modules,
    each keyed on its scalar settings such as a dropout's ``p``), then a decoder layer:
    self-attention, and cross-attention on a memory of another length."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.memory = nn.Parameter(torch.randn(2, 7, 16))

    def forward(self, x):
        return self.decoder(self.encoder(x.reshape(2, -1, 16)), self.memory)


@pytest.mark.parametrize("make, n_weights", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), 2),
    (ConvThenFunctionalLinear, 2),
    (Transformer, 10),  # linear1, linear2, in_proj and out_proj (x2); cross-attention's packed and out_proj
])
def test_torch_compile_compiles_once_per_level(make, n_weights):
    """Steps at one level reuse the compiled graph (no per-call Python state in the guards),
    from the first call on: the pass creates every site and gives it its weight, and the
    modules' scalar settings are read in code Dynamo traces. A precision switch compiles the
    new level once."""
    torch.manual_seed(0)
    net = make()
    pm = prepare(net, ladder=(8, 12, "fp32"))
    sites = dict(pm._muppet_state.sites)
    weights = [s.weight for s in sites.values() if s.weight is not None]
    assert len(weights) == n_weights and all(any(w is p for p in net.parameters()) for w in weights)
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(pm, backend=counting_backend)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(4):
        compiled(x).sum().backward()
    assert len(compiles) == 1, compiles
    assert pm._muppet_state.sites == sites and all(s.x_exp is not None for s in sites.values())
    pm.set_precision(12)
    for _ in range(3):
        compiled(x).sum().backward()
    assert len(compiles) == 2, compiles


def test_example_inputs_registers_intercepted_layers():
    pm = prepare(Outer(), example_inputs=(torch.randn(2, 4, 6).abs(),))
    assert "dd:matmul#0" in pm._muppet_state.sites


def test_example_inputs_leave_buffers_and_random_state_alone():
    """The example pass (training mode, stochastic rounding, dropout) runs on a forked random
    stream and its batch-norm statistics are undone: the caller's next draws and the running
    statistics are those of a model prepared without it."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(0)
    prepare(net, example_inputs=(torch.randn(2, 3, 8, 8),))
    after_draw = torch.rand(3)
    torch.manual_seed(0)
    torch.randn(2, 3, 8, 8)  # the example input itself was drawn from the stream
    assert torch.equal(after_draw, torch.rand(3))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_public_surface():
    assert set(muppet_fx.__all__) >= {"prepare", "quantise", "fake_quantise", "QTensor", "MuppetConfig"}


class EinsumNet(nn.Module):
    def __init__(self, equation):
        super().__init__()
        self.equation = equation

    def forward(self, a, b):
        return torch.einsum(self.equation, a, b)


class BmmNet(nn.Module):
    def forward(self, a, b):
        return torch.bmm(a, b)


def test_einsum_equals_bmm_route():
    """Oracle: the bmm route (same quantisers, same product): forward and both gradients equal."""
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    results = []
    for net in (EinsumNet("b i j, b j k -> b i k"), BmmNet()):
        pm = prepare(net, rounding="nearest", grad_rounding="nearest")
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = pm(x, y)
        out.backward(torch.ones_like(out))
        results.append((out, x.grad, y.grad))
    for u, v in zip(*results):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
    pm = prepare(EinsumNet("ii,i->i"))
    pm(torch.randn(3, 3), torch.randn(3))
    assert "is not routed" in pm.summary()


class AddmmNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) * 0.3)
        self.bias = nn.Parameter(torch.randn(4) * 0.1)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x, *, scale=1.0):
        y = torch.addmm(self.bias, x, self.w, beta=0.5, alpha=scale)
        y = self.bn(torch.mm(y, self.w.t()))
        z = torch.baddbmm(y.unsqueeze(0), y.unsqueeze(0), self.w.unsqueeze(0)).squeeze(0)
        return Result(logits=z, aux=y.mm(self.w))


from dataclasses import dataclass  # noqa: E402


@dataclass
class Result:
    logits: torch.Tensor
    aux: torch.Tensor


def test_addmm_family_kwargs_dataclass_and_shared_buffers():
    """addmm/mm/baddbmm/Tensor.mm are quantised; keyword arguments and dataclass outputs pass
    through; BN running statistics are the original buffers (updated in place)."""
    model = AddmmNet()
    x = torch.randn(5, 4)
    n = count_products(model, (x,))
    pm = prepare(model, rounding="nearest")
    before = model.bn.running_mean.clone()
    out = pm(x, scale=2.0)
    assert isinstance(out, Result)
    assert sum(s.calls for s in pm._muppet_state.sites.values()) == n == 4
    assert not torch.equal(model.bn.running_mean, before)
    assert pm.bn.running_mean is model.bn.running_mean
    pm.set_precision("fp32")
    model.eval(), pm.eval()
    ref = model(x, scale=2.0)
    got = pm(x, scale=2.0)
    assert torch.equal(ref.logits, got.logits) and torch.equal(ref.aux, got.aux)
