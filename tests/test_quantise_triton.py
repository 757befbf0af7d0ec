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
    assert torch.equal(torch.as_tensor(a.exponent).cpu(), torch.as_tensor(b.exponent).cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype, device):
    x = torch.randn(33, 7, device=device).to(dtype)
    a = fake_quantise(x, 8, "nearest", backend="reference")
    b = fake_quantise(x, 8, "nearest", backend="triton")
    assert b.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_random_draws(device):
    """tl.rand rounding: < 1 ulp, reproducible per seed, seed-dependent, unbiased (6 sigma)."""
    v = torch.tensor([7.0, 0.3, -2.6, 5.5], device=device)  # amax 7 at 4 bits -> s = 0
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


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_keeps_layout_and_matches(device):
    """A dense channels-last tensor is quantised in its memory order; values equal the reference."""
    x = torch.randn(2, 3, 5, 4, device=device).contiguous(memory_format=torch.channels_last)
    u = torch.rand(x.shape, device=device)
    for rounding in ("nearest", "stochastic"):
        a = fake_quantise(x, 8, rounding, backend="reference", noise=u)
        b = fake_quantise(x, 8, rounding, backend="triton", noise=u)
        assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)


def _hard_amaxes() -> torch.Tensor:
    """Values where an exponent rule slips: subnormals, powers of two, the float32 extremes,
    and the grid boundaries qmax * 2**k of every word length with their neighbours."""
    tiny = torch.tensor([1, 2, 3, 0x7FFFFF, 0x800000, 0x800001], dtype=torch.int32).view(torch.float32)
    powers = torch.ldexp(torch.ones(60), torch.linspace(-140, 127, 60).round().int())
    edges = []
    for b in range(2, 25):
        q = torch.tensor(float(2 ** (b - 1) - 1))
        for k in (-100, -7, 0, 5, 90):
            v = torch.ldexp(q, torch.tensor(k))
            edges += [v, torch.nextafter(v, torch.tensor(0.0)), torch.nextafter(v, torch.tensor(float("inf")))]
    big = torch.tensor([torch.finfo(torch.float32).max, 1.7e38, 0.1, 1.0, 3.0, 0.0])
    return torch.cat([tiny, powers, torch.stack(edges), big, torch.rand(50) * 10.0 ** torch.randint(-30, 30, (50,))])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 8, 12, 16, 24])
def test_in_kernel_exponent_equals_the_host_rule(bits, device):
    """The quantise kernel derives s from max |x| in integer arithmetic; oracle: the float64
    rule ``exponent_from_amax`` on the same maxima (one row per value, per-row exponents),
    exactly, at the float32 extremes and every word length's grid boundaries."""
    from muppet_fx.kernels.quantise import MAX_EXPONENT, exponent_from_amax, quantise_triton

    amax = _hard_amaxes()
    x = torch.stack([amax, -amax / 3, amax * 0], dim=1)  # the row's max |x| is amax
    _, s, _, bad = quantise_triton(x.to(device), bits, "nearest", axis=0)
    assert not bad.any()
    assert torch.equal(s.cpu(), exponent_from_amax(amax, bits, MAX_EXPONENT[torch.float32]))


if HAS_TRITON:
    import triton
    import triton.language as tl

    from muppet_fx.kernels.quantise import pow2_f32

    @triton.jit
    def _pow2_kernel(k_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        k = tl.load(k_ptr + offs, mask=offs < N, other=0)
        tl.store(out_ptr + offs, pow2_f32(k), mask=offs < N)


@pytest.mark.parametrize("device", DEVICES)
def test_pow2_from_bits_is_exact(device):
    """``pow2_f32(k)`` against ``torch.ldexp(1, k)``: exact for every k in -200..300, subnormals,
    0 below 2**-149 and inf above 2**127 included."""
    k = torch.arange(-200, 301, dtype=torch.int64, device=device)
    out = torch.empty(k.shape, dtype=torch.float32, device=device)
    _pow2_kernel[(1,)](k, out, k.numel(), BLOCK=512)
    assert torch.equal(out, torch.ldexp(torch.ones(k.shape, dtype=torch.float64, device=device), k).float())


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_marks_nonfinite_rows(device):
    """``mark_nonfinite``: the rows holding NaN or inf report NONFINITE_EXPONENT (what the
    training ops pass on, so the layer's output turns non-finite); the other rows keep the
    reference exponent."""
    from muppet_fx.kernels.quantise import NONFINITE_EXPONENT, quantise_triton

    x = torch.randn(4, 9, device=device)
    x[1, 3], x[3, 0] = float("nan"), float("-inf")
    _, s, _, none = quantise_triton(x, 8, "nearest", axis=0, mark_nonfinite=True)
    _, s_plain, _, bad = quantise_triton(x, 8, "nearest", axis=0)
    assert none is None
    assert bad.tolist() == [False, True, False, True]
    assert s.tolist() == [s_plain[0].item(), NONFINITE_EXPONENT, s_plain[2].item(), NONFINITE_EXPONENT]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_scale_kernel_dequantises_exactly(dtype, device):
    """``scale_triton``: mantissas (or accumulators) times ``2**-(s_a + s_b)``, laid out like
    the input (channels-last kept); oracle: ``scale_pow2`` on the float32 conversion (what the
    routes did with torch ops), bit for bit, for normal, subnormal and overflowing scales."""
    from muppet_fx.kernels.quantise import scale_pow2, scale_triton

    m = torch.randint(-100, 101, (2, 3, 5, 7), dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    for s_a, s_b in ((7, None), (-20, 150), (140, 9), (-100, -60)):
        sa = torch.tensor(s_a, dtype=torch.int32, device=device)
        sb = None if s_b is None else torch.tensor(s_b, dtype=torch.int32, device=device)
        got = scale_triton(m, sa, sb)
        want = scale_pow2(m.float(), -(sa + (0 if sb is None else sb)))
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="dense"):
        scale_triton(m[:, :, ::2], torch.tensor(1))


@pytest.mark.parametrize("device", DEVICES)
def test_seed_read_from_a_device_tensor(device):
    """A one-element int64 seed tensor rounds exactly as the same integer seed does (64-bit
    seeds included), and the kernel reads the tensor's value at launch: refilling the same
    tensor in place, as a CUDA graph's replay of the seed draw does, changes the draws."""
    from muppet_fx.kernels.quantise import quantise_triton

    x = torch.randn(3, 129, device=device)
    seed = torch.empty(1, dtype=torch.int64, device=device)
    outs = []
    for k in (11, 2**40 + 5):
        seed.fill_(k)
        got = quantise_triton(x, 6, "stochastic", seed=seed)[0]
        assert torch.equal(got, quantise_triton(x, 6, "stochastic", seed=k)[0])
        outs.append(got)
    assert not torch.equal(*outs)
    with pytest.raises(ValueError, match="int32 of 1 elements"):
        quantise_triton(x, 6, "stochastic", seed=seed.int())


@pytest.mark.parametrize("device", DEVICES)
def test_training_seeds_drawn_on_the_device(device):
    """Without a seed or generator, the Triton path draws its seed on the tensor's device from
    torch's generator: reproducible under torch.manual_seed, fresh per call, and not drawn at
    all for nearest rounding (torch's stream left where it was)."""
    from muppet_fx.numerics import _triton_seed

    torch.manual_seed(5)
    a, b = _triton_seed(None, None, "stochastic", torch.device(device)), _triton_seed(None, None, "stochastic", device)
    torch.manual_seed(5)
    assert a.dtype == torch.int64 and a.shape == (1,) and a.device.type == torch.device(device).type
    assert torch.equal(a, _triton_seed(None, None, "stochastic", device)) and not torch.equal(a, b)
    before = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
    assert _triton_seed(None, None, "nearest", device) == 0
    assert torch.equal(before, torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state())
    assert _triton_seed(7, None, "stochastic", device) == 7  # given seeds stay host integers
