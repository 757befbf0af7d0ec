"""The AVX2 int8 GEMM (``kernels/gemm_avx2.c``) against the int64 oracle: bit-exact on odd
shapes, every operand layout, extreme values at the longest reduction it accepts, and both of
its threading schemes (rows split across threads, or the reduction split)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from muppet_fx.kernels import gemm_avx2, gemm_cpu

pytestmark = pytest.mark.skipif(not gemm_avx2.available(), reason="the AVX2 int8 kernel does not build or run here")


def _oracle(a, b):
    return a.long() @ b.long()


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` (values unchanged) row-major, column-major, or a strided view of a wider tensor."""
    if kind == "row":
        return t.contiguous()
    if kind == "col":
        return t.t().contiguous().t()
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
    wide[:, ::2] = t
    return wide[:, ::2]


@pytest.mark.parametrize("a_kind", ["row", "col", "strided"])
@pytest.mark.parametrize("b_kind", ["row", "col", "strided"])
@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (7, 17, 33), (33, 200, 513), (129, 5, 1100), (6, 16, 2)])
def test_exact_on_odd_shapes_and_every_layout(M, N, K, a_kind, b_kind):
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    b = torch.randint(-128, 128, (K, N), dtype=torch.int8)
    got = gemm_avx2.int8_mm(_layout(a, a_kind), _layout(b, b_kind))
    assert got.dtype == torch.int32 and torch.equal(got.long(), _oracle(a, b))


@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 40), N=st.integers(1, 40), K=st.integers(1, 1200), a_col=st.booleans(),
       b_col=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_exact_for_any_shape(M, N, K, a_col, b_col, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (K, N), dtype=torch.int8, generator=g)
    got = gemm_avx2.int8_mm(_layout(a, "col" if a_col else "row"), _layout(b, "col" if b_col else "row"))
    assert torch.equal(got.long(), _oracle(a, b))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("a_kind", ["row", "col"])
def test_extreme_values_at_the_longest_reduction(threads, a_kind):
    """K = MAX_K products of -128 * -128 reach 2**31 - 16384: exact in int32 only if no pair
    sum or partial sum overflows; with 2 threads the reduction runs split (small output)."""
    K = gemm_avx2.MAX_K
    a = torch.full((20, K), -128, dtype=torch.int8)
    b = torch.full((K, 18), -128, dtype=torch.int8)
    b[:, 1] = 127  # the most negative sums too
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = gemm_avx2.int8_mm(_layout(a, a_kind), b)
    finally:
        torch.set_num_threads(before)
    want = _oracle(a, b)
    assert int(want.max()) == 16384 * K and torch.equal(got.long(), want)


@pytest.mark.parametrize("M, N, K", [(16, 144, 9000), (64, 576, 4100), (300, 40, 3000)])
def test_split_reduction_and_row_split_agree_with_the_oracle(M, N, K):
    """Weight-gradient shapes (few outputs, long reduction: one range of K per thread) and
    a forward shape (rows split across threads), with the first operand column-major as the
    transposed output gradient of a weight gradient is."""
    a = torch.randint(-128, 128, (K, M), dtype=torch.int8).t()
    b = torch.randint(-128, 128, (K, N), dtype=torch.int8)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = gemm_avx2.int8_mm(a, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got.long(), _oracle(a, b))


def test_writes_into_out_and_declines_what_it_does_not_take():
    a = torch.randint(-128, 128, (9, 30), dtype=torch.int8)
    b = torch.randint(-128, 128, (30, 11), dtype=torch.int8)
    out = torch.full((9, 11), 7, dtype=torch.int32)
    assert gemm_avx2.int8_mm(a, b, out) is out and torch.equal(out.long(), _oracle(a, b))
    assert torch.equal(gemm_avx2.int8_mm(a[:, :0], b[:0]), torch.zeros(9, 11, dtype=torch.int32))
    assert gemm_avx2.int8_mm(a.short(), b.short()) is None  # int16 mantissas: narrow_mm
    assert gemm_avx2.int8_mm(a, b[:29]) is None  # inner sizes differ
    assert gemm_avx2.int8_mm(a, b, torch.empty(9, 11, dtype=torch.int64)) is None
    long_a = torch.zeros(1, gemm_avx2.MAX_K + 1, dtype=torch.int8)
    assert gemm_avx2.int8_mm(long_a, long_a.t()) is None  # int32 sums could overflow


def test_gemm_cpu_takes_it_only_without_int8_dot_products(monkeypatch):
    calls = []
    kernel = gemm_avx2.int8_mm
    monkeypatch.setattr(gemm_avx2, "int8_mm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    a = torch.randint(-128, 128, (40, 300), dtype=torch.int8)
    b = torch.randint(-128, 128, (300, 24), dtype=torch.int8)
    monkeypatch.setattr(gemm_cpu, "fast_int8", lambda: False)
    assert torch.equal(gemm_cpu.int_matmul(a, b).long(), _oracle(a, b)) and calls
    calls.clear()
    monkeypatch.setattr(gemm_cpu, "fast_int8", lambda: True)
    assert torch.equal(gemm_cpu.int_matmul(a, b).long(), _oracle(a, b)) and not calls


CONVS = {  # (N, C, H, W), (Cout, kh, kw), stride, padding, dilation
    "3x3": ((2, 16, 9, 7), (17, 3, 3), 1, 1, 1),
    "rgb stem": ((3, 3, 8, 8), (16, 3, 3), 1, 1, 1),
    "strided": ((2, 32, 9, 10), (8, 3, 3), 2, 1, 1),
    "1x1 strided": ((2, 24, 7, 7), (33, 1, 1), 2, 0, 1),
    "dilated, uneven": ((1, 5, 11, 9), (6, 2, 3), (1, 2), (0, 2), (2, 1)),
    "no padding, wide": ((2, 48, 6, 6), (20, 5, 5), 1, 0, 1),
}


def _conv_case(name, channels_last):
    x_shape, (cout, kh, kw), stride, padding, dilation = CONVS[name]
    x = torch.randint(-128, 128, x_shape, dtype=torch.int8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (cout, x_shape[1], kh, kw), dtype=torch.int8)
    return x, w, stride, padding, dilation


def _conv_oracle(x, w, stride, padding, dilation):
    return torch.nn.functional.conv2d(x.double(), w.double(), None, stride, padding, dilation).long()


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("name", list(CONVS))
def test_implicit_conv_forward_is_exact(name, channels_last):
    """The patches gathered tap by tap (taps in the padding, partial channel runs at the block
    edges of the reduction) give the integer convolution, in channels-last memory."""
    x, w, stride, padding, dilation = _conv_case(name, channels_last)
    got = gemm_avx2.conv2d(x, w, stride, padding, dilation)
    want = _conv_oracle(x, w, stride, padding, dilation)
    assert got.dtype == torch.int32 and got.shape == want.shape and torch.equal(got.long(), want)
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("name", list(CONVS))
def test_implicit_conv_grad_weight_is_exact(name, channels_last):
    x, w, stride, padding, dilation = _conv_case(name, channels_last)
    out_shape = _conv_oracle(x, w, stride, padding, dilation).shape
    g = torch.randint(-128, 128, out_shape, dtype=torch.int8)
    if channels_last:
        g = g.contiguous(memory_format=torch.channels_last)
    got = gemm_avx2.conv2d_grad_weight(g, x, w.shape, stride, padding, dilation)
    want = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, _pair(stride),
                                               _pair(padding), _pair(dilation), False, [0, 0], 1,
                                               [False, True, False])[1].long()
    assert got.shape == w.shape and torch.equal(got.long(), want)


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def test_grad_weight_sums_more_positions_than_int32_holds_in_parts():
    """-128 everywhere over MAX_K + 1 positions overflows an int32 sum: the images are summed
    in parts, added in int64."""
    per_image = 16 * 16
    n = gemm_avx2.MAX_K // per_image + 1
    x = torch.full((n, 16, 16, 16), -128, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    g = torch.full((n, 16, 16, 16), -128, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    got = gemm_avx2.conv2d_grad_weight(g, x, (16, 16, 1, 1), 1, 0, 1)
    assert got.dtype == torch.int64 and bool((got == 16384 * n * per_image).all())


def test_conv_declines_what_it_does_not_take():
    x = torch.randint(-128, 128, (1, 4, 5, 5), dtype=torch.int8)
    w = torch.randint(-128, 128, (3, 4, 3, 3), dtype=torch.int8)
    assert gemm_avx2.conv2d(x.int(), w.int(), 1, 1, 1) is None  # int32 mantissas: not this kernel
    assert gemm_avx2.conv2d(x, w[:, :3], 1, 1, 1) is None  # channels differ
    assert gemm_avx2.conv2d(x, w, 1, 0, 3) is None  # an empty output
    assert gemm_avx2.conv2d_grad_weight(torch.zeros(1, 3, 4, 4, dtype=torch.int8), x, w.shape, 1, 1, 1) is None


@pytest.mark.parametrize("fast", [False, True])
def test_gemm_cpu_convolutions_take_the_implicit_gemm_only_without_int8_dot_products(fast, monkeypatch):
    from muppet_fx.kernels import amx_cpu

    calls = []
    for name in ("conv2d", "conv2d_grad_weight"):
        kernel = getattr(gemm_avx2, name)
        monkeypatch.setattr(gemm_avx2, name, lambda *a, k=kernel, **kw: calls.append(1) or k(*a, **kw))
    monkeypatch.setattr(gemm_cpu, "fast_int8", lambda: fast)
    monkeypatch.setattr(amx_cpu, "available", lambda: False)
    x, w, stride, padding, dilation = _conv_case("3x3", True)
    y = gemm_cpu.conv_forward(x, w, stride, padding, dilation, amx=False)
    assert torch.equal(y.long(), _conv_oracle(x, w, stride, padding, dilation))
    gw = gemm_cpu.conv_grad_weight(y.clamp(-128, 127).to(torch.int8), x, w.shape, stride, padding, dilation)
    assert gw.shape == w.shape and len(calls) == (0 if fast else 2)


@pytest.mark.parametrize("a_kind", ["row", "col", "strided"])
@pytest.mark.parametrize("b_kind", ["row", "col"])
@pytest.mark.parametrize("M, N, K", [(7, 17, 33), (33, 200, 1300), (129, 5, 511), (40, 16, 5000)])
def test_narrow_mm_is_exact_for_12_bit_mantissas(M, N, K, a_kind, b_kind):
    """int16 mantissas up to 12 bits, extremes included: blocks of at most 510 steps summed in
    int32 (255 pairs of 2 * 2048**2 < 2**31), the blocks in int64."""
    a = torch.randint(-2048, 2049, (M, K), dtype=torch.int16)
    b = torch.randint(-2048, 2049, (K, N), dtype=torch.int16)
    a[0], b[:, 0] = -2048, -2048  # the largest sum: K * 2**22
    got = gemm_avx2.narrow_mm(_layout(a, a_kind), _layout(b, b_kind))
    assert got.dtype == torch.int64 and torch.equal(got, _oracle(a, b))
    mixed = gemm_avx2.narrow_mm(_layout(a, a_kind), b.clamp(-128, 127).to(torch.int8))
    assert torch.equal(mixed, _oracle(a, b.clamp(-128, 127)))


@pytest.mark.parametrize("where", ["a", "b"])
def test_narrow_mm_declines_wider_mantissas_wherever_they_are(where):
    a = torch.randint(-2048, 2049, (20, 300), dtype=torch.int16)
    b = torch.randint(-2048, 2049, (300, 40), dtype=torch.int16)
    (a if where == "a" else b)[13, 17] = 2049
    assert gemm_avx2.narrow_mm(a, b) is None
    assert gemm_avx2.narrow_mm(a.t().contiguous().t(), b) is None  # the column-major packing checks too
    (a if where == "a" else b)[13, 17] = -32768  # |m| = 32768: an unsigned comparison
    assert gemm_avx2.narrow_mm(a, b) is None


@pytest.mark.parametrize("name", list(CONVS))
def test_implicit_conv_of_12_bit_mantissas_is_exact(name):
    x, w, stride, padding, dilation = _conv_case(name, True)
    x16 = (x.short() * 16).clamp(-2048, 2048)
    w16 = (w.short() * 16).clamp(-2048, 2048)
    got = gemm_avx2.conv2d(x16, w16, stride, padding, dilation)
    want = _conv_oracle(x16, w16, stride, padding, dilation)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    g = torch.randint(-2048, 2049, want.shape, dtype=torch.int16).contiguous(memory_format=torch.channels_last)
    gw = gemm_avx2.conv2d_grad_weight(g, x16, w.shape, stride, padding, dilation)
    want_gw = torch.ops.aten.convolution_backward(g.double(), x16.double(), w16.double(), None, _pair(stride),
                                                  _pair(padding), _pair(dilation), False, [0, 0], 1,
                                                  [False, True, False])[1].long()
    assert gw.dtype == torch.int64 and torch.equal(gw, want_gw)
    x16[0, 0, 0, 0] = 4000
    assert gemm_avx2.conv2d(x16, w16, stride, padding, dilation) is None
