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
    assert gemm_avx2.int8_mm(a.short(), b.short()) is None  # int16 mantissas: not this kernel
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
