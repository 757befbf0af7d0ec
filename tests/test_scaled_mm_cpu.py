"""Fused scaled integer GEMM on the CPU. Oracle: the int64 product, converted to float32 once
(round to nearest even), scaled by a power of two (exact), plus the float32 bias."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from muppet_fx import prepare
from muppet_fx.kernels import gemm_cpu, scaled_mm_cpu
from muppet_fx.kernels.gemm_cpu import int_matmul_reference
from muppet_fx.kernels.scaled_mm_cpu import scaled_int_matmul

pytestmark = pytest.mark.skipif(scaled_mm_cpu._library() is None, reason="no C compiler")

# int8 (one product), 12 and 14 bits (Karatsuba, three), 16 bits (four plus corrections)
MANTISSAS = [(torch.int8, 127), (torch.int16, 2047), (torch.int16, 8191), (torch.int16, 32767)]


def _want(a, b, e, bias=None):
    y = int_matmul_reference(a, b).float() * 2.0**e
    return y if bias is None else y + bias


def _operands(dtype, q, M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-q, q + 1, (M, K), dtype=dtype, generator=g)
    b = torch.randint(-q, q + 1, (N, K), dtype=dtype, generator=g).t()  # the X W^T layout
    return a, b


@pytest.mark.parametrize("dtype,q", MANTISSAS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 33, 5), (129, 65, 17), (33, 129, 1)])
def test_exact_product_rounded_once(dtype, q, shape):
    a, b = _operands(dtype, q, *shape)
    bias = torch.randn(shape[2])
    for e in (-30, 0, 7):
        assert torch.equal(scaled_int_matmul(a, b, e, bias), _want(a, b, e, bias))
    # row-major b, column-major a
    a2, b2 = a.t().contiguous().t(), b.contiguous()
    assert torch.equal(scaled_int_matmul(a2, b2, -5), _want(a, b, -5))


@pytest.mark.parametrize("dtype,q", MANTISSAS)
def test_chunked_reduction_stays_exact(dtype, q):
    """K split into int32 chunks whose exact values add up in int64, with extreme operands so
    the sums exceed 2**24 (the float32 conversion then rounds, once)."""
    a, b = _operands(dtype, q, 5, 40, 3)
    a[:, :] = q
    b[:, 0] = -q
    want = _want(a, b, -2)
    assert int_matmul_reference(a, b).abs().max() > 2**24 or q == 127
    for chunk in (1, 7, 39, 40, 1000):
        assert torch.equal(scaled_int_matmul(a, b, -2, chunk=chunk), want), chunk


def test_wide_value_in_a_late_chunk_switches_to_the_four_product_split():
    """Karatsuba needs |m| <= 8191; one 15-bit value in the last chunk must send the whole
    product to the four-product split, not corrupt it."""
    a, b = _operands(torch.int16, 100, 9, 50, 4)
    a[3, 49] = 20000
    assert torch.equal(scaled_int_matmul(a, b, 0, chunk=16), _want(a, b, 0))
    a[3, 49] = -32768
    assert torch.equal(scaled_int_matmul(a, b, 0), _want(a, b, 0))


def test_mixed_int8_int16_operands():
    a, _ = _operands(torch.int8, 127, 6, 11, 1)
    _, b = _operands(torch.int16, 8191, 1, 11, 4)
    assert torch.equal(scaled_int_matmul(a, b, 1), _want(a, b, 1))


def test_not_applicable_returns_none():
    a, b = _operands(torch.int8, 127, 3, 4, 2)
    assert scaled_int_matmul(a, b, 127) is None  # 2**127 is not a normal float32 scale factor
    assert scaled_int_matmul(a.int(), b.int(), 0) is None
    assert scaled_int_matmul(a, b, 0, torch.zeros(3)) is None  # bias of the wrong length
    assert scaled_int_matmul(a, b, 0, chunk=0) is None


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 16), m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 9),
       e=st.integers(-40, 40), seed=st.integers(0, 2**31 - 1))
def test_property_equals_oracle(bits, m, k, n, e, seed):
    q = 2 ** (bits - 1) - 1
    a, b = _operands(torch.int8 if bits <= 8 else torch.int16, q, m, k, n, seed)
    assert torch.equal(scaled_int_matmul(a, b, e), _want(a, b, e))


@pytest.mark.parametrize("bits", [12, 14])
def test_aten_linear_at_12_and_14_bits_is_exact(bits, monkeypatch):
    """The default aten route now takes the fused Karatsuba GEMMs at 9-14 bits: forward and
    both gradients equal the exact route (``exact=True``) bit for bit. (On CPUs without int8
    dot products both routes leave ``torch._int_mm``; the kernels are checked on any CPU.)"""
    monkeypatch.setattr(gemm_cpu, "fast_int8", lambda: True)
    x0 = torch.randn(37, 29)
    results = []
    for exact in (False, True):
        torch.manual_seed(0)
        layer = torch.nn.Linear(29, 13)
        pm = prepare(layer, ladder=(bits, "fp32"), backend="aten", rounding="nearest",
                     grad_rounding="nearest", exact=exact)
        x = x0.clone().requires_grad_()
        y = pm(x)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append([y.detach(), x.grad, layer.weight.grad, layer.bias.grad])
    for got, want in zip(*results):
        assert torch.equal(got, want)
