"""Exact integer GEMM and convolution on the CPU. Oracle: int64 / float64 arithmetic, exactly."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from muppet_fx.kernels import conv_onednn, gemm_cpu
from muppet_fx.kernels.gemm_cpu import (conv_forward, conv_grad_input, conv_grad_weight, im2col,
                                        int_matmul, int_matmul_reference)

needs_onednn = pytest.mark.skipif(not conv_onednn.available(),
                                  reason="no oneDNN int8 convolution in this build, or inexact on this CPU (no VNNI)")

DTYPES = [(torch.int8, 127), (torch.int16, 8191), (torch.int16, 32767)]  # int8, Karatsuba, 4-way split
SHAPES = [(1, 1, 1), (7, 33, 5), (129, 7, 3), (33, 129, 17)]
CONVS = [  # N, C, H, W, Cout, k, stride, padding, dilation
    (2, 3, 7, 9, 5, 3, 1, 1, 1), (2, 3, 8, 8, 4, 3, 2, 1, 1), (1, 2, 9, 7, 3, 1, 2, 0, 1),
    (2, 3, 9, 9, 2, 3, 2, 0, 1), (1, 2, 11, 10, 3, 3, 1, 2, 2), (2, 3, 7, 7, 4, 5, 3, 2, 1),
    (1, 2, 8, 7, 3, 2, 3, 1, 1), (1, 2, 6, 6, 3, 2, 2, 3, 1), (1, 2, 11, 10, 3, 3, 2, 2, 2),
]


@pytest.mark.parametrize("dtype,q", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int_matmul_exact(dtype, q, shape):
    M, K, N = shape
    a = torch.randint(-q, q + 1, (M, K), dtype=dtype)
    b = torch.randint(-q, q + 1, (K, N), dtype=dtype)
    want = int_matmul_reference(a, b)
    assert torch.equal(int_matmul(a, b).long(), want)
    assert torch.equal(int_matmul(a.t().contiguous().t(), b.t().contiguous().t()).long(), want)
    assert torch.equal(int_matmul(a, b, chunk=4).long(), want)  # chunked accumulation


def test_int16_extremes_and_chunked_overflow():
    """All-extreme 16-bit operands: a naive int32 accumulator overflows (2 * 32767**2 > 2**31)
    already at K = 2; the split route with chunked accumulation stays exact."""
    K = 300
    a = torch.full((3, K), 32767, dtype=torch.int16)
    a[1] = -32767
    b = torch.full((K, 2), 32767, dtype=torch.int16)
    want = int_matmul_reference(a, b)
    assert int(want.abs().max()) > 2**31  # would overflow int32
    assert torch.equal(int_matmul(a, b).long(), want)
    a8 = torch.full((2, 200_000), 127, dtype=torch.int8)  # K beyond one int32 chunk
    b8 = torch.full((200_000, 1), 127, dtype=torch.int8)
    assert int(int_matmul(a8, b8)[0, 0]) == 200_000 * 127 * 127


@pytest.mark.parametrize("dtype,q", DTYPES)
@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_exact(dtype, q, case, channels_last):
    """Forward, grad-input and grad-weight equal float64 convolution of the same integers."""
    N, C, H, W, Co, k, s, p, d = case
    x = torch.randint(-q, q + 1, (N, C, H, W), dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-q, q + 1, (Co, C, k, k), dtype=dtype)
    ref = F.conv2d(x.double(), w.double(), None, s, p, d)
    assert torch.equal(conv_forward(x, w, s, p, d).double(), ref)
    g = torch.randint(-q, q + 1, ref.shape, dtype=dtype)
    gx, gw, _ = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, [s, s], [p, p],
                                                    [d, d], False, [0, 0], 1, [True, True, False])
    assert torch.equal(conv_grad_input(g, w, x.shape, s, p, d).double(), gx)
    assert torch.equal(conv_grad_weight(g, x, w.shape, s, p, d).double(), gw)


@pytest.mark.parametrize("geometry", [(3, 2, 1, 1), (3, 1, 1, 1), ((1, 5), 1, (0, 2), 1), (5, 1, 3, 1),
                                      (3, 1, 2, 2), (5, 1, 0, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_im2col_c_matches_torch_fallback(monkeypatch, geometry, channels_last):
    """The C kernel (whole kernel rows copied where they lie inside the image, taps one by one
    at the borders) against the strided-view fallback."""
    x = torch.randint(-127, 128, (2, 16, 7, 6), dtype=torch.int8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    k, s, p, d = geometry
    fast = im2col(x, k, s, p, d).clone()
    monkeypatch.setattr(gemm_cpu, "_lib", False)
    assert torch.equal(im2col(x, k, s, p, d), fast)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fused_output_quantisation_equals_separate_passes(rounding):
    """Oracle: convert, scale by 2**e and quantise in three passes with the same draws."""
    from muppet_fx.kernels.quantise_cpu import c_kernel_available, requantise_accumulator
    from muppet_fx.numerics import fake_quantise_inplace

    if not c_kernel_available():
        pytest.skip("no C compiler: the fused kernel is not built")
    acc = torch.randint(-2**30, 2**30, (3, 5, 7, 11), dtype=torch.int32).contiguous(
        memory_format=torch.channels_last)
    for e, bits in ((-20, 8), (0, 8), (5, 8), (-3, 12)):
        torch.manual_seed(3)
        fused, m, s = requantise_accumulator(acc, e, bits, rounding, want_mantissa=True)
        torch.manual_seed(3)
        separate = fake_quantise_inplace(torch.mul(acc, 2.0**e), bits, rounding)
        assert torch.equal(fused, separate) and fused.is_contiguous(memory_format=torch.channels_last)
        assert m.dtype == (torch.int8 if bits == 8 else torch.int16) and m.is_contiguous(memory_format=torch.channels_last)
        assert m.abs().max() <= 2 ** (bits - 1) - 1
        assert torch.equal(torch.ldexp(m.double(), -s.double()), fused.double())  # the same grid values
        torch.manual_seed(3)
        alone, none, s2 = requantise_accumulator(acc, e, bits, rounding)
        assert none is None and torch.equal(alone, fused) and int(s2) == int(s)
    assert requantise_accumulator(acc.long(), 0, 8, rounding) is None  # not an int32 accumulator


@needs_onednn
@pytest.mark.parametrize("shape", [(2, 512, 6, 16, 3, 1, 1, 1), (3, 7, 9, 5, 3, 2, 1, 1), (2, 33, 8, 8, 1, 2, 0, 1),
                                   (1, 3, 11, 4, 5, 1, 2, 1), (2, 5, 13, 3, 3, 1, 2, 2)])
@pytest.mark.parametrize("e", [-14, 0, 5])
def test_onednn_conv_equals_the_integer_oracle(shape, e):
    """oneDNN's int8 convolution (uint8 + zero point 128) is the exact integer convolution,
    rounded once to float32 and scaled by 2**e, also where sums pass 2**24."""
    N, C, H, Co, k, s, p, d = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(-128, 128, (N, C, H, H), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (Co, C, k, k), dtype=torch.int8, generator=g)
    x[0], w[0] = -128, -128  # the largest products
    exact = torch.nn.functional.conv2d(x.double(), w.double(), stride=s, padding=p, dilation=d)
    assert conv_onednn.supports(x, w, 1, e)
    y = conv_onednn.conv2d(x, w, e, s, p, d)
    assert torch.equal(y, exact.float() * 2.0**e)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_onednn_route_is_declined_exactly_where_its_kernel_is_inexact():
    """The probe behind ``available()`` agrees with a larger convolution of extreme mantissas
    run on the raw op: exact -> the route is taken, inexact (AVX2 CPUs: saturating 16-bit pair
    sums) -> declined, and then ``supports`` refuses every convolution, so the routes never
    take it."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")):
        pytest.skip("this torch build has no oneDNN quantised convolution")
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-128, 128, (2, 256, 7, 7), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (32, 256, 3, 3), dtype=torch.int8, generator=g)
    x[0], w[:4] = 127, -128
    exact = F.conv2d(x.double(), w.double(), padding=1).float()
    assert conv_onednn.available() == torch.equal(conv_onednn.conv2d(x, w, 0, 1, 1, 1), exact)
    if not conv_onednn.available():
        assert not conv_onednn.supports(x, w, 1, 0)


def test_onednn_conv_declines_what_it_cannot_do_exactly():
    x = torch.zeros(1, 8, 4, 4, dtype=torch.int8)
    w = torch.zeros(2, 8, 3, 3, dtype=torch.int8)
    assert not conv_onednn.supports(x, w, 2, 0)  # groups
    assert not conv_onednn.supports(x, w, 1, -140)  # scale below float32's normal range
    assert not conv_onednn.supports(x.to(torch.int16), w, 1, 0)
    big = torch.zeros(2, 8000, 3, 3, dtype=torch.int8)  # K = 72,000: the int32 sum could overflow
    assert not conv_onednn.supports(torch.zeros(1, 8000, 4, 4, dtype=torch.int8), big, 1, 0)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 5), st.integers(1, 12), st.integers(1, 12),
       st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.integers(0, 7),
       st.integers(0, 7), st.sampled_from([(1, 1), (1, 1), (2, 1), (1, 3), (2, 2)]),
       st.sampled_from([(torch.int8, 127), (torch.int16, 8191)]))
def test_grad_input_is_exact_for_any_geometry(N, C, Co, H, W, kh, kw, sh, sw, ph, pw, dil, dq):
    """Grad-input equals float64 autograd for any kernel, stride, padding and dilation:
    rectangular kernels, kernels narrower than the stride (phases no tap reaches), padding
    wider than the (dilated) kernel, at stride 1 too. Undilated strided convolutions take one
    stride-1 correlation per phase of the input positions, dilated ones a zero-inserted one."""
    dtype, q = dq
    dh, dw = dil
    OH, OW = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if OH < 1 or OW < 1:
        return
    gen = torch.Generator().manual_seed(N + 7 * C + 31 * H + 131 * W)
    x = torch.zeros(N, C, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randint(-q, q + 1, (Co, C, kh, kw), dtype=dtype, generator=gen)
    g = torch.randint(-q, q + 1, (N, Co, OH, OW), dtype=dtype, generator=gen)
    y = F.conv2d(x, w.double(), stride=(sh, sw), padding=(ph, pw), dilation=dil)
    want, = torch.autograd.grad(y, x, g.double())
    got = conv_grad_input(g, w, x.shape, (sh, sw), (ph, pw), dil)
    assert got.shape == want.shape and torch.equal(got.double(), want)


@needs_onednn
def test_onednn_above_min_rows_im2col_below_both_exact(monkeypatch):
    """8-bit convolutions take oneDNN above ``MIN_ROWS`` output rows (forward: N*OH*OW,
    grad-input: N*H*W) and im2col + ``_int_mm`` at or below it. Both are exact, so a network's
    outputs and gradients are bit-identical whichever the bound picks."""
    from muppet_fx import prepare

    calls = []
    real = conv_onednn.conv2d
    monkeypatch.setattr(conv_onednn, "conv2d", lambda x, *a: (calls.append(tuple(x.shape)), real(x, *a))[1])

    def run(min_rows):
        monkeypatch.setattr(conv_onednn, "MIN_ROWS", min_rows)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 4, 3, stride=2, padding=1), torch.nn.Flatten())
        pm = prepare(model, ladder=(8, "fp32"), rounding="nearest", grad_rounding="nearest")
        x = torch.randn(2, 3, 10, 10, requires_grad=True)
        out = pm(x)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [out, x.grad] + [p.grad for p in model.parameters()]
    gemm = run(10**9)
    assert calls == []
    # c2's forward has 2*5*5 = 50 rows, c1's forward and grad-input 2*10*10 = 200; c2's
    # grad-input is strided and runs its per-phase correlations on im2col whatever the rows
    onednn = run(50)
    assert sorted(set(calls)) == [(2, 3, 10, 10), (2, 8, 10, 10)]
    for a, b in zip(onednn, gemm):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,q", DTYPES)
def test_degenerate_strides_of_single_rows_and_columns(dtype, q):
    """A transposed 2x1 weight is a 1x2 view with strides (1, 1), which ``torch._int_mm``
    misreads; every such view must still give the exact product (e.g. ``nn.Linear(1, 2)``)."""
    for M, K, N in [(1, 1, 2), (3, 1, 2), (1, 2, 1), (2, 1, 1)]:
        a = torch.randint(-q, q + 1, (K, M), dtype=dtype).t()
        b = torch.randint(-q, q + 1, (N, K), dtype=dtype).t()
        assert torch.equal(int_matmul(a, b).long(), int_matmul_reference(a, b))
