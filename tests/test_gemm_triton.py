"""Triton GEMMs against their plain-torch twins (TRITON_INTERPRET=1 runs them without a GPU).

Oracles: int64 products, exactly, for int8 and for the split int16 route; for the FP16 route,
the same FP16-rounded operands multiplied in float64, within FP32 accumulation error
(K * 2**-24 relative to sum |a||b|).
"""
import pytest
import torch

from muppet_fx.kernels.gemm_triton import int_mm, scaled_mm, scaled_mm_reference
from muppet_fx.kernels.quantise import HAS_TRITON

from .conftest import DEVICES

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
SHAPES = [(1, 1, 1), (7, 33, 5), (129, 7, 3), (33, 129, 17), (64, 40, 70)]


def _operands(dtype, q, M, K, N, device, transposed_b):
    a = torch.randint(-q, q + 1, (M, K), dtype=dtype, device=device)
    b = torch.randint(-q, q + 1, (N, K) if transposed_b else (K, N), dtype=dtype, device=device)
    return a, (b.t() if transposed_b else b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed_b", [False, True])
def test_int8_exact(device, shape, transposed_b):
    M, K, N = shape
    a, b = _operands(torch.int8, 127, M, K, N, device, transposed_b)
    assert torch.equal(int_mm(a, b).long(), a.long() @ b.long())
    sa = torch.tensor(5, dtype=torch.int32, device=device)
    sb = torch.tensor(-3, dtype=torch.int32, device=device)
    bias = torch.randn(N, device=device)
    assert torch.equal(scaled_mm(a, sa, b, sb, bias), scaled_mm_reference(a, sa, b, sb, bias))
    sb_col = torch.randint(-4, 9, (N,), dtype=torch.int32, device=device)
    assert torch.equal(scaled_mm(a, sa, b, sb_col, b_axis=0), scaled_mm_reference(a, sa, b, sb_col))
    at = a.t().contiguous().t()  # column-major A: the dY^T X product reads through strides
    assert torch.equal(scaled_mm(at, sa, b, sb), scaled_mm_reference(a, sa, b, sb))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q", [2047, 32767])
def test_int16_routes(device, shape, q):
    M, K, N = shape
    a, b = _operands(torch.int16, q, M, K, N, device, True)
    sa = torch.tensor(12, dtype=torch.int32, device=device)
    sb = torch.tensor(3, dtype=torch.int32, device=device)
    assert torch.equal(scaled_mm(a, sa, b, sb, exact=True), scaled_mm_reference(a, sa, b, sb))
    got = scaled_mm(a, sa, b, sb).double()
    want = scaled_mm_reference(a, sa, b, sb, fp16=True).double()
    mag = (a.to(torch.float16).double().abs() @ b.to(torch.float16).double().abs()) * 2.0 ** -15
    assert bool(((got - want).abs() <= K * 2.0**-24 * mag + 1e-30).all())
    if q == 2047:  # 12-bit mantissas are exact in FP16: only the FP32 accumulation rounds
        exact = scaled_mm_reference(a, sa, b, sb).double()
        assert bool(((got - exact).abs() <= K * 2.0**-24 * mag + 1e-30).all())


def test_bad_operands():
    a = torch.zeros(3, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        int_mm(a, torch.zeros(5, 2, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8 or int16"):
        int_mm(a.float(), torch.zeros(4, 2))
