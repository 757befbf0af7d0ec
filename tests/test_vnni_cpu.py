"""The AVX-512 VNNI weight-gradient kernel (``kernels/vnni_cpu``): exact against float64
convolutions (every value below 2**53, so float64 sums are exact), the int32 runs that keep
long reductions exact, and its place in the integer route."""
import pytest
import torch

from muppet_fx.kernels import gemm_cpu, vnni_cpu

pytestmark = pytest.mark.skipif(not vnni_cpu.available(), reason="CPU without AVX-512 VNNI/VBMI (or no C compiler)")


def _exact(g, x, weight_shape, stride, padding, dilation):
    return torch.ops.aten.convolution_backward(
        g.double(), x.double(), torch.empty(weight_shape, dtype=torch.float64), None, stride, padding, dilation,
        False, [0, 0], 1, [False, True, False])[1]


def _operands(N, C, Cout, H, W, k, stride, padding, dilation, seed=0, channels_last=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (N, C, H, W), dtype=torch.int8, generator=gen)
    OH, OW = ((size + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for size in (H, W))
    g = torch.randint(-128, 128, (N, Cout, OH, OW), dtype=torch.int8, generator=gen)
    if channels_last:
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    return g, x


@pytest.mark.parametrize("N,C,Cout,H,W,k,stride,padding,dilation", [
    (1, 16, 16, 1, 1, 1, 1, 0, 1),     # one position
    (3, 16, 16, 7, 9, 3, 1, 1, 1),     # output widths not a multiple of 4
    (2, 32, 20, 10, 10, 3, 2, 1, 1),   # strided; output channels padded to 32 in the kernel
    (1, 48, 5, 5, 13, 1, 1, 0, 1),     # 1x1, three channel vectors
    (2, 64, 64, 8, 8, 3, 1, 1, 1),
    (2, 16, 7, 9, 11, 5, 2, 2, 2),     # dilated 5x5
    (2, 16, 16, 6, 6, 3, 1, 0, 1),     # unpadded
    (2, 16, 16, 12, 14, 3, 1, 2, 2),   # dilated at stride 1: 16-channel columns loaded 4 at a time
    (33, 16, 16, 4, 4, 3, 1, 1, 1),    # an odd batch over two threads, several images per chunk
    (2, 128, 129, 3, 5, 3, 1, 2, 1),   # padded wider than the kernel
])
def test_matches_exact_convolution(N, C, Cout, H, W, k, stride, padding, dilation):
    g, x = _operands(N, C, Cout, H, W, k, stride, padding, dilation)
    got = vnni_cpu.conv_grad_weight(g, x, (Cout, C, k, k), stride, padding, dilation)
    assert got.dtype == torch.int64 and got.shape == (Cout, C, k, k)
    assert torch.equal(got.double(), _exact(g, x, (Cout, C, k, k), [stride] * 2, [padding] * 2, [dilation] * 2))


def test_other_memory_orders_and_non_square_kernels():
    g, x = _operands(2, 16, 16, 9, 8, 3, 1, 1, 1, seed=1, channels_last=False)
    got = vnni_cpu.conv_grad_weight(g, x, (16, 16, 3, 3), (1, 1), (1, 1), (1, 1))
    assert torch.equal(got.double(), _exact(g, x, (16, 16, 3, 3), [1, 1], [1, 1], [1, 1]))
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-128, 128, (2, 32, 9, 10), dtype=torch.int8, generator=gen)
    g = torch.randint(-128, 128, (2, 8, 5, 10), dtype=torch.int8, generator=gen)  # 3x1 kernel, stride (2, 1)
    got = vnni_cpu.conv_grad_weight(g, x, (8, 32, 3, 1), (2, 1), (1, 0), (1, 1))
    assert torch.equal(got.double(), _exact(g, x, (8, 32, 3, 1), [2, 1], [1, 0], [1, 1]))


def test_long_reductions_of_extreme_values_stay_exact():
    """Every product at its extreme (x = 127 is the unsigned 255; g = -128), 90,000 positions
    per image: one int32 sum would overflow (90,000 * 255 * 128 > 2**31), so the kernel must
    close its runs in between; the int64 result -127 * 128 * 180,000 is exact."""
    x = torch.full((2, 16, 300, 300), 127, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    g = torch.full((2, 16, 300, 300), -128, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    got = vnni_cpu.conv_grad_weight(g, x, (16, 16, 1, 1), 1, 0, 1)
    assert torch.equal(got, torch.full((16, 16, 1, 1), -127 * 128 * 180_000, dtype=torch.int64))


@pytest.mark.parametrize("bits", [12, 14])
@pytest.mark.parametrize("N,C,Cout,H,W,k,stride,padding", [
    (3, 16, 16, 7, 9, 3, 1, 1), (2, 32, 20, 10, 10, 3, 2, 1), (2, 16, 16, 4, 6, 3, 1, 1), (9, 16, 24, 5, 5, 1, 1, 0)])
def test_int16_matches_exact_convolution(bits, N, C, Cout, H, W, k, stride, padding):
    """int16 mantissas, one image at the quantiser's extremes (the largest products, of one
    sign): int32 runs as long as the values allow (16 columns' worth of 12-bit pairs, one
    14-bit row of at most 8 columns), int64 across."""
    top = 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(bits + C + W)
    x = torch.randint(-top, top + 1, (N, C, H, W), dtype=torch.int16, generator=gen)
    OH, OW = ((size + 2 * padding - k) // stride + 1 for size in (H, W))
    g = torch.randint(-top, top + 1, (N, Cout, OH, OW), dtype=torch.int16, generator=gen)
    x[0], g[0] = top, -top
    got = vnni_cpu.conv_grad_weight(g, x, (Cout, C, k, k), stride, padding, 1)
    assert torch.equal(got.double(), _exact(g, x, (Cout, C, k, k), [stride] * 2, [padding] * 2, [1, 1]))


def test_int16_rows_too_wide_for_one_int32_run_are_declined():
    """16-bit extremes allow one dword step (2 * 32767**2 < 2**31): a row of more than two
    output columns cannot be summed in int32 at all, so the call declines (the routes keep
    their other kernels); at two columns it runs, exactly."""
    x = torch.full((2, 16, 4, 8), 32767, dtype=torch.int16)
    g = torch.full((2, 16, 4, 8), -32767, dtype=torch.int16)
    assert vnni_cpu.conv_grad_weight(g, x, (16, 16, 1, 1), 1, 0, 1) is None
    got = vnni_cpu.conv_grad_weight(g[..., :2], x[..., :2], (16, 16, 1, 1), 1, 0, 1)
    assert torch.equal(got, torch.full((16, 16, 1, 1), -(32767**2) * 16, dtype=torch.int64))


def test_declines_what_it_does_not_cover():
    g, x = _operands(1, 16, 16, 4, 4, 3, 1, 1, 1)
    assert vnni_cpu.conv_grad_weight(g, x[:, :8], (16, 8, 3, 3), 1, 1, 1) is None  # channels not 16k
    assert vnni_cpu.conv_grad_weight(g.int(), x.int(), (16, 16, 3, 3), 1, 1, 1) is None
    assert vnni_cpu.conv_grad_weight(g.short(), x, (16, 16, 3, 3), 1, 1, 1) is None  # mixed widths
    assert vnni_cpu.conv_grad_weight(g[:, :0], x, (0, 16, 3, 3), 1, 1, 1) is None


def test_the_integer_route_takes_it_up_to_max_channels(monkeypatch):
    """``gemm_cpu.conv_grad_weight`` calls the kernel on CPUs without AMX tiles for up to
    ``MAX_CHANNELS`` input channels (above them im2col + ``torch._int_mm`` was faster) and
    returns the same integers as the im2col route."""
    if gemm_cpu.amx_cpu.available():
        pytest.skip("AMX CPUs take the AMX kernel")
    calls = []
    kernel = vnni_cpu.conv_grad_weight
    monkeypatch.setattr(vnni_cpu, "conv_grad_weight", lambda *a: calls.append(a[1].shape[1]) or kernel(*a))
    for C in (16, vnni_cpu.MAX_CHANNELS, 2 * vnni_cpu.MAX_CHANNELS):
        g, x = _operands(3, C, 24, 6, 7, 3, 1, 1, 1, seed=C)
        got = gemm_cpu.conv_grad_weight(g, x, (24, C, 3, 3), 1, 1, 1, magnitude=128)
        assert torch.equal(got.double(), _exact(g, x, (24, C, 3, 3), [1, 1], [1, 1], [1, 1]))
    assert calls == [16, vnni_cpu.MAX_CHANNELS]


@pytest.mark.parametrize("N,C,Cout,H,W,k,stride,padding,dilation", [
    (3, 16, 16, 7, 9, 3, 1, 1, 1),     # 9 columns: one row per vector, a tail of 7 lanes
    (2, 32, 32, 10, 10, 3, 2, 1, 1),   # 5 columns: two rows per vector
    (1, 48, 16, 5, 13, 1, 1, 0, 1),
    (2, 64, 64, 8, 8, 3, 1, 1, 1),
    (2, 16, 48, 9, 11, 5, 2, 2, 2),    # 4 columns: four rows per vector; dilated, strided
    (2, 4, 16, 6, 6, 3, 1, 0, 1),
    (5, 12, 32, 3, 3, 3, 1, 1, 1),     # an odd batch over two threads
    (1, 8, 16, 4, 37, 3, (1, 3), (0, 4), (1, 2)),  # padded wider than the kernel, mixed strides
    # stride 1 over 16+ columns: 16 pixels of 2, 4 or 8 channel dwords packed by the permute
    # tree, the tail of 3 columns by the 16 x 16 transpose
    (2, 8, 16, 3, 35, 3, 1, 1, 1), (2, 16, 16, 4, 33, 3, 1, 1, 1), (1, 32, 16, 3, 19, 3, 1, 0, 1),
])
def test_forward_matches_exact_convolution(N, C, Cout, H, W, k, stride, padding, dilation):
    """The int32 sums are exact; converted to float32 once and scaled by 2**-3 (exact), plus
    the bias in float32: the same values as the float64 convolution rounded the same way."""
    gen = torch.Generator().manual_seed(C + W)
    x = torch.randint(-128, 128, (N, C, H, W), dtype=torch.int8, generator=gen)
    w = torch.randint(-128, 128, (Cout, C, k, k), dtype=torch.int8, generator=gen)
    bias = torch.randn(Cout, generator=gen)
    got = vnni_cpu.conv2d(x, w, -3, stride, padding, dilation, bias=bias)
    exact = torch.nn.functional.conv2d(x.double(), w.double(), stride=stride, padding=padding, dilation=dilation)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, exact.float() * 2.0**-3 + bias.view(1, -1, 1, 1))


@pytest.mark.parametrize("bits", [12, 14, 16])
@pytest.mark.parametrize("N,C,Cout,H,W,k,stride,padding", [
    (3, 16, 16, 7, 9, 3, 1, 1), (2, 64, 32, 10, 10, 3, 2, 1), (2, 6, 16, 5, 4, 3, 1, 2), (1, 128, 16, 3, 3, 3, 1, 1),
    (2, 4, 16, 3, 35, 3, 1, 1), (1, 8, 16, 2, 18, 3, 1, 1), (2, 16, 16, 3, 33, 3, 1, 1)])  # the permute tree
def test_int16_forward_matches_exact_convolution(bits, N, C, Cout, H, W, k, stride, padding):
    """int16 mantissas of 12-16 bits, one image and one output channel at the quantiser's
    extremes: the int32 runs (256 pairs at 12 bits, 16 at 14, 1 at 16) summed in int64 keep
    the sums exact, then one rounding to float32 (128 channels x 9 taps: 1,152 products,
    several runs)."""
    top = 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(bits + C)
    x = torch.randint(-top, top + 1, (N, C, H, W), dtype=torch.int16, generator=gen)
    w = torch.randint(-top, top + 1, (Cout, C, k, k), dtype=torch.int16, generator=gen)
    x[0], w[0] = top, -top  # the largest products, all of one sign
    got = vnni_cpu.conv2d(x, w, -20, stride, padding, 1)
    exact = torch.nn.functional.conv2d(x.double(), w.double(), stride=stride, padding=padding)
    assert torch.equal(got, exact.float() * 2.0**-20)


def test_forward_records_its_output_maximum_for_the_next_quantiser():
    """The stored floats' largest ``bits & 0x7fffffff`` (NaN-safe, as ``quantise_cpu``'s scan),
    recorded on the output so that quantising it skips the scan; an in-place change voids it."""
    from muppet_fx.kernels.quantise_cpu import _recorded_absmax

    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-128, 128, (3, 16, 7, 9), dtype=torch.int8, generator=gen)
    w = torch.randint(-128, 128, (32, 16, 3, 3), dtype=torch.int8, generator=gen)
    y = vnni_cpu.conv2d(x, w, -5, 1, 1, 1)
    assert _recorded_absmax(y) == int(y.abs().max().view(torch.int32))
    y.mul_(2)
    assert _recorded_absmax(y) is None


def test_forward_into_a_strided_view_from_an_origin():
    """``out`` and ``origin``: the positions from ``origin`` on, written through the view's
    strides (one phase of a strided grad-input), nothing else touched."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-128, 128, (2, 16, 9, 9), dtype=torch.int8, generator=gen)
    w = torch.randint(-128, 128, (16, 16, 3, 3), dtype=torch.int8, generator=gen)
    full = torch.nn.functional.conv2d(x.double(), w.double(), padding=2).float()  # 11 x 11
    dst = torch.full((2, 12, 12, 16), 7.0)
    view = dst[:, 1::2, ::2]  # 6 x 6 positions, channel stride 1
    assert vnni_cpu.conv2d(x, w, 0, 1, 2, 1, out=view, origin=(3, 5)) is view
    assert torch.equal(view.permute(0, 3, 1, 2), full[:, :, 3:9, 5:11])
    assert (dst[:, ::2] == 7.0).all() and (dst[:, 1::2, 1::2] == 7.0).all()


def test_forward_declines_what_it_does_not_cover():
    x = torch.zeros(1, 16, 4, 4, dtype=torch.int8)
    w = torch.zeros(16, 16, 3, 3, dtype=torch.int8)
    assert vnni_cpu.conv2d(x, w[:8], 0, 1, 1, 1) is None           # output channels not 16k
    assert vnni_cpu.conv2d(x[:, :6], w[:, :6], 0, 1, 1, 1) is None  # input channels not 4k
    assert vnni_cpu.conv2d(x, w, 127, 1, 1, 1) is None             # 2**127: beyond float32's normal range
    assert vnni_cpu.conv2d(x.int(), w.int(), 0, 1, 1, 1) is None
    assert vnni_cpu.conv2d(x.short(), w, 0, 1, 1, 1) is None       # mixed widths
    assert vnni_cpu.conv2d(x[:, :6].short(), w[:, :6].short(), 0, 1, 1, 1) is not None  # int16: channel pairs
    assert vnni_cpu.conv2d(x[:, :5].short(), w[:, :5].short(), 0, 1, 1, 1) is None
    x16, w16 = x.short().fill_(-32768), w.short().fill_(-32768)  # one pair of products would overflow int32
    assert vnni_cpu.conv2d(x16, w16, 0, 1, 1, 1) is None and vnni_cpu.conv2d(x16, w16 + 1, 0, 1, 1, 1) is not None
    wide = torch.zeros(1, 8192, 3, 3, dtype=torch.int8)  # 73,728 products per sum: over MAX_K
    assert vnni_cpu.conv_applies(wide[:, :16], w) and not vnni_cpu.conv_applies(wide, torch.zeros(16, 8192, 3, 3,
                                                                                                   dtype=torch.int8))


def test_a_prepared_network_takes_the_kernels_and_matches_the_im2col_route(monkeypatch):
    """ResNet-like 16/32-channel layers at 8 bits, nearest rounding: on CPUs without AMX the
    forward, grad-input (stride 1 and the phases of stride 2) and weight gradients take the VNNI
    kernels, and outputs and every gradient equal those of the route without them bit for bit
    (both are exact integer sums, scaled the same way)."""
    from muppet_fx import prepare

    if gemm_cpu.amx_cpu.available():
        pytest.skip("AMX CPUs take the AMX kernels")
    calls = {"conv2d": 0, "placed": 0, "grad_weight": 0}
    conv2d, grad_weight = vnni_cpu.conv2d, vnni_cpu.conv_grad_weight

    def counted_conv2d(*a, **k):
        calls["placed" if "out" in k else "conv2d"] += 1
        return conv2d(*a, **k)

    def counted_grad_weight(*a):
        calls["grad_weight"] += 1
        return grad_weight(*a)

    def run():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
                                  torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                  torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Flatten())
        pm = prepare(net, ladder=(8, "fp32"), rounding="nearest", grad_rounding="nearest")
        x = torch.randn(3, 16, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
        out = pm(x)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [out, x.grad] + [p.grad for p in net.parameters()]

    monkeypatch.setattr(vnni_cpu, "conv2d", counted_conv2d)
    monkeypatch.setattr(vnni_cpu, "conv_grad_weight", counted_grad_weight)
    got = run()
    assert calls == {"conv2d": 3 + 2, "placed": 4, "grad_weight": 3}  # 3 forwards, 2 stride-1 grad-inputs, 4 phases
    monkeypatch.setattr(vnni_cpu, "conv_applies", lambda *a: False)
    monkeypatch.setattr(vnni_cpu, "MAX_CHANNELS", 0)
    want = run()
    assert calls == {"conv2d": 5, "placed": 4, "grad_weight": 3}
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [12, 16])
def test_the_exact_route_takes_the_int16_kernel_and_stays_exact(bits, monkeypatch):
    """``exact=True`` at 12 and 16 bits: forward and grad-input (stride 1 and phases) of int16
    mantissas take the kernel in one ``vpdpwssd`` product each, and every value and gradient
    equals the split-int8 route's bit for bit."""
    from muppet_fx import prepare

    if gemm_cpu.amx_cpu.available():
        pytest.skip("AMX CPUs take the AMX kernels")
    dtypes = []
    conv2d = vnni_cpu.conv2d
    monkeypatch.setattr(vnni_cpu, "conv2d", lambda x, *a, **k: dtypes.append(x.dtype) or conv2d(x, *a, **k))

    def run():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.Flatten())
        pm = prepare(net, ladder=(bits, "fp32"), exact=True, rounding="nearest", grad_rounding="nearest")
        x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
        out = pm(x)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [out, x.grad] + [p.grad for p in net.parameters()]

    got = run()
    assert dtypes == [torch.int16] * (2 + 1 + 4)  # two forwards, c1's grad-input, c2's four phases
    monkeypatch.setattr(vnni_cpu, "conv_applies", lambda *a: False)
    want = run()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_9_to_14_bit_convolutions_take_the_int16_kernels_exactly(bits, monkeypatch):
    """The default route at 9-14 bits on CPUs without AMX: convolutions of 16k-channel maps run
    on the int16 kernels (forward, grad-input with its strided phases, weight gradient), so the
    quantisers write no FP32 values and every value and gradient equals the exact route's on
    the split int8 products without these kernels, bit for bit (both are exact integer sums,
    converted to float32 once)."""
    from muppet_fx import prepare

    if gemm_cpu.amx_cpu.available():
        pytest.skip("AMX CPUs take the AMX kernels")
    calls = []
    conv2d, grad_weight = vnni_cpu.conv2d, vnni_cpu.conv_grad_weight
    monkeypatch.setattr(vnni_cpu, "conv2d", lambda x, *a, **k: calls.append(("conv", x.dtype)) or conv2d(x, *a, **k))
    monkeypatch.setattr(vnni_cpu, "conv_grad_weight",
                        lambda g, *a: calls.append(("dW", g.dtype)) or grad_weight(g, *a))

    def run(exact):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                  torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.Flatten())
        pm = prepare(net, ladder=(bits, "fp32"), exact=exact)
        x = torch.randn(3, 16, 10, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
        torch.manual_seed(1)  # the same stochastic rounding draws
        out = pm(x)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [out, x.grad] + [p.grad for p in net.parameters()]

    got = run(False)
    assert calls == [("conv", torch.int16)] * 2 + [("conv", torch.int16)] * 4 + [("dW", torch.int16)] \
        + [("conv", torch.int16)] + [("dW", torch.int16)]  # forwards; c2's phases and dW; c1's grad-input and dW
    monkeypatch.setattr(vnni_cpu, "conv_applies", lambda *a: False)
    monkeypatch.setattr(vnni_cpu, "conv_grad_weight", lambda *a: None)
    want = run(True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_16_bit_linear_layers_of_256_and_more_take_the_digit_products():
    """On VNNI CPUs without AMX a 15-16 bit linear layer with every side of its GEMMs at least
    ``VNNI_WIDE_GEMM`` runs as exact digit products (no FP32 values written): its outputs and
    gradients equal the exact route's bit for bit, where FP32 products of the values would
    round differently. Narrower layers keep the values."""
    from muppet_fx import prepare, routes

    if routes.amx_gemm.available():
        pytest.skip("AMX CPUs take the AMX GEMM")
    x, w = torch.randn(256, 512), torch.randn(512, 512)
    assert not routes.on_values("aten_wide", 16, conv=False, x=x, w=w)
    assert routes.on_values("aten_wide", 16, conv=False, x=x, w=w[:64])  # N = 64: FP32 was faster

    def run(exact, out_features=512):
        torch.manual_seed(0)
        layer = torch.nn.Linear(512, out_features)
        pm = prepare(layer, ladder=(16, "fp32"), exact=exact, rounding="nearest", grad_rounding="nearest")
        inp = torch.randn(256, 512, requires_grad=True)
        out = pm(inp)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [out, inp.grad, layer.weight.grad, layer.bias.grad]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
    assert not torch.equal(run(False, 64)[0], run(True, 64)[0])  # the narrow one: FP32 on the values


def test_wide_int8_layers_take_the_kernel_measured_fastest(monkeypatch):
    """64+ channel int8 layers on CPUs without AMX (``routes._vnni_cpu_kernel``): a 1x1 stride-2
    shortcut's forward is one GEMM of the subsampled input, its grad-input the VNNI kernel's
    phase written in place, its weight gradient im2col + ``torch._int_mm``; a 128->256 layer on
    a 4x4 map runs on the GEMM both ways; a 3x3 stride-1 layer on a 48x48 map takes oneDNN. Every
    value and gradient equals that of the routes without the VNNI kernels (oneDNN and im2col) bit
    for bit: all are exact integer sums."""
    from muppet_fx import prepare, routes
    from muppet_fx.kernels import conv_onednn

    if gemm_cpu.amx_cpu.available():
        pytest.skip("AMX CPUs take the AMX kernels")
    conv_onednn.available()  # its one-time exactness probe, before the calls are counted
    calls = []
    conv2d, onednn, grad_weight = vnni_cpu.conv2d, conv_onednn.conv2d, vnni_cpu.conv_grad_weight
    monkeypatch.setattr(vnni_cpu, "conv2d", lambda x, w, *a, **k: calls.append(
        ("vnni placed" if "out" in k else "vnni", tuple(w.shape))) or conv2d(x, w, *a, **k))
    monkeypatch.setattr(conv_onednn, "conv2d", lambda x, w, *a: calls.append(("onednn", tuple(w.shape)))
                        or onednn(x, w, *a))
    monkeypatch.setattr(vnni_cpu, "conv_grad_weight", lambda g, x, shape, *a: calls.append(
        ("vnni dW", tuple(shape))) or grad_weight(g, x, shape, *a))

    def run():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.nn.ReLU(),
                                  torch.nn.Conv2d(64, 128, 1, stride=12, bias=False), torch.nn.ReLU(),
                                  torch.nn.Conv2d(128, 256, 3, padding=1, bias=False), torch.nn.Flatten())
        pm = prepare(net, ladder=(8, "fp32"), rounding="nearest", grad_rounding="nearest")
        x = torch.randn(2, 64, 48, 48).contiguous(memory_format=torch.channels_last).requires_grad_()
        out = pm(x)  # 48x48 (oneDNN's), then 4x4 maps
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [out, x.grad] + [p.grad for p in net.parameters()]

    got = run()
    first = (64, 64, 3, 3)  # its grad-input's weight (transposed) has the same shape
    # nothing for the 4x4 layer's three products, nor the shortcut's forward and weight gradient
    assert sorted(calls) == sorted([("onednn", first), ("onednn", first), ("vnni dW", first),
                                    ("vnni placed", (64, 128, 1, 1))])
    calls.clear()
    monkeypatch.setattr(routes, "_vnni_cpu_kernel", lambda *a, **k: "onednn")
    monkeypatch.setattr(vnni_cpu, "MAX_CHANNELS", 0)
    want = run()
    assert calls == [("onednn", first), ("onednn", first)]  # the rest on im2col: too few rows for oneDNN
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cin,cout,size,k,stride,forward,grad_input", [
    (32, 64, 16, 3, 2, None, "vnni"),         # a 32-channel input: no choice (the VNNI kernel); its
                                              # grad-input reads the 64-channel gradient
    (64, 64, 32, 3, 1, "onednn", "onednn"),   # stride 1, 1,024 positions
    (64, 128, 32, 3, 2, "vnni", "vnni"),      # strided: in-place phases for the grad-input
    (128, 128, 16, 3, 1, "vnni", "vnni"),     # 256 positions
    (128, 256, 16, 3, 2, "gemm", "vnni"),     # 64 output positions, 128 channels
    (256, 512, 8, 3, 2, "gemm", "gemm"),      # 16 output positions; a 64-position grad-input of 512
    (512, 512, 4, 3, 1, "gemm", "gemm"),
    (64, 128, 32, 1, 2, "gemm", "vnni"),      # 1x1 stride 2: a subsample and one GEMM
    (64, 256, 16, 1, 1, "vnni", "vnni"),
])
def test_the_measured_rule_for_wide_int8_layers(cin, cout, size, k, stride, forward, grad_input):
    """``routes._vnni_cpu_kernel`` on ResNet layer shapes: the kernel that measured fastest
    through the route functions (``benchmarks/results/cpu-zen5-routes-2026-12-03.md``);
    ``None`` (no choice made) for operands below 64 channels, for int16 and on AMX CPUs."""
    from muppet_fx import routes

    if gemm_cpu.amx_cpu.available():
        pytest.skip("AMX CPUs take the AMX kernels")
    x = torch.zeros(2, cin, size, size, dtype=torch.int8)
    w = torch.zeros(cout, cin, k, k, dtype=torch.int8)
    out = (size + 2 * (k // 2) - k) // stride + 1
    g = torch.zeros(2, cout, out, out, dtype=torch.int8)
    assert routes._vnni_cpu_kernel(x, w, out * out, stride > 1, grad_input=False) == forward
    assert routes._vnni_cpu_kernel(g, w.transpose(0, 1), size * size, stride > 1, grad_input=True) == grad_input
    assert routes._vnni_cpu_kernel(x.short(), w.short(), out * out, stride > 1, grad_input=False) is None
