"""Implicit-GEMM Triton convolution against int64 references (TRITON_INTERPRET=1 without a GPU).

Integer sums are exact, so every comparison is equality.
"""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from muppet_fx.kernels import conv_triton
from muppet_fx.kernels.conv_triton import (conv2d_grad_input_int, conv2d_grad_input_int_reference,
                                           conv2d_grad_weight_int, conv2d_grad_weight_int_reference,
                                           conv2d_int, conv2d_int_reference, division_magic, pixel_split)
from muppet_fx.kernels.gemm_cpu import CHUNK
from muppet_fx.kernels.quantise import HAS_TRITON

from .conftest import DEVICES

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# (N, C, H, W, Cout, kernel, stride, padding, dilation): odd sizes, strides, dilation, 1x1
CASES = [
    (1, 1, 1, 1, 1, 1, 1, 0, 1),
    (2, 3, 7, 9, 5, 3, 1, 1, 1),
    (1, 33, 5, 6, 7, 3, 2, 1, 1),
    (3, 7, 11, 8, 33, (3, 1), (2, 1), (1, 0), 1),
    (1, 5, 9, 9, 4, 3, 1, 2, 2),
    (2, 40, 4, 5, 3, 1, 2, 0, 1),
]


def _operands(case, device, channels_last):
    n, c, h, w, cout, k, stride, pad, dil = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randint(-127, 128, (n, c, h, w), dtype=torch.int8, device=device)
    wt = torch.randint(-127, 128, (cout, c, kh, kw), dtype=torch.int8, device=device)
    if channels_last:
        x, wt = (t.contiguous(memory_format=torch.channels_last) for t in (x, wt))
    return x, wt, (stride, pad, dil)


def _output_grad(x, w, geometry, channels_last):
    """Random int8 mantissas shaped like the convolution's output."""
    g = torch.randint(-127, 128, conv2d_int_reference(x, w, *geometry).shape, dtype=torch.int8,
                      device=x.device)
    return g.contiguous(memory_format=torch.channels_last) if channels_last else g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_exact(device, case, channels_last):
    x, w, geometry = _operands(case, device, channels_last)
    y = conv2d_int(x, w, *geometry)
    assert y.dtype == torch.int32 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.long(), conv2d_int_reference(x, w, *geometry))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_grad_input_exact(device, case, channels_last):
    x, w, geometry = _operands(case, device, channels_last)
    g = _output_grad(x, w, geometry, channels_last)
    gx = conv2d_grad_input_int(g, w, x.shape, *geometry)
    assert gx.shape == x.shape
    assert torch.equal(gx.long(), conv2d_grad_input_int_reference(g, w, x.shape, *geometry))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    (2, 6, 10, 11, 5, 5, 3, 2, 1),  # stride 3, 5x5: phases with 2 or 1 taps per side, offset sources
    (1, 3, 2, 7, 4, 3, 4, 1, 1),  # stride 4 past the input's 2 rows: phases without pixels
    (1, 4, 8, 8, 3, 3, 2, 0, 2),  # dilated: one pass over every tap
])
def test_grad_input_strided_phases_exact(device, case):
    """A strided grad-input runs one stride-1 sum per phase of the input (rows a::s, columns
    b::s) over that phase's taps; scaled, each phase keeps the epilogue's exact result."""
    x, w, geometry = _operands(case, device, True)
    g = _output_grad(x, w, geometry, True)
    ref = conv2d_grad_input_int_reference(g, w, x.shape, *geometry)
    assert torch.equal(conv2d_grad_input_int(g, w, x.shape, *geometry).long(), ref)
    s = (torch.tensor(3, dtype=torch.int32, device=device), torch.tensor(-5, dtype=torch.int32, device=device))
    assert torch.equal(conv2d_grad_input_int(g, w, x.shape, *geometry, scale=s), conv_triton._epilogue_reference(ref, s, None))


@pytest.mark.parametrize("device", DEVICES)
def test_sums_beyond_fp32_integers_stay_exact(device):
    # 64 channels x 9 taps of 127*127 = 9.3e6 < 2**24 per sign; all-max operands reach 9.3e6 and
    # a float32 route would still be exact, so use 300 channels: 4.4e7 > 2**24 needs int32
    x = torch.full((1, 300, 3, 3), 127, dtype=torch.int8, device=device)
    w = torch.full((2, 300, 3, 3), -127, dtype=torch.int8, device=device)
    w[1] = 127
    y = conv2d_int(x, w, 1, 1)
    ref = conv2d_int_reference(x, w, 1, 1)
    assert ref.abs().max() > 2**24 and torch.equal(y.long(), ref)


def test_bad_input_is_named():
    x = torch.zeros(1, 3, 4, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        conv2d_int(x.float(), torch.zeros(2, 3, 1, 1, dtype=torch.int8))
    with pytest.raises(ValueError, match="3 channels, weight expects 4"):
        conv2d_int(x, torch.zeros(2, 4, 1, 1, dtype=torch.int8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mma", ["int8", "fp16"])
def test_grad_weight_exact(device, case, channels_last, mma):
    x, w, geometry = _operands(case, device, channels_last)
    g = _output_grad(x, w, geometry, channels_last)
    gw = conv2d_grad_weight_int(g, x, w.shape, *geometry, mma=mma)
    assert gw.shape == w.shape and gw.dtype == torch.int32
    assert torch.equal(gw.long(), conv2d_grad_weight_int_reference(g, x, w.shape, *geometry))


@pytest.mark.parametrize("device", DEVICES)
def test_grad_weight_on_fp16_mma_exact_past_float32_integers(device):
    """FP16 products summed in FP32 are exact only below 2**24: 6000 pixels of products near
    +127 * 127 sum to about 8e7, where a float32 running sum rounds; the kernel adds runs of
    1024 pixels (at most 1024 * 128**2 = 2**24) to an int32 sum, so the result is exact.
    -128 x -128 everywhere reaches the bound."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(100, 128, (3, 1, 2, 1000), dtype=torch.int8, generator=gen).to(device)
    g = torch.randint(100, 128, (3, 1, 2, 1000), dtype=torch.int8, generator=gen).to(device)
    want = (g.long() * x.long()).sum().item()
    assert want > 2**26
    assert conv2d_grad_weight_int(g, x, (1, 1, 1, 1), mma="fp16").item() == want
    x = torch.full((3, 1, 1, 1000), -128, dtype=torch.int8, device=device)
    assert conv2d_grad_weight_int(x, x, (1, 1, 1, 1), mma="fp16").item() == 3000 * 128 * 128
    with pytest.raises(ValueError, match=r"mma='bf16'.*choose one of \('int8', 'fp16'\)"):
        conv2d_grad_weight_int(g, x, (1, 1, 1, 1), mma="bf16")


@pytest.mark.parametrize("device", DEVICES)
def test_grad_weight_split_pixel_sum_is_exact(device):
    # r_split=7 over 2*6*6 = 72 output pixels: 11 int32 partials summed in int64
    x = torch.randint(-127, 128, (2, 5, 6, 6), dtype=torch.int8, device=device)
    g = torch.randint(-127, 128, (2, 3, 6, 6), dtype=torch.int8, device=device)
    gw = conv2d_grad_weight_int(g, x, (3, 5, 3, 3), 1, 1, r_split=7)
    assert gw.dtype == torch.int64
    assert torch.equal(gw, conv2d_grad_weight_int_reference(g, x, (3, 5, 3, 3), 1, 1))
    with pytest.raises(ValueError, match="r_split=0"):
        conv2d_grad_weight_int(g, x, (3, 5, 3, 3), 1, 1, r_split=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[1:4])
@pytest.mark.parametrize("q", [2047, 32767])
def test_int16_runs_as_fp16_within_fp32_accumulation_bound(device, case, q):
    """12-bit mantissas are exact in FP16, so only FP32 accumulation rounds: |err| <= K 2**-24
    sum |a||b| per output. 16-bit ones are rounded to FP16 on load, as the reference does."""
    x8, w8, geometry = _operands(case, device, True)
    x = torch.randint(-q, q + 1, x8.shape, dtype=torch.int16, device=device)
    w = torch.randint(-q, q + 1, w8.shape, dtype=torch.int16, device=device)
    k = w[0].numel()
    y = conv2d_int(x, w, *geometry)
    ref = conv2d_int_reference(x, w, *geometry)
    bound = k * 2.0**-24 * conv2d_int_reference(x.abs(), w.abs(), *geometry) + 1e-9
    assert y.dtype == torch.float32 and ((y.double() - ref).abs() <= bound).all()
    g = torch.randint(-q, q + 1, ref.shape, dtype=torch.int16, device=device)
    gx = conv2d_grad_input_int(g, w, x.shape, *geometry)
    gref = conv2d_grad_input_int_reference(g, w, x.shape, *geometry)
    gbound = k * 2.0**-24 * conv2d_grad_input_int_reference(g.abs(), w.abs(), x.shape, *geometry) + 1e-9
    assert ((gx.double() - gref).abs() <= gbound).all()
    # grad-weight: the reduction runs over the N*OH*OW output pixels
    r = g.shape[0] * g.shape[2] * g.shape[3]
    gw = conv2d_grad_weight_int(g, x, w.shape, *geometry)
    wref = conv2d_grad_weight_int_reference(g, x, w.shape, *geometry)
    wbound = r * 2.0**-24 * conv2d_grad_weight_int_reference(g.abs(), x.abs(), w.shape, *geometry) + 1e-9
    assert gw.dtype == torch.float32 and ((gw.double() - wref).abs() <= wbound).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exponents", [(7, 9), (-3, 140), (149, 149), (-(2**30), 4)])
def test_epilogue_dequantises_exactly(device, exponents):
    """``scale=(s_x, s_w)`` (and ``bias``) in the epilogue: the int32 sum converted to float32,
    times ``2**-(s_x + s_w)`` as two exact factors, plus the bias, bit-equal to doing the same
    in torch after the kernel, forward and grad-input; subnormal scales and the non-finite
    exponent (inf) included."""
    x, w, geometry = _operands(CASES[2], device, True)
    s = tuple(torch.tensor(e, dtype=torch.int32, device=device) for e in exponents)
    bias = torch.randn(w.shape[0], device=device)
    y = conv2d_int(x, w, *geometry, scale=s, bias=bias)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.nan_to_num(), conv2d_int_reference(x, w, *geometry, scale=s, bias=bias).nan_to_num())
    g = _output_grad(x, w, geometry, True)
    gx = conv2d_grad_input_int(g, w, x.shape, *geometry, scale=s)
    assert torch.equal(gx.nan_to_num(), conv2d_grad_input_int_reference(g, w, x.shape, *geometry, scale=s).nan_to_num())
    with pytest.raises(ValueError, match="bias"):
        conv2d_int(x, w, *geometry, bias=bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r_split", [None, 37])
@pytest.mark.parametrize("mma", ["int8", "fp16"])
def test_grad_weight_scaled_exactly(device, r_split, mma):
    """``scale`` on grad-weight (one partial, or several summed in int64 first): bit-equal to the
    exact sum converted to float32 and scaled in torch."""
    x, w, geometry = _operands(CASES[1], device, True)
    g = _output_grad(x, w, geometry, True)
    s = (torch.tensor(-20, dtype=torch.int32, device=device), torch.tensor(150, dtype=torch.int32, device=device))
    kw = {} if r_split is None else {"r_split": r_split}
    gw = conv2d_grad_weight_int(g, x, w.shape, *geometry, scale=s, mma=mma, **kw)
    assert gw.dtype == torch.float32 and gw.is_contiguous()  # the parameter's layout: no copy after
    assert torch.equal(gw, conv2d_grad_weight_int_reference(g, x, w.shape, *geometry, scale=s))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[3], CASES[4]])
def test_grad_weight_fp16_partials_scaled_within_bound(device, case):
    """12-bit mantissas (FP16 mode), pixel sum split in 7-pixel partials, scaled by 2**-(s_g + s_x):
    within the FP32 accumulation bound of the exact sum, scaled (a power of two scales the
    bound with it)."""
    x8, w8, geometry = _operands(case, device, True)
    x = torch.randint(-2047, 2048, x8.shape, dtype=torch.int16, device=device).contiguous(
        memory_format=torch.channels_last)
    g = torch.randint(-2047, 2048, conv2d_int_reference(x8, w8, *geometry).shape, dtype=torch.int16,
                      device=device).contiguous(memory_format=torch.channels_last)
    s = (torch.tensor(3, dtype=torch.int32, device=device), torch.tensor(-9, dtype=torch.int32, device=device))
    gw = conv2d_grad_weight_int(g, x, w8.shape, *geometry, r_split=7, scale=s)
    exact = conv2d_grad_weight_int_reference(g, x, w8.shape, *geometry) * 2.0**6
    r = g.shape[0] * g.shape[2] * g.shape[3]
    bound = r * 2.0**-24 * conv2d_grad_weight_int_reference(g.abs(), x.abs(), w8.shape, *geometry) * 2.0**6 + 1e-9
    assert gw.is_contiguous() and ((gw.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,rounding", [(8, "stochastic"), (8, "nearest"), (4, "stochastic")])
def test_output_quantised_in_the_epilogue(device, bits, rounding):
    """``quantise_output``: the epilogue's max |y| replaces the quantiser's reduction; oracle: the
    scaled convolution quantised by the separate quantiser on the same seed, bit-equal."""
    from muppet_fx.kernels.quantise import quantise_triton

    x, w, geometry = _operands(CASES[3], device, True)
    s = (torch.tensor(9, dtype=torch.int32, device=device), torch.tensor(6, dtype=torch.int32, device=device))
    bias = torch.randn(w.shape[0], device=device)
    fused = conv2d_int(x, w, *geometry, scale=s, bias=bias, quantise_output=(bits, rounding, 99))
    plain = conv2d_int(x, w, *geometry, scale=s, bias=bias)
    want = quantise_triton(plain, bits, rounding, seed=99, want_mantissa=False, want_values=True)[2]
    assert fused.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fused, want) and fused.unique().numel() <= 2**bits
    with pytest.raises(ValueError, match="needs scale"):
        conv2d_int(x, w, *geometry, quantise_output=(bits, rounding, 99))
    # with the mantissas: the same rounding; with the mantissas alone (2), the values unwritten
    values, m, e = conv2d_int(x, w, *geometry, scale=s, bias=bias, quantise_output=(bits, rounding, 99, True))
    unread, m2, e2 = conv2d_int(x, w, *geometry, scale=s, bias=bias, quantise_output=(bits, rounding, 99, 2))
    assert torch.equal(values, want) and torch.equal(m.float() * 2.0 ** -int(e), want)
    assert torch.equal(m2, m) and torch.equal(e2, e) and torch.equal(unread, plain)


@given(d=st.integers(1, 2**29 - 1), x=st.integers(0, 2**29 - 1))
@example(d=3, x=2**29 - 1)
@example(d=2**28 + 1, x=2**29 - 1)  # the largest magic number: just over a power of two
@example(d=1, x=2**29 - 1)
def test_division_magic_divides_exactly(d, x):
    magic, shift = division_magic(d)
    assert (x * magic) >> shift == x // d and magic < 2**31  # an int32 kernel argument for every divisor
    q = d * (x // d)  # the multiples of d either side of x, where a rounding error would show
    assert (q * magic) >> shift == x // d and ((q - 1) * magic >> shift == x // d - 1 if q else True)


def test_division_magic_rejects_divisors_out_of_range():
    for d in (0, 2**29):
        with pytest.raises(ValueError, match=f"divisor {d} must be in 1..{2**29 - 1}"):
            division_magic(d)
    g = torch.zeros(1, 1, 1, 1, dtype=torch.int8).expand(2**29, 1, 1, 1)  # 2**29 pixels, one byte stored
    with pytest.raises(ValueError, match="536870912 output pixels .* split the batch"):
        conv2d_grad_weight_int(g, g, (1, 1, 1, 1))


@given(R=st.integers(0, 2**22), M=st.integers(0, 2048), K=st.integers(0, 2**15), sms=st.integers(1, 200))
@example(R=5 * 5 * 2, M=3, K=0, sms=132)  # zero input channels (test_no_input_channels_sum_to_zero on a GPU)
def test_pixel_split_fills_the_gpu_without_overflow(R, M, K, sms):
    r_split = pixel_split(R, M, K, sms)
    splits = -(-R // r_split)
    assert 0 < r_split <= CHUNK  # no int32 partial can overflow
    assert r_split == CHUNK or r_split % 128 == 0
    tiles = -(-M // 128) * -(-K // 128)
    if R >= 2 * 1024 and tiles * 2 <= 4 * sms and R <= CHUNK:  # room to split, a GPU to fill
        assert splits >= 2
    assert splits == 1 or r_split >= 1024  # each split keeps enough pixels to outweigh its partial


def test_pixel_split_on_a_resnet_layer():
    # 64 -> 64 3x3 at 32x32, batch 128, on 132 multiprocessors (H100/H200): 5 tiles of 128 x 128
    # gave 2 programs per column block with CHUNK splits; now about 4 per multiprocessor
    r_split = pixel_split(128 * 32 * 32, 64, 576, 132)
    assert -(-131072 // r_split) * 5 >= 4 * 132


@pytest.mark.parametrize("device", DEVICES)
def test_grad_input_takes_its_weight_with_output_channels_fastest(monkeypatch, device):
    """The weight comes K-major for the MMA (the sum runs over output channels); a stride-2 3x3
    gradient runs one launch per input phase, over 9 taps in all (4 + 2 + 2 + 1), not 4 x 9."""
    seen = []
    real = conv_triton._run
    monkeypatch.setattr(conv_triton, "_run", lambda a, w, *rest, **kw: seen.append((w.stride(0), w.shape[2] * w.shape[3]))
                        or real(a, w, *rest, **kw))
    x, w, geometry = _operands(CASES[2], device, True)
    g = _output_grad(x, w, geometry, True)
    gx = conv2d_grad_input_int(g, w, x.shape, *geometry)
    assert sorted(seen) == [(1, 1), (1, 2), (1, 2), (1, 4)]
    assert torch.equal(gx, conv2d_grad_input_int_reference(g, w, x.shape, *geometry))


def test_no_specialisation_names_a_missing_argument():
    for name, plain in conv_triton.UNSPECIALISED.items():
        k = getattr(conv_triton, f"_{name}_kernel").fn  # under the autotuner
        assert plain and set(plain) <= set(k.arg_names), (name, set(plain) - set(k.arg_names))


@pytest.mark.parametrize("device", DEVICES)
def test_no_input_channels_sum_to_zero(device):
    """Zero input channels: no reduction blocks at all (a tap count from K // C would divide by
    zero), so the forward is zeros, plus the bias when scaled; the scaled weight gradient is empty."""
    import warnings

    x = torch.zeros(2, 0, 5, 5, dtype=torch.int8, device=device)
    w = torch.zeros(3, 0, 3, 3, dtype=torch.int8, device=device)
    s = (torch.tensor(2, dtype=torch.int32, device=device), torch.tensor(1, dtype=torch.int32, device=device))
    bias = torch.tensor([0.5, -1.0, 2.0], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the interpreter warns on an integer division by zero
        assert torch.equal(conv2d_int(x, w, 1, 1), torch.zeros(2, 3, 5, 5, dtype=torch.int32, device=device))
        assert torch.equal(conv2d_int(x, w, 1, 1, scale=s, bias=bias), bias.view(1, 3, 1, 1).expand(2, 3, 5, 5))
        g = torch.ones(2, 3, 5, 5, dtype=torch.int8, device=device)
        assert conv2d_grad_weight_int(g, x, w.shape, 1, 1, scale=s).shape == (3, 0, 3, 3)
