"""Quantiser contract (SPEC section 1). Oracle: exact float64 arithmetic on the spec's rules."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from muppet_fx import QTensor, fake_quantise, quantise
from muppet_fx.kernels.quantise import MAX_EXPONENT, exponent_from_amax
from muppet_fx.kernels.quantise_cpu import host_exponent

ROUNDINGS = ["nearest", "stochastic"]
HOST_BACKENDS = ["reference", "cpu"]
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
tensors = st.lists(f32, min_size=1, max_size=40).map(lambda v: torch.tensor(v, dtype=torch.float32))
bits_any = st.integers(2, 24)


def _exact(x, bits, s):
    """Spec oracle on the host: amax*2**s <= qmax < amax*2**(s+1) unless s hit the cap or amax==0."""
    qmax = 2 ** (bits - 1) - 1
    amax = max((abs(v) for v in x.tolist()), default=0.0)
    if amax == 0.0:
        return s == 0
    fits = math.ldexp(amax, s) <= qmax
    maximal = s == MAX_EXPONENT[torch.float32] or math.ldexp(amax, s + 1) > qmax
    return fits and maximal


@settings(max_examples=300, deadline=None)
@given(x=tensors, bits=bits_any, rounding=st.sampled_from(ROUNDINGS),
       backend=st.sampled_from(HOST_BACKENDS), seed=st.integers(0, 2**31))
def test_mantissa_range_exponent_and_error(x, bits, rounding, backend, seed):
    """Mantissas are integers in [-qmax, qmax]; the exponent is maximal; error <= 1/2 ulp
    (nearest) or < 1 ulp (stochastic); dequantise == fake_quantise; dtype per word length."""
    g = torch.Generator().manual_seed(seed)
    q = quantise(x, bits, rounding, generator=g, backend=backend)
    qmax = 2 ** (bits - 1) - 1
    m = q.mantissa.to(torch.int64)
    assert q.mantissa.dtype == (torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32)
    assert int(m.abs().max()) <= qmax
    assert _exact(x, bits, q.exponent)
    err = (q.dequantise().double() - x.double()).abs()
    ulp = 2.0 ** -q.exponent
    if rounding == "nearest":
        assert float(err.max()) <= ulp / 2
    else:
        assert float(err.max()) < ulp
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(fake_quantise(x, bits, rounding, generator=g, backend=backend), q.dequantise())


@settings(max_examples=200, deadline=None)
@given(x=tensors, bits=bits_any, rounding=st.sampled_from(ROUNDINGS))
def test_idempotent_and_on_grid_fixed(x, bits, rounding):
    """fq(fq(x)) == fq(x): values on the grid are returned exactly by both roundings.

    Excluded: |x| within a factor of two of float32's largest value, where the top grid point
    overflows and the value saturates off the grid (see test_saturation)."""
    assume(float(x.abs().max()) < 2.0**126)
    y = fake_quantise(x, bits, rounding)
    assert torch.equal(fake_quantise(y, bits, rounding), y)
    assert torch.equal(fake_quantise(y, bits, "stochastic"), y)


@settings(max_examples=200, deadline=None)
@given(x=tensors, bits=bits_any, backend=st.sampled_from(HOST_BACKENDS))
def test_nearest_sign_symmetric_and_monotone(x, bits, backend):
    """Round half to even is odd-symmetric and order preserving within one tensor."""
    y = fake_quantise(x, bits, "nearest", backend=backend)
    assert torch.equal(fake_quantise(-x, bits, "nearest", backend=backend), -y)
    xs, order = torch.sort(x)
    ys = fake_quantise(xs, bits, "nearest", backend=backend)
    assert bool((ys[1:] >= ys[:-1]).all())
    assert torch.equal(ys, y[order])


@settings(max_examples=100, deadline=None)
@given(m=st.lists(st.integers(-127, 127), min_size=1, max_size=30), s=st.integers(-20, 40),
       bits=st.integers(8, 24))
def test_on_grid_values_unchanged_by_stochastic(m, s, bits):
    """x = m * 2**-s with |m| <= 127 lies on every grid of >= 8 bits that covers it."""
    x = torch.tensor([math.ldexp(v, -s) for v in m], dtype=torch.float32)
    assert torch.equal(fake_quantise(x, bits, "stochastic"), x)


def test_nearest_ties_to_even():
    """v = k + 0.5 rounds to the even neighbour (torch.round semantics)."""
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.5])  # amax 127 -> s = 0 at 8 bits
    for backend in HOST_BACKENDS:
        q = quantise(x, 8, "nearest", backend=backend)
        assert q.exponent == 0
        assert q.mantissa.tolist() == [127, 0, 2, 2, 0, -2, 4]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_stochastic_unbiased(backend, bits):
    """E[m] = v: over N draws the mean mantissa is within 6 standard errors of v."""
    qmax = 2 ** (bits - 1) - 1
    v = torch.tensor([qmax, 0.3, -0.7, 0.5, qmax - 0.01, 0.001, -qmax + 0.25], dtype=torch.float32)
    n = 20000
    x = v.repeat(n)  # amax = qmax -> s = 0, so v is the scaled value itself
    g = torch.Generator().manual_seed(1)
    q = quantise(x, bits, "stochastic", generator=g, backend=backend)
    assert q.exponent == 0
    mean = q.mantissa.double().view(n, -1).mean(0)
    frac = v.double() - v.double().floor()
    bound = 6 * torch.sqrt(frac * (1 - frac) / n) + 1e-12
    assert bool(((mean - v.double()).abs() <= bound).all()), (mean, v)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_zero_and_empty(backend):
    z = torch.zeros(5)
    q = quantise(z, 8, backend=backend)
    assert q.exponent == 0 and q.mantissa.tolist() == [0] * 5
    assert quantise(torch.zeros(0), 8, backend=backend).mantissa.numel() == 0


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_non_finite(backend, rounding):
    """NaN/inf pass through fake_quantise; the finite entries use the finite amax; quantise raises."""
    x = torch.tensor([float("nan"), 1.0, float("inf"), -0.3, float("-inf")])
    y = fake_quantise(x, 8, rounding, backend=backend)
    assert math.isnan(y[0]) and y[2] == float("inf") and y[4] == float("-inf")
    ref = fake_quantise(torch.tensor([1.0, -0.3]), 8, "nearest")
    if rounding == "nearest":
        assert torch.equal(y[[1, 3]], ref)
    with pytest.raises(ValueError, match="non-finite"):
        quantise(x, 8, rounding, backend=backend)


@pytest.mark.parametrize("dtype,bits,tiny", [(torch.float32, 24, 1e-45), (torch.float16, 11, 6e-8),
                                              (torch.bfloat16, 8, 1e-38)])
def test_dtype_limits_tiny_and_huge(dtype, bits, tiny):
    """At the largest word length the grid is exact in the dtype; tiny and huge tensors stay finite."""
    x = (torch.randn(64) * 3).to(dtype)
    for backend in HOST_BACKENDS:
        y = fake_quantise(x, bits, "nearest", backend=backend)
        assert y.dtype == dtype
        q = quantise(x, bits, "nearest", backend=backend)
        assert torch.equal(q.mantissa.double() * 2.0 ** -q.exponent, y.double())  # exact in dtype
        t = fake_quantise(torch.tensor([tiny, -tiny / 2], dtype=dtype), 2, "stochastic", backend=backend)
        assert bool(torch.isfinite(t).all())
        big = torch.tensor([torch.finfo(dtype).max, 1.0], dtype=dtype)
        for b in (2, bits):
            assert bool(torch.isfinite(fake_quantise(big, b, "nearest", backend=backend)).all())
    assert quantise(torch.tensor([tiny], dtype=dtype), bits).exponent <= MAX_EXPONENT[dtype]


def test_per_channel():
    """axis=0: each slice gets the exponent it would get alone."""
    w = torch.randn(6, 3, 3) * torch.logspace(-3, 3, 6).view(6, 1, 1)
    q = quantise(w, 8, "nearest", axis=0)
    assert q.exponent.shape == (6,)
    for c in range(6):
        alone = quantise(w[c], 8, "nearest")
        assert int(q.exponent[c]) == alone.exponent
        assert torch.equal(q.mantissa[c], alone.mantissa)
    assert torch.equal(fake_quantise(w, 8, "nearest", axis=0), q.dequantise())
    q1 = quantise(w, 8, "nearest", axis=-1)
    assert q1.axis == 2 and q1.exponent.shape == (3,)


def test_generator_reproducible():
    x = torch.randn(1000)
    for backend in HOST_BACKENDS:
        a = fake_quantise(x, 6, generator=torch.Generator().manual_seed(3), backend=backend)
        b = fake_quantise(x, 6, generator=torch.Generator().manual_seed(3), backend=backend)
        c = fake_quantise(x, 6, generator=torch.Generator().manual_seed(4), backend=backend)
        assert torch.equal(a, b) and not torch.equal(a, c)


@settings(max_examples=100, deadline=None)
@given(x=tensors, bits=bits_any, rounding=st.sampled_from(ROUNDINGS))
def test_fast_cpu_matches_reference(x, bits, rounding):
    """The fast CPU path equals the reference exactly given the same uniform draws."""
    u = torch.rand(x.shape)
    a = quantise(x, bits, rounding, backend="reference", noise=u)
    b = quantise(x, bits, rounding, backend="cpu", noise=u)
    assert a.exponent == b.exponent and torch.equal(a.mantissa, b.mantissa)


@settings(max_examples=200, deadline=None)
@given(a=f32.map(abs), bits=bits_any)
def test_host_and_tensor_exponent_rules_agree(a, bits):
    t = torch.tensor([a], dtype=torch.float32)
    assert int(exponent_from_amax(t, bits, 149)[0]) == host_exponent(float(t[0]), bits, 149)


@pytest.mark.parametrize("call", [quantise, fake_quantise])
def test_bad_arguments(call):
    x = torch.randn(4)
    for bits in (1, 25, 0, 8.0, True, "8"):
        with pytest.raises(ValueError, match=r"\[2, 24\]"):
            call(x, bits)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        call(x.bfloat16(), 9)
    with pytest.raises(ValueError, match=r"\[2, 11\]"):
        call(x.half(), 12)
    with pytest.raises(ValueError, match="nearest.*stochastic"):
        call(x, 8, "truncate")
    with pytest.raises(TypeError, match="int64"):
        call(torch.arange(4), 8)
    with pytest.raises(TypeError, match="list"):
        call([1.0], 8)
    with pytest.raises(ValueError, match="axis=3"):
        call(x, 8, axis=3)
    with pytest.raises(ValueError, match="backend='gpu'"):
        call(x, 8, backend="gpu")
    with pytest.raises(ValueError, match="noise has shape"):
        call(x, 8, noise=torch.rand(3))


def test_qtensor_is_public_and_frozen():
    q = quantise(torch.tensor([1.0]), 8)
    assert isinstance(q, QTensor)
    with pytest.raises(Exception):
        q.bits = 4


def test_cpu_kernel_thread_count_independent():
    """Draws seeded per block: the same seed gives the same result with 1 or 2 threads."""
    from muppet_fx.kernels.quantise_cpu import c_kernel_available

    if not c_kernel_available():
        pytest.skip("no C compiler: the cpu backend runs the reference route")
    x = torch.randn(200_003)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = quantise(x, 8, seed=5, backend="cpu").mantissa
        torch.set_num_threads(2)
        b = quantise(x, 8, seed=5, backend="cpu").mantissa
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)
    assert not torch.equal(a, quantise(x, 8, seed=6, backend="cpu").mantissa)


@pytest.mark.parametrize("seeds", [(5, 6), (1, 2**32 + 1), (7, 7 + 2**40)])
def test_cpu_draws_unbiased_and_uncorrelated(seeds):
    """Values halfway between grid points round up with probability 1/2: over 2**20 elements
    (across many of the kernel's 2048-element blocks) the up-rate, the correlation of
    neighbours and the correlation between two seeds (differing in low or only in high
    words) stay within 6 standard errors of 1/2, 0 and 0."""
    from muppet_fx.kernels.quantise_cpu import c_kernel_available

    if not c_kernel_available():
        pytest.skip("no C compiler: the cpu backend runs the reference route")
    n = 2**20
    x = torch.full((n,), 0.5)
    x[0] = 127.0  # sets the exponent to 0, so 0.5 is the scaled value itself
    up = [quantise(x, 8, seed=s, backend="cpu").mantissa[1:].double() for s in seeds]
    se = 6 / (n - 1) ** 0.5
    for u in up:
        assert abs(u.mean().item() - 0.5) <= 0.5 * se
        assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) <= se
    assert abs(torch.corrcoef(torch.stack(up))[0, 1].item()) <= se


@pytest.mark.parametrize("seed", [3, 2**40 + 11])
def test_cpu_uniforms_are_uniform_and_pairwise_independent(seed):
    """The draws themselves, read to 4 bits: with one seed, values at the fractions k/16 round
    up exactly where u < k/16, so the count of fractions an element rounds down at is
    floor(16 u). Over 2**18 elements those bins must pass a chi-square test (15 degrees of
    freedom), and so must the joint bins of element pairs (255 degrees) at the lags where the
    generators could repeat themselves: the next element, the same generator's next output
    (32 apart), the same generator of the next 2048-element block, and a far block."""
    from muppet_fx.kernels.quantise_cpu import c_kernel_available

    if not c_kernel_available():
        pytest.skip("no C compiler: the cpu backend runs the reference route")
    n = 2**18
    bins = torch.zeros(n - 1, dtype=torch.long)
    for k in range(1, 16):
        x = torch.full((n,), k / 16)
        x[0] = 127.0  # exponent 0: the scaled value is the fraction itself
        bins += 1 - quantise(x, 8, seed=seed, backend="cpu").mantissa[1:].long()

    def chi2(counts):
        expected = counts.sum() / counts.numel()
        return (((counts.double() - expected) ** 2) / expected).sum().item()

    assert chi2(torch.bincount(bins, minlength=16)) < 15 + 8 * (2 * 15) ** 0.5
    for lag in (1, 32, 2048, 2048 * 37 + 5):
        pair = bins[:-lag] * 16 + bins[lag:]
        assert chi2(torch.bincount(pair, minlength=256)) < 255 + 8 * (2 * 255) ** 0.5, lag


def test_cpu_backend_without_compiler(monkeypatch):
    """With no C library the cpu backend takes the reference route and gives its results."""
    from muppet_fx.kernels import quantise_cpu

    monkeypatch.setattr(quantise_cpu, "_lib", False)
    x = torch.randn(33, 7)
    assert torch.equal(fake_quantise(x, 8, "nearest", backend="cpu"),
                       fake_quantise(x, 8, "nearest", backend="reference"))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_saturation(backend):
    """Near float32's largest value the top grid point 2**128 overflows: such values saturate at
    the largest finite float, within the error bound of their rounding mode, and stay put under
    nearest rounding."""
    fmax = torch.finfo(torch.float32).max
    x = torch.tensor([-fmax, 1.0, 1.7014120e38])
    for bits in (2, 24):
        q = quantise(x, bits, "nearest", backend=backend)
        y = fake_quantise(x, bits, "nearest", backend=backend)
        assert bool(torch.isfinite(y).all())
        assert float((y.double() - x.double()).abs().max()) <= 2.0 ** -q.exponent / 2
        assert torch.equal(fake_quantise(y, bits, "nearest", backend=backend), y)
        ys = fake_quantise(x, bits, "stochastic", backend=backend)
        assert bool(torch.isfinite(ys).all())


@pytest.mark.parametrize("dtype,q", [(torch.int8, 127), (torch.int16, 32767)])
def test_cpu_dequantise_exact_and_layout_kept(dtype, q):
    """One fused pass: float32 ``m * 2**e`` exactly, channels-last kept; ``None`` (the caller's
    torch fallback) for a scale outside float32's normal range or a strided view."""
    from muppet_fx.kernels.quantise_cpu import c_kernel_available, dequantise_cpu
    if not c_kernel_available():
        pytest.skip("no C compiler")
    m = torch.randint(-q, q + 1, (3, 5, 7, 9), dtype=dtype).contiguous(memory_format=torch.channels_last)
    m[0, 0, 0, 0] = -q - 1
    for e in (-126, -20, 0, 9, 126):
        y = dequantise_cpu(m, e)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, m.double().mul(2.0**e).float())
    assert dequantise_cpu(m, 127) is None and dequantise_cpu(m, -127) is None
    assert dequantise_cpu(m[:, :, ::2], 0) is None
    assert dequantise_cpu(m.double(), 0) is None


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cpu_dequantise_accumulators_round_as_torch_converts(dtype):
    """int32 and int64 GEMM accumulators beyond 2**24 round to float32 as ``Tensor.float()``
    rounds them (to nearest, ties to even)."""
    from muppet_fx.kernels.quantise_cpu import c_kernel_available, dequantise_cpu
    if not c_kernel_available():
        pytest.skip("no C compiler")
    top = 2**31 if dtype == torch.int32 else 2**62
    acc = torch.randint(-top, top - 1, (4, 6, 5, 7), dtype=dtype).contiguous(memory_format=torch.channels_last)
    acc[0, 0, 0, 0] = -top
    acc[0, 0, 0, 1] = 2**25 + 2  # halfway between two float32 neighbours: rounds to the even one
    for e in (-40, 0, 3):
        y = dequantise_cpu(acc, e)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, torch.ldexp(acc.float(), torch.tensor(float(e))))


@pytest.mark.parametrize("bits,rounding", [(12, "stochastic"), (16, "nearest"), (8, "stochastic")])
def test_quantise_values_equal_quantise_then_dequantise(bits, rounding):
    """The values written in the quantiser's pass are ``m * 2**-s`` exactly, with the same
    mantissas and draws as :func:`quantise_parts` (same generator state), channels-last kept,
    tiny and huge tensors (scales outside float32's normal range) included; per-channel and
    NaN/inf inputs follow the same rules (non-finite exponent, NaN/inf passed through)."""
    from muppet_fx.numerics import NONFINITE_EXPONENT, quantise_parts, quantise_values
    from muppet_fx.routes import dequantise
    for scale in (1.0, 2.0**-130, 2.0**100):
        x = (torch.randn(4, 6, 5, 3) * scale).contiguous(memory_format=torch.channels_last)
        torch.manual_seed(3)
        m_ref, s_ref = quantise_parts(x, bits, rounding)
        torch.manual_seed(3)
        m, s, v = quantise_values(x, bits, rounding)
        assert torch.equal(m, m_ref) and torch.equal(s, s_ref)
        assert v.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(v, dequantise(m_ref, s_ref))
        torch.manual_seed(3)
        none, _, v2 = quantise_values(x, bits, rounding, mantissa=False)
        assert none is None and torch.equal(v2, v)
    w = torch.randn(5, 3, 3, 3)
    m, s, v = quantise_values(w, bits, "nearest", axis=0)
    assert s.shape == (5,) and torch.equal(v, dequantise(m, s, 0))
    x[0, 1, 2, 0], x[1, 0, 0, 1] = float("nan"), float("inf")
    m, s, v = quantise_values(x, bits, rounding)
    assert int(s) == NONFINITE_EXPONENT
    assert torch.isnan(v[0, 1, 2, 0]) and v[1, 0, 0, 1] == float("inf")
    finite = torch.isfinite(x)
    step = 2.0 ** -quantise(x[finite], bits, "nearest").exponent
    err = (v[finite].double() - x[finite].double()).abs().max()
    assert err < (step if rounding == "stochastic" else step / 2 + 1e-300)
    assert torch.equal(v[finite] / step, (v[finite] / step).round())  # on the finite entries' grid


def _special_values(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 3
    x[::97] = -0.0
    x[5::101] = 0.0
    return x


def test_kernels_that_write_a_tensor_record_its_absmax_exactly():
    """ReLU and both batch-norm passes gather ``absmax_bits`` of what they write (the value the
    quantiser's own scan returns, infinities and NaN included), on odd sizes and both layouts."""
    from muppet_fx.kernels import batch_norm_cpu, quantise_cpu, relu_cpu

    lib = quantise_cpu._library()
    if lib is None or relu_cpu._library() is None or batch_norm_cpu._library() is None:
        pytest.skip("no C compiler")

    def scan(t):
        return lib.absmax_bits(t.data_ptr(), t.numel(), torch.get_num_threads())

    for n, special in ((40_001, None), (1_003, float("inf")), (70_001, float("nan"))):
        x = _special_values(n, n)
        if special is not None:
            x[n // 2] = special
        y, _ = relu_cpu.relu_with_mask(x)
        assert y._muppet_absmax == (y._version, scan(y))
    gen = torch.Generator().manual_seed(3)
    for shape, cl in (((3, 16, 7, 7), True), ((5, 24, 3, 3), True), ((2, 3, 16, 17), False)):
        m = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
        m = m.contiguous(memory_format=torch.channels_last) if cl else m
        w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
        for relu in (False, True):
            y, mean, invstd, *_ = batch_norm_cpu.batch_norm_forward(m, -7, w, b, None, None, 0.1, 1e-5, relu)
            assert y._muppet_absmax[1] == scan(y)
        g = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last if cl else
                                                          torch.contiguous_format)
        gx, _, _ = batch_norm_cpu.batch_norm_backward(g, m, -7, mean, invstd, w, (True, True, True))
        assert gx._muppet_absmax[1] == scan(gx)


def test_quantiser_takes_a_recorded_absmax_only_while_the_tensor_is_unchanged():
    from muppet_fx.kernels.quantise_cpu import c_kernel_available, quantise_cpu, remember_absmax

    if not c_kernel_available():
        pytest.skip("no C compiler")
    x = torch.randn(5_001)
    want = quantise_cpu(x, 8, "stochastic", seed=3)
    remember_absmax(x, 0x3F800000)  # claims max |x| = 1.0: the exponent follows the claim
    m, s, _, _ = quantise_cpu(x, 8, "stochastic", seed=3)
    assert int(s) == 6 and int(s) != int(want[1])
    x.mul_(1.0)  # an in-place change voids the record
    m, s, _, _ = quantise_cpu(x, 8, "stochastic", seed=3)
    assert torch.equal(m, want[0]) and torch.equal(s, want[1])
    remember_absmax(x, 0x3F800000)
    quantise_cpu(x, 8, "nearest", want_values=True, out=x)  # overwritten in place by the kernel
    assert x._muppet_absmax is None


@pytest.mark.parametrize("shape, layout", [((7, 33), None), ((1, 5), None), ((5000, 3), None), ((3, 70001), None),
                                           ((300_000, 1), None), ((140_001, 2), None),
                                           ((6, 16, 9, 11), torch.channels_last)])
@pytest.mark.parametrize("bits, rounding", [(8, "stochastic"), (12, "nearest"), (16, "stochastic")])
def test_cpu_quantiser_gathers_exact_column_sums(shape, layout, bits, rounding):
    """The bias gradient's sums, gathered by the quantising pass: exactly the int64 sums of the
    mantissas it wrote over every dimension but the one running fastest in memory (rows of a
    2-d tensor crossing the kernel's 2048-element blocks; a channels-last map's channels),
    whatever the thread count; the mantissas themselves unchanged."""
    from muppet_fx.kernels.quantise_cpu import c_kernel_available, quantise_cpu

    if not c_kernel_available():
        pytest.skip("no C compiler: the sums come from the separate reduction")
    x = torch.randn(shape) * 3
    x.view(-1)[: x.numel() // 2] = 3.0  # same-sign runs at the largest mantissa: int32 partial sums must fold
    x = x.contiguous(memory_format=layout) if layout else x
    keep = 1 if layout else x.dim() - 1
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            sums = torch.empty(shape[keep], dtype=torch.int64)
            m, s, _, bad = quantise_cpu(x, bits, rounding, seed=5, sums=sums)
            plain, s2, _, _ = quantise_cpu(x, bits, rounding, seed=5)
            assert bad is False and torch.equal(m, plain) and int(s) == int(s2)
            dims = [d for d in range(x.dim()) if d != keep]
            assert torch.equal(sums, m.to(torch.int64).sum(dims))
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="column sums need a dense x holding rows of 4 values"):
        quantise_cpu(torch.randn(3, 5), 8, "nearest", sums=torch.empty(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at most 16 bits"):  # int32 partial sums
        quantise_cpu(torch.randn(3, 4), 20, "nearest", sums=torch.empty(4, dtype=torch.int64))


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_quantising_on_a_guessed_absmax_equals_the_scan(bits):
    """A tensor carrying an absmax guess (``forget_absmax(t, hint=True)``, what the compiled
    ops return) is quantised in one pass on the guessed exponent while that pass gathers the
    true absmax; a guess whose exponent is wrong (too large, too small: a buffer Inductor
    reused) is redone. Every output, the column sums included, equals the scan's bit for bit,
    and a NaN present still takes the reference route."""
    from muppet_fx.kernels import quantise_cpu

    lib = quantise_cpu._library()
    if lib is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(5)
    for shape, scale in (((3, 16, 7, 9), 1.0), ((70_001,), 3e-3), ((33, 129), 1e4)):
        x = torch.randn(shape, generator=gen) * scale
        true_top = lib.absmax_bits(x.data_ptr(), x.numel(), 1)
        cols = shape[-1] if len(shape) == 2 else 0
        for rounding in ("stochastic", "nearest"):
            def run(guess):
                t = x.clone()
                if guess is not None:
                    quantise_cpu.remember_absmax(t, guess)
                    quantise_cpu.forget_absmax(t, hint=True)
                    assert quantise_cpu._hinted_absmax(t) == guess
                sums = torch.empty(cols, dtype=torch.int64) if cols and bits <= 16 else None
                m, s, v, bad = quantise_cpu.quantise_cpu(t, bits, rounding, seed=11, want_values=True, sums=sums)
                return m, int(s), v, bad, sums

            want = run(None)
            for guess in (true_top, true_top + (1 << 23), true_top - (3 << 23), 0x3F800000):
                got = run(guess)  # right, twice too large, 8x too small, 1.0
                assert got[1] == want[1] and got[3] is want[3] is False, (shape, rounding, guess)
                assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
                assert (got[4] is None) == (want[4] is None) and (got[4] is None or torch.equal(got[4], want[4]))
    x = torch.randn(1000, generator=gen)
    x[17] = float("nan")
    quantise_cpu.remember_absmax(x, 0x3F800000)  # a stale guess that misses the NaN
    quantise_cpu.forget_absmax(x, hint=True)
    _, _, v, bad = quantise_cpu.quantise_cpu(x, bits, "nearest", want_mantissa=False, want_values=True)
    assert bool(bad) and torch.isnan(v[17]) and torch.equal(v.isnan(), x.isnan())
