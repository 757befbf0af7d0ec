"""15-16 bit convolutions as four int8 products of digit planes on AMX tiles
(``gemm_cpu.conv_digits_scaled`` and the weight gradient), against float64/int64 oracles.

Runs where the CPU has AMX tiles; elsewhere the AMX kernels decline (``test_amx_cpu``)."""
import pytest
import torch
import torch.nn.functional as F

from muppet_fx.kernels import amx_cpu, gemm_cpu, scaled_mm_cpu
from muppet_fx.routes import _fresh_int_conv

needs_amx = pytest.mark.skipif(not amx_cpu.available(), reason="CPU without AMX int8 tiles")
needs_c = pytest.mark.skipif(scaled_mm_cpu._library() is None, reason="no C compiler")

CASES = [  # (n, c, h, w, cout, kernel, stride, padding, dilation); output rows of 8+ positions
    (2, 16, 7, 9, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 32, 11, 17, 5, (3, 1), (2, 1), (0, 2), (1, 1)),
    (1, 16, 19, 19, 33, (3, 3), (2, 2), (1, 1), (2, 2)),
    (2, 48, 6, 8, 17, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 16, 13, 12, 1, (5, 5), (1, 1), (2, 2), (1, 1)),
    (1, 80, 5, 8, 7, (3, 3), (1, 1), (3, 3), (1, 1)),  # padding wider than the kernel reach
]


def _draw(gen, shape, lo, hi, dtype, channels_last=True):
    t = torch.randint(lo, hi, shape, generator=gen, dtype=dtype)
    t.view(-1)[:2] = torch.tensor([lo, hi - 1], dtype=dtype)  # both ends of the range
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@needs_amx
@pytest.mark.parametrize("case", CASES[:3])
def test_kernels_read_the_pad_value_outside_the_image(case):
    """``pad``: the value the input takes outside the image, as if it were padded with it."""
    n, c, h, w, cout, kernel, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(1)
    x, wt = _draw(gen, (n, c, h, w), -128, 128, torch.int8), _draw(gen, (cout, c, *kernel), -128, 128, torch.int8)
    padded = F.pad(x.double(), (padding[1], padding[1], padding[0], padding[0]), value=-128.0)
    want = F.conv2d(padded, wt.double(), None, stride, 0, dilation).long()
    got = amx_cpu.conv_forward(x, wt, stride, padding, dilation, reuse=False, pad=-128)
    assert torch.equal(got.long(), want)
    g = _draw(gen, tuple(want.shape), -128, 128, torch.int8)
    want_w = torch.nn.grad.conv2d_weight(padded, wt.shape, g.double(), stride, 0, dilation).long()
    got_w = amx_cpu.conv_grad_weight(g, x, tuple(wt.shape), stride, padding, dilation, pad=-128)
    assert torch.equal(got_w.long(), want_w)


@needs_c
def test_digit_planes_rebuild_the_mantissas_and_their_sums_are_exact():
    gen = torch.Generator().manual_seed(2)
    m = _draw(gen, (3, 32, 5, 7), -32768, 32768, torch.int16)
    h, low = (p.to(torch.int32) for p in scaled_mm_cpu.split_digits(m, "test"))
    assert torch.equal(256 * h + low + 128, m.to(torch.int32))
    sums = {"positions": m.sum(1, dtype=torch.int64).reshape(-1),
            "images": m.sum(0, dtype=torch.int64).permute(1, 2, 0),
            "channels": m.sum((0, 2, 3), dtype=torch.int64)}
    for kind, want in sums.items():
        h2, l2, got = scaled_mm_cpu.split_digits(m, "test", kind)
        assert torch.equal(got, want), kind
        assert torch.equal(256 * h2.to(torch.int32) + l2 + 128, m.to(torch.int32))
    assert scaled_mm_cpu.split_digits(m.contiguous(), "test", "positions") is None  # sums need channels-last
    for kind, want in sums.items():  # gemm_cpu copies an NCHW map to channels-last for them
        h3, l3, got = gemm_cpu._digits_with_sums(m.contiguous(), "test", kind)
        assert torch.equal(got, want), kind
        assert torch.equal(256 * h3.to(torch.int32) + l3 + 128, m.to(torch.int32))


@needs_amx
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("fused", [True, False], ids=["combined-in-store", "four-maps"])
def test_digit_convolution_is_the_exact_product_rounded_once(case, channels_last, fused, monkeypatch):
    """Both ways of combining: in the tiles' store, and from four int32 maps in one C pass."""
    calls = []
    real = amx_cpu.conv_forward_digits
    monkeypatch.setattr(amx_cpu, "conv_forward_digits", lambda *a: calls.append(1) or real(*a))
    n, c, h, w, cout, kernel, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(3)
    x = _draw(gen, (n, c, h, w), -32768, 32768, torch.int16, channels_last)
    wt = _draw(gen, (cout, c, *kernel), -32768, 32768, torch.int16, False)
    bias = torch.randn(cout, generator=gen)
    exact = F.conv2d(x.double(), wt.double(), None, stride, padding, dilation)  # below 2**53: exact
    conv = _fresh_int_conv(stride, padding, dilation)
    for e, b in ((-40, None), (-20, bias)):
        got = gemm_cpu.conv_digits_scaled(conv, x, wt, stride, padding, dilation, e, b, fused=fused)
        want = torch.ldexp(exact, torch.tensor(float(e))).float()
        want = want if b is None else want + b.view(1, -1, 1, 1)
        assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)
    assert len(calls) == (2 if fused else 0)


@needs_amx
@pytest.mark.parametrize("case", CASES[:4] + [(130, 16, 32, 32, 16, (3, 3), (1, 1), (1, 1), (1, 1))])
def test_digit_weight_gradient_is_exact(case):
    """Four AMX weight gradients of the digit planes and the offsets' terms, int64; the last
    case sums more images than one int32 chunk holds (parts added in int64)."""
    n, c, h, w, cout, kernel, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(4)
    x = _draw(gen, (n, c, h, w), -32768, 32768, torch.int16)
    oh, ow = F.conv2d(x[:1].double(), torch.zeros(1, c, *kernel, dtype=torch.float64), None, stride, padding,
                      dilation).shape[2:]
    g = _draw(gen, (n, cout, oh, ow), -32768, 32768, torch.int16)
    want = torch.nn.grad.conv2d_weight(x.double(), (cout, c, *kernel), g.double(), stride, padding, dilation)
    got = gemm_cpu.conv_grad_weight(g, x, (cout, c, *kernel), stride, padding, dilation)
    assert got.dtype == torch.int64 and torch.equal(got.double(), want)  # |sums| < 2**53 here


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.BatchNorm2d(128), torch.nn.ReLU(),
        torch.nn.Conv2d(128, 128, 3, padding=1, bias=False))


@needs_amx
def test_default_route_takes_digit_products_at_16_bits(monkeypatch):
    """At 15-16 bits the default route computes convolutions of 64+ channel maps with channels x
    width of 1024 or more as digit products (two forwards, two grad-inputs, two weight
    gradients), bit-identical to the exact route; smaller maps keep FP32 products."""
    import muppet_fx
    from muppet_fx import routes

    calls = []
    for name in ("conv_digits_scaled", "conv_grad_weight_digits"):
        real = getattr(gemm_cpu, name)
        monkeypatch.setattr(gemm_cpu, name,
                            lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    x = torch.randn(2, 128, 16, 16).contiguous(memory_format=torch.channels_last)
    runs = []
    for exact in (False, True):
        pm = muppet_fx.prepare(_net(), ladder=(16, "fp32"), exact=exact)
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        out = pm(xi)
        out.square().sum().backward()
        runs.append([out, xi.grad] + [p.grad for p in pm.parameters()])
        if not exact:
            assert calls.count("conv_digits_scaled") == 4 and calls.count("conv_grad_weight_digits") == 2
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert routes._amx_digits(x) and routes._amx_digits(x[:, :64]) and not routes._amx_digits(x[:, :64, :, :8])
    assert not routes._amx_digits(torch.zeros(1, 512, 4, 4)) and not routes._amx_digits(x[:, :48])


@needs_amx
@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_transposed_convolution_of_wide_maps_on_the_tiles(bits, channels_last):
    """A 4x4 stride-2 transposed convolution with 64 input channels at 12 and 16 bits takes
    the integer kernels like a convolution of such maps. At 12 bits its three products are the
    exact products rounded once (Karatsuba on the tiles); at 16 bits each product is exact or,
    where its operand is too small for the digit kernels, FP32 on the values: within FP32's
    rounding of the exact product either way."""
    from muppet_fx import prepare
    from muppet_fx.numerics import quantise_parts

    torch.manual_seed(bits)
    layer = torch.nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1, bias=False)
    pm = prepare(layer, ladder=(bits, "fp32"), rounding="nearest", grad_rounding="nearest", quantise_outputs=False)
    x = torch.randn(2, 64, 8, 9)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    y = pm(x)
    g = torch.randn(y.shape)
    y.backward(g)
    (x_m, x_s), (w_m, w_s), (g_m, g_s) = (quantise_parts(t, bits, "nearest")[:2]
                                          for t in (x.detach(), layer.weight.detach(), g))
    products = [  # (got, product of two float64 operands, exponent, terms summed per output)
        (y, lambda a, b: F.conv_transpose2d(a, b, stride=2, padding=1), x_m, w_m, x_s + w_s, 64 * 4),
        (x.grad, lambda a, b: F.conv2d(a, b, stride=2, padding=1), g_m, w_m, g_s + w_s, 32 * 16),
        (layer.weight.grad, lambda a, b: torch.nn.grad.conv2d_weight(a, w_m.shape, b, stride=2, padding=1),
         g_m, x_m, g_s + x_s, 2 * 8 * 9 * 4)]
    for got, product, a, b, s, terms in products:
        want = (product(a.double(), b.double()) * 2.0 ** -int(s)).float()
        if bits <= 14:
            assert torch.equal(got, want)
        else:
            size = (product(a.double().abs(), b.double().abs()) * 2.0 ** -int(s)).float()
            assert ((got - want).abs() <= terms * 2.0**-24 * size + 1e-30).all()
