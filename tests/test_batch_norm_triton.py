"""Batch norm from mantissas on the Triton route (``muppet_fx.kernels.batch_norm_triton``).

Oracles and bounds as ``tests/test_batch_norm_cpu.py`` (float64 statistics from the exact
input, ATen's backward in float64), plus the C kernels themselves where both apply: the
statistics are the same float64 roundings of the same exact sums, so mean, invstd and the
running statistics equal the C kernel's bit for bit. The exponent is a device tensor the
kernels read.
"""
import pytest
import torch

from muppet_fx.kernels import batch_norm_cpu, batch_norm_triton
from muppet_fx.kernels.relu_cpu import relu_mask_backward

from .conftest import DEVICES
from .test_batch_norm_cpu import _case, _channels_last, _check, _check_forward, _reference

pytestmark = pytest.mark.skipif(not DEVICES, reason="needs a GPU or TRITON_INTERPRET=1")

ROWS_LAYOUT = [(5, 3, 7, 9), (2, 17, 5, 3), (64, 16, 8, 8), (5, 24, 17, 19), (2, 80, 3, 5), (7, 33), (129, 7),
               (6, 16, 37), (2, 5, 3, 4, 6), (2, 3, 1, 1)]


def _s(e, device):
    return torch.tensor(-e, dtype=torch.int32, device=device)


def _forward(device):
    return lambda m, e, *args: batch_norm_triton.batch_norm_forward(m, _s(e, device), *args)


def _layout(t, shape):
    return _channels_last(t) if len(shape) > 2 else t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ROWS_LAYOUT)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_forward_matches_float64(device, shape, dtype):
    """Tiles that do not divide the rows or the channels (17, 33, 80 channels; 7 or 105 rows)."""
    _, m, e, _, w, _, _ = _case(shape, dtype, len(shape) > 2, seed=5)
    _check_forward(m, e, w.to(device), torch.randn(shape[1], generator=torch.Generator().manual_seed(6)),
                   forward=_forward(device), device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 16, 7, 9), (3, 70, 4, 5), (7, 33)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_statistics_equal_the_c_kernels(device, shape, dtype):
    _, m, e, _, w, _, _ = _case(shape, dtype, len(shape) > 2, seed=1)
    C = shape[1]
    b = torch.randn(C)
    rm, rv = torch.linspace(-1, 1, C), torch.linspace(0.5, 2, C)
    want = batch_norm_cpu.batch_norm_forward(m, e, w, b, rm, rv, 0.1, 1e-5)
    on = [t.to(device) for t in (m, w, b)]
    rm_t, rv_t = torch.linspace(-1, 1, C, device=device), torch.linspace(0.5, 2, C, device=device)
    got = batch_norm_triton.batch_norm_forward(on[0], _s(e, device), *on[1:], rm_t, rv_t, 0.1, 1e-5)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])
    assert torch.equal(rm_t.cpu(), rm) and torch.equal(rv_t.cpu(), rv)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_without_affine_parameters_and_at_other_exponents(device):
    _, m, _, _, _, _, _ = _case((6, 16, 5, 5), torch.int16, True, seed=7)
    for e in (-30, -15, 0, 20):
        _check_forward(m, e, None, None, momentum=0.3, forward=_forward(device), device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_forward_sums_stay_exact_past_int32(device, dtype):
    """131,200 rows of 16 channels at the largest magnitudes: a sum of squares kept in int32
    would wrap (127**2 * 131200 > 2**31)."""
    lim = 127 if dtype == torch.int8 else 32767
    m = torch.full((131200, 16), lim, dtype=dtype)
    m[::3] = -lim
    m[:, 5] = lim
    _check_forward(m, -7, None, None, forward=_forward(device), device=device)
    _, mean, invstd = batch_norm_triton.batch_norm_forward(m.to(device), _s(-7, device), None, None, None, None,
                                                           0.1, 1e-5)
    assert mean[5] == lim * 2.0**-7  # a constant channel: variance 0, invstd from eps alone
    assert invstd[5].cpu() == torch.tensor(1e-5, dtype=torch.float64).rsqrt().float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (64, 16, 8, 8), (2, 80, 3, 5), (7, 33), (2, 5, 3, 4, 6),
                                   (40, 16, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_backward_matches_float64_aten(device, shape, dtype):
    """The last shape has 40 row programs: their partial sums are added 32 rows at a time."""
    g, m, e, x, w, mean, invstd = _case(shape, dtype, len(shape) > 2)
    on = [t.to(device) for t in (g, m, mean, invstd, w)]
    got = batch_norm_triton.batch_norm_backward(on[0], on[1], _s(e, device), *on[2:], (True, True, True))
    assert got is not None and got[0].stride() == on[0].stride()
    _check([t.cpu() for t in got], _reference(g, x, w, mean, invstd), g, x, mean, invstd)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need", [(False, True, True), (True, False, False)])
def test_backward_without_weight_and_partial_needs(device, need):
    g, m, e, x, _, mean, invstd = _case((6, 4, 5, 5), torch.int8, True, seed=1)
    on = [t.to(device) for t in (g, m, mean, invstd)]
    got = batch_norm_triton.batch_norm_backward(on[0], on[1], _s(e, device), *on[2:], None, need)
    assert [t is not None for t in got] == list(need)
    _check([None if t is None else t.cpu() for t in got], _reference(g, x, None, mean, invstd), g, x, mean, invstd)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_relu_and_its_mask(device):
    """``relu=True``: ``relu(y)`` with -0.0 and NaN passing as ``torch.relu`` lets them, the
    mask ``relu(y) != 0``; backward through the mask equals backward of the masked gradient,
    bit for bit; the gradient in another memory order is copied into the mantissas' order."""
    shape = (5, 16, 23, 19)
    g, m, e, _, w, _, _ = _case(shape, torch.int8, True, seed=8)
    b = torch.randn(shape[1], generator=torch.Generator().manual_seed(9))
    m, w, b, g = (t.to(device) for t in (m, w, b, g))
    s = _s(e, device)
    y, mean, invstd = batch_norm_triton.batch_norm_forward(m, s, w, b, None, None, 0.1, 1e-5)
    r, mean_r, invstd_r, mask = batch_norm_triton.batch_norm_forward(m, s, w, b, None, None, 0.1, 1e-5, relu=True)
    assert torch.equal(r, torch.relu(y)) and torch.equal(mask, (torch.relu(y) != 0).to(torch.uint8))
    assert mask.stride() == m.stride() and 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(mean_r, mean) and torch.equal(invstd_r, invstd)
    need = (True, True, True)
    got = batch_norm_triton.batch_norm_backward(g.contiguous(), m, s, mean, invstd, w, need, relu_mask=mask)
    masked = torch.where(mask.bool(), g, 0.0) if device != "cpu" else relu_mask_backward(g, mask)
    want = batch_norm_triton.batch_norm_backward(masked, m, s, mean, invstd, w, need)
    assert all(torch.equal(a, c) for a, c in zip(got, want))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy on inf
def test_exponent_is_read_on_the_device(device):
    """The same mantissas at exponents 12 apart (eps 0): y and the weight and bias gradients
    are unchanged, the input gradient scales by exactly 2**-12; the marker of a non-finite
    input makes the outputs non-finite (a diverging run stays visible)."""
    g, m, _, _, w, _, _ = _case((4, 3, 5, 5), torch.int8, True, seed=3)
    g, m, w = g.to(device), m.to(device), w.to(device)
    outs = []
    for e in (-9, 3):
        y, mean, invstd = batch_norm_triton.batch_norm_forward(m, _s(e, device), w, None, None, None, 0.1, 0.0)
        outs.append((y, *batch_norm_triton.batch_norm_backward(g, m, _s(e, device), mean, invstd, w, (True,) * 3)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1] * 2.0**12)
    assert torch.equal(outs[0][2], outs[1][2]) and torch.equal(outs[0][3], outs[1][3])
    marker = torch.tensor(-(2**30), dtype=torch.int32, device=device)
    y, _, _ = batch_norm_triton.batch_norm_forward(m, marker, w, None, None, None, 0.1, 1e-5)
    assert not y.isfinite().any()


@pytest.mark.parametrize("device", DEVICES)
def test_declines_what_it_does_not_cover(device):
    g, m, e, _, w, mean, invstd = _case((2, 3, 4, 4), torch.int8, True)
    g, m, w, mean, invstd = (t.to(device) for t in (g, m, w, mean, invstd))
    s = _s(e, device)
    fwd = (w, None, None, None, 0.1, 1e-5)
    assert batch_norm_triton.batch_norm_forward(m.int(), s, *fwd) is None  # int32 mantissas
    assert batch_norm_triton.batch_norm_forward(m.contiguous(), s, *fwd) is None  # channels not fastest
    assert batch_norm_triton.batch_norm_forward(m, s.expand(2), *fwd) is None  # one exponent per tensor
    assert batch_norm_triton.batch_norm_forward(m, s, w.double(), None, None, None, 0.1, 1e-5) is None
    assert batch_norm_triton.batch_norm_forward(m[:1, :, :1, :1], s, *fwd) is None  # one value per channel
    bwd = (m, s, mean, invstd, w, (True, True, True))
    assert batch_norm_triton.batch_norm_backward(g.double(), *bwd) is None
    assert batch_norm_triton.batch_norm_backward(g[:1], *bwd) is None
    assert batch_norm_triton.batch_norm_backward(g, *bwd, relu_mask=m.view(torch.uint8).contiguous()) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("poison", [False, True])
def test_outputs_carry_their_max_for_the_next_quantiser(device, poison, monkeypatch):
    """``y`` and the input gradient carry the max |value| their pass reduced: quantising them
    (the next layer's input, the layer below's output gradient) skips the reduction launch and
    gives the very mantissas and exponent of a fresh quantisation, NaN marker included. An
    in-place write voids the record."""
    from muppet_fx.kernels import quantise
    from muppet_fx.numerics import quantise_parts

    g, m, e, _, w, _, _ = _case((3, 24, 5, 7), torch.int8, True, seed=11)
    g, m, w = g.to(device), m.to(device), w.to(device)
    y, mean, invstd, mask = batch_norm_triton.batch_norm_forward(m, _s(e, device), w, None, None, None, 0.1, 1e-5,
                                                                 relu=True)
    if poison:  # where the ReLU passes the gradient
        g[tuple(mask.nonzero()[0].tolist())] = float("nan")
    gx, _, _ = batch_norm_triton.batch_norm_backward(g, m, _s(e, device), mean, invstd, w, (True, False, False),
                                                     relu_mask=mask)
    monkeypatch.setattr(quantise, "FORCE_TRITON_PATH", True)
    reductions = []
    real = quantise._absmax_kernel
    monkeypatch.setattr(quantise, "_absmax_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (reductions.append(grid), real[grid])[1]})())
    for t in (y, gx):
        assert quantise.recorded_amax_slot(t) is not None
        got = quantise_parts(t, 8, "nearest")
        assert reductions == []
        want = quantise_parts(t.clone(), 8, "nearest")  # a clone carries no record
        assert len(reductions) == 1 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        reductions.clear()
    assert bool(gx.isnan().any()) == poison and (int(quantise_parts(gx, 8, "nearest")[1]) == -(2**30)) == poison
    y.mul_(2.0)
    assert quantise.recorded_amax_slot(y) is None


@pytest.mark.parametrize("device", DEVICES)
def test_slots_are_zeroed_by_the_kernels(device, monkeypatch):
    """The output passes' absmax slots come uninitialised (no fill launch): the statistics
    kernel before each pass zeroes them. Slots handed over full of a large value still give
    the outputs' true maxima."""
    from muppet_fx.kernels import quantise

    monkeypatch.setattr(batch_norm_triton, "_slot", lambda device: torch.full((1, 2), 0x7F000000, dtype=torch.int32,
                                                                             device=device))
    g, m, e, _, w, _, _ = _case((3, 24, 5, 7), torch.int8, True, seed=12)
    g, m, w = g.to(device), m.to(device), w.to(device)
    y, mean, invstd = batch_norm_triton.batch_norm_forward(m, _s(e, device), w, None, None, None, 0.1, 1e-5)
    gx, _, _ = batch_norm_triton.batch_norm_backward(g, m, _s(e, device), mean, invstd, w, (True, False, False))
    for t in (y, gx):
        slot = quantise.recorded_amax_slot(t)
        assert slot[0, 0].view(torch.float32) == t.abs().max() and slot[0, 1] == 0
