"""Compact saved activations (``muppet_fx.compact``, ``passes/compact_saved``).

Oracles: the same prepared model with ``compact_activations=False`` (stock batch norm and ReLU):
outputs, parameter gradients and buffers bit-identical under stochastic rounding with the same
seeds when the batch norm's backward dequantises and runs ATen's, gradients within float32
rounding with the C kernel that reads the mantissas (``tests/test_batch_norm_cpu.py`` checks
that kernel against float64); the stock ops' own gradients, bit for bit (sign of zero included), for the masked ReLU on
NaN, infinities and negative zeros; and the bytes autograd saves for backward, counted by a
saved-tensor hook, at most half of FP32's at 8 bits.
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from muppet_fx import MuppetConfig, compact, ops, prepare
from muppet_fx.compact import compact_batch_norm, compact_relu
from muppet_fx.kernels import batch_norm_cpu, batch_norm_triton
from muppet_fx.kernels.relu_cpu import relu_mask_backward, relu_with_mask


class Net(nn.Module):
    """Every pattern the pass handles, and two it must leave alone."""

    def __init__(self, momentum=0.1):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8, momentum=momentum)
        self.r1 = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.b3 = nn.BatchNorm2d(8)  # after an add: not a quantised layer's output
        self.fc = nn.Linear(8 * 4 * 4, 6)
        self.b4 = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.r1(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(x)))
        z = self.b3(y + 1.0).relu()
        w = z * 2.0
        torch.relu_(w)  # in place, its input read again below: not rewritten
        z = w + z
        return torch.relu(self.b4(self.fc(z.flatten(1))))


def _run(bits, compact, momentum=0.1, channels_last=True, backend="auto", net=None):
    torch.manual_seed(0)
    net = Net(momentum) if net is None else net
    pm = prepare(net, ladder=(bits, "fp32"), compact_activations=compact, backend=backend)
    x = torch.randn(4, 3, 8, 8)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    torch.manual_seed(1)
    out = pm(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return pm, [out.detach(), x.grad] + [p.grad for p in net.parameters()] + list(net.buffers())


@pytest.fixture
def aten_batch_norm_backward(monkeypatch):
    """The compact batch norm on ATen (its backward on the dequantised input), not the C or
    Triton kernels."""
    monkeypatch.setattr(batch_norm_cpu, "_library", lambda: None)
    for name in ("batch_norm_forward", "batch_norm_backward"):
        monkeypatch.setattr(batch_norm_triton, name, lambda *a, **k: None)


@pytest.mark.parametrize("bits", [4, 8, 12, 16])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_values_and_gradients_are_bit_identical(bits, momentum, aten_batch_norm_backward):
    _, stock = _run(bits, False, momentum)
    pm, compact = _run(bits, True, momentum)
    assert len(stock) == len(compact)
    for a, b in zip(stock, compact):
        assert torch.equal(a, b)
    code = pm._muppet_graph.python_code("self").src
    assert code.count("compact_batch_norm") == 3  # b1, b2, b4; not b3 (input is an add)
    assert code.count(", True)") == 3  # r1, b2's and b4's ReLUs joined their batch norms
    assert code.count("compact_relu") == 1 and "relu_" in code  # b3's ReLU; the re-read in-place ReLU stays stock


def _kernel_against_stock(bits, name, mantissa_arg, monkeypatch):
    """The model with the C batch-norm kernel ``name`` against the stock ops: ``(got, want,
    n_out)``, after checking that the kernel ran for each compact batch norm (its mantissa
    argument ``mantissa_arg`` of the level's dtype); ``n_out``: where the buffers start."""
    calls = []
    kernel = getattr(compact, name)
    monkeypatch.setattr(compact, name, lambda *a: calls.append(a[mantissa_arg].dtype) or kernel(*a))
    pm, got = _run(bits, True)
    monkeypatch.setattr(batch_norm_cpu, "_library", lambda: None)
    _, want = _run(bits, False)
    assert calls == [torch.int8 if bits == 8 else torch.int16] * 3
    return got, want, 2 + len(list(pm.parameters()))


@pytest.mark.parametrize("bits", [8, 16])
def test_batch_norm_kernel_changes_gradients_by_float32_rounding_only(bits, monkeypatch):
    """With the C batch-norm backward (mantissas read directly; ATen's forward): outputs and
    buffers bit-identical, every gradient within 2e-6 of the largest gradient magnitude of its
    module (float32 rounding in other sums), and the kernel really ran for each compact batch
    norm. Per module, not per tensor: a batch norm's weight gradient sums ``g * x_hat`` terms
    as large as its bias gradient's ``g`` and may cancel to almost nothing (6e-5 on ``b2``)."""
    monkeypatch.setattr(compact, "batch_norm_forward", lambda *a: None)
    got, want, n_out = _kernel_against_stock(bits, "batch_norm_backward", 1, monkeypatch)
    for a, b in zip(got[n_out:] + got[:1], want[n_out:] + want[:1]):
        assert torch.equal(a, b)
    modules = ["input"] + [name.rpartition(".")[0] for name, _ in Net().named_parameters()]
    scale = {m: max(float(b.abs().max()) for n, b in zip(modules, want[1:n_out]) if n == m) for m in modules}
    for module, a, b in zip(modules, got[1:n_out], want[1:n_out]):
        assert (a - b).abs().max() <= 2e-6 * scale[module], module


@pytest.mark.parametrize("bits", [8, 16])
def test_batch_norm_forward_kernel_changes_values_by_float32_rounding(bits, monkeypatch):
    """With both C kernels (the default on the CPU): the forward kernel ran for each compact
    batch norm; its statistics are exact where ATen's float32 sums are not
    (``tests/test_batch_norm_cpu.py``), so outputs and running statistics move by float32
    rounding (within 1e-6 of their largest magnitude). Gradients may differ by a stochastic
    rounding decision that a last-bit change tipped: within two 8-bit steps of their largest
    magnitude (2**-6), where a wrong statistic would move them by far more."""
    got, want, n_out = _kernel_against_stock(bits, "batch_norm_forward", 0, monkeypatch)
    for a, b in zip(got[n_out:] + got[:1], want[n_out:] + want[:1]):
        assert a.dtype != torch.float32 and torch.equal(a, b) or (a - b).abs().max() <= 1e-6 * b.abs().max()
    for a, b in zip(got[1:n_out], want[1:n_out]):
        assert (a - b).abs().max() <= 2**-6 * b.abs().max()


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("kernels", [True, False])
def test_relu_joined_to_its_batch_norm_changes_nothing(bits, kernels, monkeypatch):
    """The batch norm with its ReLU in one op against the two ops, with the C kernels and with
    the ATen fallbacks: outputs, gradients and buffers bit-identical."""
    from muppet_fx.passes import compact_saved

    if not kernels:
        monkeypatch.setattr(batch_norm_cpu, "_library", lambda: None)
    pm, joined = _run(bits, True)
    assert pm._muppet_graph.python_code("self").src.count(", True)") == 3
    monkeypatch.setattr(compact_saved, "COMPACT_RULES", [r for r in compact_saved.COMPACT_RULES
                                                         if r.rewrite is not compact_saved._fuse_relu])
    pm, apart = _run(bits, True)
    assert pm._muppet_graph.python_code("self").src.count(", True)") == 0
    assert all(torch.equal(a, b) for a, b in zip(joined, apart))


@pytest.mark.parametrize("bits", [8, 12])
def test_recorded_absmax_changes_nothing(bits, monkeypatch):
    """The quantisers take the absmax that the ReLU and batch-norm kernels recorded instead of
    scanning: outputs, gradients and buffers bit-identical to scanning every time."""
    from muppet_fx.kernels import quantise_cpu

    hits = []
    take = quantise_cpu._absmax_bits

    def spy(lib, x, threads):
        known = getattr(x, "_muppet_absmax", None)
        hits.append(known is not None and known[0] == x._version)
        return take(lib, x, threads)
    monkeypatch.setattr(quantise_cpu, "_absmax_bits", spy)
    _, recorded = _run(bits, True)
    monkeypatch.setattr(quantise_cpu, "_absmax_bits", lambda lib, x, t: lib.absmax_bits(x.data_ptr(), x.numel(), t))
    _, scanned = _run(bits, True)
    assert sum(hits) >= 2  # c2's input (r1's output) forward, c1's output gradient (b1's backward)
    assert all(torch.equal(a, b) for a, b in zip(recorded, scanned))


class Residual(nn.Module):
    """Residual ends the pass joins (``relu(a + b)``, ``a += b; relu``) and two it must not."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.r = nn.ReLU(inplace=True)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)) + x)  # joined
        z = self.b2(self.c2(y))
        z += y  # joined: nothing else reads z
        z = self.r(z)
        s = z + y  # read twice: stays
        return F.relu(s) + s.sum()


def test_relu_of_a_residual_sum_is_one_op_and_changes_nothing(monkeypatch):
    from muppet_fx.passes import compact_saved

    def run():
        torch.manual_seed(0)
        net = Residual()
        pm = prepare(net, ladder=(8, "fp32"))
        x = torch.randn(3, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
        out = pm(x)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        code = pm._muppet_graph.python_code("self").src
        return code, [out.detach(), x.grad] + [p.grad for p in net.parameters()] + list(net.buffers())

    calls = []
    fused = compact.add_relu_with_mask
    monkeypatch.setattr(compact, "add_relu_with_mask", lambda a, b: calls.append(a.shape) or fused(a, b))
    code, joined = run()
    assert code.count("compact_add_relu") == 2 and len(calls) == 2 and "iadd" not in code
    monkeypatch.setattr(compact_saved, "COMPACT_RULES", [r for r in compact_saved.COMPACT_RULES
                                                         if r.rewrite is not compact_saved._fuse_add_relu])
    code, apart = run()
    assert "compact_add_relu" not in code
    assert all(torch.equal(a, b) for a, b in zip(joined, apart))


def test_add_relu_kernel_equals_relu_of_the_sum():
    a = torch.randn(3, 5, 7, 9)
    b = torch.randn(3, 5, 7, 9)
    a[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    b[0, 0, 0, :3] = torch.tensor([1.0, -1.0, -0.0])
    y, mask = compact.add_relu_with_mask(a, b)
    want_y, want_mask = relu_with_mask(a + b)
    assert torch.equal(y.view(torch.int32), want_y.view(torch.int32)) and torch.equal(mask, want_mask)
    assert compact.add_relu_with_mask(a, b.transpose(2, 3).contiguous().transpose(2, 3)) is None  # memory orders
    assert compact.add_relu_with_mask(a, b[:1]) is None  # broadcasting: the stock ops
    assert compact.add_relu_with_mask(a, b.double()) is None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="forces the CUDA code path onto CPU tensors: needs TRITON_INTERPRET=1")
def test_bit_identical_on_the_cuda_code_path(monkeypatch, aten_batch_norm_backward):
    """The triton route as on CUDA (Triton quantisers forced for CPU tensors), stochastic
    rounding: the batch norm's nearest re-quantisation draws no seed, so every later draw, and
    so every value and gradient, stays as with the stock ops."""
    from muppet_fx.kernels import quantise

    monkeypatch.setattr(quantise, "FORCE_TRITON_PATH", True)
    _, stock = _run(8, False, backend="triton")
    _, compact = _run(8, True, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(stock, compact))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="forces the CUDA code path onto CPU tensors: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits", [8, 12])
def test_cuda_code_path_batch_norms_run_on_the_mantissas(bits, monkeypatch):
    """On the CUDA code path the convolutions hand their mantissas over from the output
    quantiser's pass (no batch norm after a convolution quantises again), the Triton batch-norm
    kernels read them, and every value and gradient stays within float32 rounding of the stock
    ops' (their statistics are exact sums, ATen's are float32 ones)."""
    from muppet_fx.kernels import quantise

    monkeypatch.setattr(quantise, "FORCE_TRITON_PATH", True)
    _, stock = _run(bits, False, backend="triton")
    calls, requantised = [], []
    for name in ("batch_norm_forward", "batch_norm_backward"):
        real = getattr(batch_norm_triton, name)
        monkeypatch.setattr(batch_norm_triton, name,
                            lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))
    parts = ops.quantise_parts

    def spy(x, bits, rounding, *a, **k):
        if rounding == "nearest":  # a layer output quantised again for the batch norm after it
            requantised.append(x.dim())
        return parts(x, bits, rounding, *a, **k)
    monkeypatch.setattr(ops, "quantise_parts", spy)
    _, got = _run(bits, True, backend="triton")
    assert calls.count("batch_norm_forward") == 3 and calls.count("batch_norm_backward") == 3
    assert requantised == [2]  # the linear layer's output only: the GEMM hands over its values alone
    for a, b in zip(stock, got):
        assert a.dtype == b.dtype and a.shape == b.shape
        bound = 1e-5 * (b.abs().max() + 1) if b.is_floating_point() else 0
        assert (a.double() - b.double()).abs().max() <= bound, ((a - b).abs().max().item(), bound)


def test_nchw_inputs_and_24_bits_take_the_fallbacks(aten_batch_norm_backward):
    for bits, cl in ((8, False), (24, True)):
        _, stock = _run(bits, False, channels_last=cl)
        _, compact = _run(bits, True, channels_last=cl)
        assert all(torch.equal(a, b) for a, b in zip(stock, compact))


def _saved_bytes(model, x):
    seen = {}

    def pack(t):
        seen.setdefault((t.untyped_storage().data_ptr(), t.dtype), (t.untyped_storage().nbytes(), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return sum(n for n, _ in seen.values()), {d for _, d in seen.values()}


def test_saved_activations_at_8_bits_are_at_most_half_of_fp32():
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), *layers)
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    fp32, _ = _saved_bytes(net, x)
    stock, _ = _saved_bytes(prepare(net, ladder=(8, "fp32"), compact_activations=False), x)
    small, dtypes = _saved_bytes(prepare(net, ladder=(8, "fp32")), x)
    assert stock > 0.8 * fp32  # float32 batch-norm inputs and ReLU outputs dominate
    assert small <= 0.5 * fp32, (small / fp32)
    assert torch.int8 in dtypes and torch.uint8 in dtypes


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_layer_outputs_hand_their_mantissas_to_the_batch_norm(bits, monkeypatch):
    """The conv and linear output quantisers write the mantissas the batch norms after them
    keep, so no batch norm quantises its input again; the sites keep nothing afterwards."""
    requantised = []
    monkeypatch.setattr(compact, "quantise_parts", lambda *a, **k: requantised.append(a[0].shape))
    pm, _ = _run(bits, True)
    assert requantised == []
    sites = [s for s in vars(pm._muppet_sites).values() if hasattr(s, "feeds_batch_norm")]
    assert sorted(s.name for s in sites if s.feeds_batch_norm) == ["c1", "c2", "fc"]
    assert all(s.output_parts is None for s in sites)


def _handed_over(monkeypatch, bits=8, net=None):
    """(batch norm input, mantissas, exponent) of every compact batch norm in one step of _run."""
    saved = []
    forward = compact._GridBatchNorm.forward

    def spy(ctx, x, *args):
        y = forward(ctx, x, *args)
        saved.append((x.detach().clone(), *args[-2]))
        return y
    monkeypatch.setattr(compact._GridBatchNorm, "forward", staticmethod(spy))
    _run(bits, True, net=net)
    return saved


def test_handed_over_mantissas_are_the_output_rounded(monkeypatch):
    """What the batch norm saves and normalises: the output's own mantissas and exponent. A
    batch norm that is its layer's only reader reads nothing else, so the output quantiser
    writes the mantissas alone, and the float32 output keeps its unquantised values, each
    within one grid step of its mantissa's value."""
    saved = _handed_over(monkeypatch)
    assert len(saved) == 3
    for i, (x, m, s) in enumerate(saved):
        assert m.dtype == torch.int8 and m.shape == x.shape and m.stride() == x.stride()
        q = m.float() * 2.0 ** -int(s)
        assert (q - x).abs().max() < 2.0 ** -int(s)
        # c1's route quantises from its integer accumulator (both at once); c2's and fc's
        # outputs go through the separate quantiser
        assert torch.equal(q, x) == (i == 0)


class TwoReaders(Net):
    """c2's output is also read by a second layer: its values must be written."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(8, 8, 1, bias=False)

    def forward(self, x):
        x = self.r1(self.b1(self.c1(x)))
        h = self.c2(x)
        y = F.relu(self.b2(h)) + self.side(h)
        return torch.relu(self.b4(self.fc(y.flatten(1))))


def test_an_output_with_another_reader_is_quantised_in_full(monkeypatch):
    saved = _handed_over(monkeypatch, net=TwoReaders())
    assert len(saved) == 3
    x, m, s = saved[1]  # b2, reading c2 (also read by side)
    assert torch.equal(m.float() * 2.0 ** -int(s), x)
    x, m, s = saved[2]  # b4, fc's only reader
    assert not torch.equal(m.float() * 2.0 ** -int(s), x)


@pytest.mark.parametrize("frozen", [False, True])
def test_unwritten_values_change_no_result(frozen, monkeypatch):
    """Outputs, gradients and buffers equal those of the same run with every layer output
    quantised in full, bit for bit, with the batch norms training (they read the mantissas) and
    frozen in eval mode while the rest trains (they decline and normalise the mantissas'
    values, the gradient passing to the layer as it would through the quantised output)."""
    results, wants = [], ops._wants_output_parts
    for unread in (True, False):
        asked = []
        monkeypatch.setattr(ops, "_wants_output_parts",
                            lambda *a: asked.append(wants(*a)) or (asked[-1] if unread else min(asked[-1], 1)))
        torch.manual_seed(0)
        net = Net()
        pm = prepare(net, ladder=(8, "fp32"), compact_activations=True)
        if frozen:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
        torch.manual_seed(1)
        out = pm(x)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        results.append([out.detach(), x.grad] + [p.grad for p in net.parameters()] + list(net.buffers()))
        assert asked == [2, 2, 2]  # every layer's output had the batch norm as its only reader
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_handed_over_mantissas_dequantise_to_the_output_at_every_exponent(bits):
    """The batch norm takes the parts unchecked (so the compiled graph needs no data-dependent
    branch): at every exponent, subnormal outputs and values near float32's top included,
    dequantising them gives the layer's output bit for bit; an overflowing output stays
    non-finite."""
    from muppet_fx.ops import quant_conv
    from muppet_fx.routes import dequantise
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    exponents = set()
    for k in range(-190, 131, 5):
        net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        with torch.no_grad():
            net[0].weight.mul_(2.0 ** k)
        site = next(iter(prepare(net, ladder=(bits, "fp32"))._muppet_state.sites.values()))
        assert site.output_values_unread
        site.output_values_unread = False  # the output's values in full, as a second reader gets them
        y = quant_conv(site, x, net[0].weight, None, 1, 1, 1, 1).detach()
        _, m, s = site.output_parts
        exponents.add(int(s))
        if torch.isfinite(y).all():
            assert torch.equal(dequantise(m, s), y), (k, int(s))
        else:
            assert not torch.isfinite(dequantise(m, s)).all(), (k, int(s))
    assert min(exponents) < -100 and max(exponents) > 140  # both ends of float32's scale were reached


def test_no_mantissas_are_left_on_the_sites():
    """Without gradients none are written; with the batch norms in eval mode (stock batch
    norm) or at 24 bits they are released or never written."""
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 3, 8, 8)
    pm = prepare(net, ladder=(8, "fp32"))
    with torch.no_grad():
        pm(x)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    pm(x.requires_grad_()).sum().backward()
    pm24 = prepare(Net(), ladder=(24, "fp32"))
    pm24(x).sum().backward()
    for model in (pm, pm24):
        assert all(getattr(s, "output_parts", None) is None for s in vars(model._muppet_sites).values())


def test_eval_mode_and_no_grad_run_the_stock_ops():
    torch.manual_seed(0)
    net = Net()
    pm = prepare(net, ladder=(8, "fp32"))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.manual_seed(1)
        a = pm(x)
    pm.eval()
    torch.manual_seed(1)
    b = pm(x)
    torch.manual_seed(1)
    pm_stock = prepare(net, ladder=(8, "fp32"), compact_activations=False).eval()
    assert torch.equal(b, pm_stock(x)) and a.shape == b.shape


def test_masked_relu_matches_threshold_backward_bit_for_bit():
    """NaN, +-inf and -0.0 in the input and NaN in the gradient: same output and same gradient
    bits as ``torch.relu``'s autograd (C kernel and torch fallback alike)."""
    x = torch.tensor([1.5, -2.0, 0.0, -0.0, float("nan"), float("inf"), -float("inf"), 3e-45, -3e-45] * 9)
    g = torch.tensor([0.5, float("nan"), -1.0, 2.0, -3.0, 4.0, float("nan"), -0.0, 1.0] * 9)
    xs = x.clone().requires_grad_()
    want = torch.relu(xs)
    want.backward(g)
    holder = type("H", (), {})()
    holder.state = prepare(nn.Linear(2, 2), ladder=(8, "fp32"))._muppet_state
    for torch_only in (False, True):
        xc = x.clone().requires_grad_()
        if torch_only:  # a layout the C kernel declines
            xc = x.clone().reshape(9, 9).t().requires_grad_()
            got = compact_relu(holder, xc)
            got.backward(g.reshape(9, 9).t())
            got, grad = got.t().reshape(-1), xc.grad.t().reshape(-1)
        else:
            got = compact_relu(holder, xc)
            got.backward(g)
            grad = xc.grad
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert torch.equal(grad.view(torch.int32), xs.grad.view(torch.int32))


def test_relu_kernels_declines_what_they_do_not_cover():
    assert relu_with_mask(torch.randn(3, dtype=torch.float64)) is None
    y, m = relu_with_mask(torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    assert m.dtype == torch.uint8 and m.stride() == y.stride()
    assert relu_mask_backward(torch.randn(2, 3, 4, 5), m) is None  # other memory order


def test_batch_norm_outside_a_quantised_graph_runs_the_module():
    bn = nn.BatchNorm2d(3)
    site = prepare(nn.Conv2d(3, 3, 1), ladder=(8, "fp32"))._muppet_layer_site
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    torch.manual_seed(0)
    assert torch.equal(compact_batch_norm(site, x, nn.GroupNorm(1, 3)), nn.GroupNorm(1, 3)(x))
    assert compact_batch_norm(site, x, bn).shape == x.shape


def test_config_rejects_a_non_bool():
    with pytest.raises(TypeError, match="compact_activations must be True or False"):
        MuppetConfig(compact_activations="yes")


def test_relus_in_intercepted_code_save_byte_masks():
    """A ReLU in code FX cannot trace (an encoder layer's forward, run intercepted for its
    fast path) takes the masked ReLU, as in traced graphs: bit-identical outputs and gradients
    to the stock op under stochastic rounding, a byte mask saved in place of its float32
    output, and under ``torch.compile`` the same opaque op (no bool mask of Inductor's own,
    whose stores ran 20x slower than ATen's on an AVX-512 CPU)."""
    def run(compact, compiled=False):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        pm = prepare(layer, ladder=(8, "fp32"), compact_activations=compact)
        x = torch.randn(2, 5, 16, requires_grad=True)
        torch.manual_seed(1)
        if compiled:
            graphs = []
            torch._dynamo.reset()
            out = torch.compile(pm, backend=lambda gm, _: graphs.append(gm) or gm.forward)(x)
            out.sum().backward()
            return [x.grad] + [p.grad for p in layer.parameters()], [str(n.target) for g in graphs for n in g.graph.nodes]
        saved, dtypes = _saved_bytes(pm, x)
        return [x.grad] + [p.grad for p in layer.parameters()], saved, dtypes

    stock, stock_saved, stock_dtypes = run(False)
    grads, saved, dtypes = run(True)
    assert all(torch.equal(a, b) for a, b in zip(stock, grads))
    assert torch.uint8 in dtypes and torch.uint8 not in stock_dtypes
    assert stock_saved - saved >= 2 * 5 * 32 * 3  # the 2x5x32 float32 output became bytes
    compiled_grads, calls = run(True, compiled=True)
    assert all(torch.equal(a, b) for a, b in zip(stock, compiled_grads))
    if torch.__version__ >= "2.14":  # torch 2.11.0 compiled this layer to graphs holding none of its ops
        assert "muppet_fx.masked_relu.default" in calls and not any("relu" in c and "masked" not in c for c in calls)
