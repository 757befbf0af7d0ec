"""Triton quantiser against the reference (runs under TRITON_INTERPRET=1 without a GPU).

Oracle: the reference, exactly for nearest rounding and for stochastic rounding fed the same
uniforms; the kernel's own tl.rand draws are checked for range, reproducibility and bias.
"""
import pytest
import torch

from muppet_fx import fake_quantise, quantise
from muppet_fx.kernels.quantise import HAS_TRITON

from .conftest import DEVICES

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
SHAPES = [(1,), (7,), (33, 5), (129, 3), (2, 7, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 8, 12, 16, 24])
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_matches_reference_exactly(device, shape, bits, axis):
    x = torch.randn(shape, device=device) * 10.0 ** torch.randint(-6, 6, ()).item()
    x.view(-1)[0] = float("nan")
    u = torch.rand(shape, device=device)
    for rounding in ("nearest", "stochastic"):
        kw = dict(axis=axis, noise=u)
        a = fake_quantise(x, bits, rounding, backend="reference", **kw)
        b = fake_quantise(x, bits, rounding, backend="triton", **kw)
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
        assert torch.isnan(b.view(-1)[0])
    x.view(-1)[0] = 1.5
    a = quantise(x, bits, "nearest", backend="reference", axis=axis)
    b = quantise(x, bits, "nearest", backend="triton", axis=axis)
    assert torch.equal(a.mantissa, b.mantissa)
    assert torch.equal(torch.as_tensor(a.exponent), torch.as_tensor(b.exponent).cpu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    x = torch.randn(33, 7).to(dtype)
    a = fake_quantise(x, 8, "nearest", backend="reference")
    b = fake_quantise(x, 8, "nearest", backend="triton")
    assert b.dtype == dtype and torch.equal(a, b)


def test_kernel_random_draws():
    """tl.rand rounding: < 1 ulp, reproducible per seed, seed-dependent, unbiased (6 sigma)."""
    v = torch.tensor([7.0, 0.3, -2.6, 5.5])  # amax 7 at 4 bits -> s = 0
    n = 4000
    x = v.repeat(n)
    a = quantise(x, 4, "stochastic", backend="triton", seed=11)
    b = quantise(x, 4, "stochastic", backend="triton", seed=11)
    c = quantise(x, 4, "stochastic", backend="triton", seed=12)
    assert a.exponent == 0
    assert torch.equal(a.mantissa, b.mantissa) and not torch.equal(a.mantissa, c.mantissa)
    m = a.mantissa.double().view(n, -1)
    assert bool(((m - v.double()).abs() < 1).all())
    frac = v.double() - v.double().floor()
    bound = 6 * torch.sqrt(frac * (1 - frac) / n) + 1e-12
    assert bool(((m.mean(0) - v.double()).abs() <= bound).all())


def test_channels_last_keeps_layout_and_matches():
    """A dense channels-last tensor is quantised in its memory order; values equal the reference."""
    x = torch.randn(2, 3, 5, 4).contiguous(memory_format=torch.channels_last)
    u = torch.rand(x.shape)
    for rounding in ("nearest", "stochastic"):
        a = fake_quantise(x, 8, rounding, backend="reference", noise=u)
        b = fake_quantise(x, 8, rounding, backend="triton", noise=u)
        assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)
