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
    assert torch.equal(int_mm(a, b).long().cpu(), a.long().cpu() @ b.long().cpu())  # CUDA has no int64 matmul
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,q,bits", [(torch.int8, 127, 8), (torch.int16, 2047, 12), (torch.int16, 32767, 16)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_epilogue_output_quantisation(device, dtype, q, bits, rounding):
    """The epilogue's per-tile max |C| replaces the quantiser's reduction pass: the output
    equals quantising the plain GEMM output separately (same seed), bit for bit, NaN from the
    bias passed through and left out of the exponent."""
    from muppet_fx.kernels.quantise import quantise_triton

    sa = torch.tensor(4, dtype=torch.int32, device=device)
    sb = torch.tensor(9, dtype=torch.int32, device=device)
    for M, K, N in [(1, 1, 1), (33, 129, 17), (70, 40, 65)]:
        a, b = _operands(dtype, q, M, K, N, device, True)
        bias = torch.randn(N, device=device)
        if N > 1:
            bias[1] = float("nan")
        y = scaled_mm(a, sa, b, sb, bias)
        want = quantise_triton(y, bits, rounding, seed=11, want_mantissa=False, want_values=True)[2]
        got = scaled_mm(a, sa, b, sb, bias, quantise_output=(bits, rounding, 11))
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
        assert N == 1 or bool(got[:, 1].isnan().all())
        finite = got[got.isfinite()]
        s = quantise_triton(y, bits, "nearest")[1]
        m = finite.double() * 2.0 ** s.item()  # on the grid of the tensor's exponent
        assert torch.equal(m, m.round()) and bool((m.abs() <= 2 ** (bits - 1) - 1).all())


@pytest.mark.parametrize("device", DEVICES)
def test_epilogue_max_ignores_tile_padding(device):
    """Rows past M inside the last tile hold just the bias (1020 here); the real rows hold
    1020 - 20 = 1000. The exponent must come from 1000 (1000 * 2**-3 = 125 fits 8 bits,
    1020 * 2**-3 does not), so padding must not enter the max."""
    a = torch.ones(33, 20, dtype=torch.int8, device=device)
    b = -torch.ones(20, 3, dtype=torch.int8, device=device)
    zero = torch.tensor(0, dtype=torch.int32, device=device)
    bias = torch.tensor([1020.0, 0.0, 0.0], device=device)
    got = scaled_mm(a, zero, b, zero, bias, quantise_output=(8, "nearest", 0))
    assert torch.equal(got[:, 0], torch.full((33,), 1000.0, device=device))


@pytest.mark.parametrize("a_order,b_order,copied", [
    ("k", "k", ""), ("k", "n", "b"), ("m", "k", "a"), ("m", "n", "ab")])
@pytest.mark.parametrize("device", DEVICES)
def test_smaller_int8_operand_reaches_the_kernel_k_major(monkeypatch, a_order, b_order, copied, device):
    """A [33, 40] and B [40, 33] (equal sizes): each operand not K-major is copied into that
    order before the launch, and the product stays exact."""
    from muppet_fx.kernels import gemm_triton

    seen = []
    real = gemm_triton._k_major

    def spy(a, b):  # what _launch hands the kernel
        a, b = real(a, b)
        seen.append((a.stride(1), b.stride(0)))
        return a, b
    monkeypatch.setattr(gemm_triton, "_k_major", spy)
    a = torch.randint(-127, 128, (33, 40), dtype=torch.int8, device=device)
    b = torch.randint(-127, 128, (40, 33), dtype=torch.int8, device=device)
    a_in = a if a_order == "k" else a.t().contiguous().t()
    b_in = b.t().contiguous().t() if b_order == "k" else b
    assert torch.equal(int_mm(a_in, b_in).long().cpu(), a.long().cpu() @ b.long().cpu())  # CUDA has no int64 matmul
    assert seen == [(1, 1)]
    big = torch.randint(-127, 128, (40, 500), dtype=torch.int8, device=device)  # N-major and larger than A: left alone
    int_mm(a, big)
    assert seen[-1] == (1, 500)


def test_autotuning_off_keeps_the_first_surviving_configuration(monkeypatch):
    """``MUPPET_FX_AUTOTUNE=0`` (GPU test runs): the autotuner is left one configuration, the
    first that the kernel's own pruning keeps, so nothing is timed and each shape compiles once."""
    import triton

    from muppet_fx.kernels.quantise import autotune

    def noop(M, BLOCK_K):  # the autotuner reads only the kernel's argument names
        pass
    noop.arg_names = ["M", "BLOCK_K"]
    configs = [triton.Config({"BLOCK_K": k}) for k in (128, 64, 32)]

    def no_wide_k(cs, named_args, **kwargs):  # like the FP16 mode's pruning of BLOCK_K = 128
        return [c for c in cs if c.kwargs["BLOCK_K"] < 128]
    monkeypatch.setenv("MUPPET_FX_AUTOTUNE", "0")
    tuner = autotune(configs, ["M"], prune=no_wide_k)(noop)
    assert [c.kwargs["BLOCK_K"] for c in tuner.early_config_prune(configs, {})] == [64]
    plain = autotune(configs, ["M"])(noop)
    assert [c.kwargs["BLOCK_K"] for c in plain.early_config_prune(configs, {})] == [128]
    monkeypatch.setenv("MUPPET_FX_AUTOTUNE", "1")
    tuned = autotune(configs, ["M"], prune=no_wide_k)(noop)
    assert [c.kwargs["BLOCK_K"] for c in tuned.early_config_prune(configs, {})] == [64, 32]
