"""Batch norm from mantissas (``muppet_fx.kernels.batch_norm_cpu``).

Backward oracle: ATen's ``native_batch_norm_backward`` in float64 on the dequantised input, with
the same float32 statistics. Bound: a float32 rounding per element plus a float32 reduction's
error, ``8 * eps * (sqrt(R) * max|term| + max|ref|)`` for ``R`` values per channel.
Forward oracle: the statistics in float64 from the dequantised input (exact sums): the mean and
``invstd`` within one float32 rounding (the kernel's sums are exact), ``y`` within four roundings
of ``|x * alpha| + |mean * alpha| + |bias| + |y|`` (the float32 ``alpha``, ``beta`` and the
output), the running statistics within two roundings of ATen's update.
"""
import math

import pytest
import torch

from muppet_fx.kernels import batch_norm_cpu
from muppet_fx.kernels.batch_norm_cpu import batch_norm_backward, batch_norm_forward

EPS = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.skipif(batch_norm_cpu._library() is None, reason="no C compiler")


def _channels_last(t):
    """Channels in the fastest-running dimension, for any rank (a 1-d map as the 2-d kernels'
    height-one outputs leave it, a 3-d one as ``channels_last_3d``)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _case(shape, dtype, channels_last=False, e=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lim = 127 if dtype == torch.int8 else 32767
    m = torch.randint(-lim, lim + 1, shape, dtype=dtype, generator=gen)
    if channels_last:
        m = _channels_last(m)
    e = (-7 if dtype == torch.int8 else -15) if e is None else e
    x = m.float() * 2.0**e
    g = torch.randn(shape, generator=gen)
    g = _channels_last(g) if channels_last else g
    w = torch.randn(shape[1], generator=gen)
    _, mean, invstd = torch.native_batch_norm(x, w, None, None, None, True, 0.1, 1e-5)
    return g, m, e, x, w, mean, invstd


def _reference(g, x, w, mean, invstd):
    return torch.ops.aten.native_batch_norm_backward(
        g.double(), x.double(), None if w is None else w.double(), None, None, mean.double(),
        invstd.double(), True, 1e-5, [True, True, True])


def _check(got, ref, g, x, mean, invstd):
    R = g.numel() // g.shape[1]
    view = [1, -1] + [1] * (g.dim() - 2)
    xhat = (x.double() - mean.double().view(view)) * invstd.double().view(view)
    terms = {0: g.double().abs().max(), 1: (g.double() * xhat).abs().max(), 2: g.double().abs().max()}
    for i, (a, b) in enumerate(zip(got, ref)):
        if a is None:
            continue
        bound = 8 * EPS * (math.sqrt(R) * terms[i] + b.abs().max())
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert (a.double() - b).abs().max() <= bound, (i, (a.double() - b).abs().max().item(), bound.item())


@pytest.mark.parametrize("shape,channels_last", [
    ((5, 3, 7, 9), True), ((1, 1, 1, 1), True), ((2, 17, 5, 3), True), ((64, 16, 8, 8), True),
    ((5, 24, 17, 19), True), ((3, 5, 17, 16), False), ((7, 33), False), ((4, 3, 300), False), ((129, 7), False),
    ((6, 16, 37), True), ((3, 7, 5), True), ((2, 5, 3, 4, 6), True)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_matches_float64_aten(shape, channels_last, dtype):
    g, m, e, x, w, mean, invstd = _case(shape, dtype, channels_last)
    got = batch_norm_backward(g, m, e, mean, invstd, w, (True, True, True))
    assert got is not None
    _check(got, _reference(g, x, w, mean, invstd), g, x, mean, invstd)
    assert got[0].stride() == g.stride()


@pytest.mark.parametrize("need", [(False, True, True), (True, False, False), (False, False, True)])
def test_without_weight_and_partial_needs(need):
    g, m, e, x, _, mean, invstd = _case((6, 4, 5, 5), torch.int8, True, seed=1)
    got = batch_norm_backward(g, m, e, mean, invstd, None, need)
    ref = _reference(g, x, None, mean, invstd)
    assert [t is not None for t in got] == list(need)
    _check(got, ref, g, x, mean, invstd)


def test_gradient_in_another_memory_order_and_expanded():
    g, m, e, x, w, mean, invstd = _case((3, 5, 4, 6), torch.int16, True, seed=2)
    want = batch_norm_backward(g, m, e, mean, invstd, w, (True, True, True))
    got = batch_norm_backward(g.contiguous(), m, e, mean, invstd, w, (True, True, True))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    ones = torch.ones(1).expand(m.shape)  # what sum().backward() hands down
    _check(batch_norm_backward(ones, m, e, mean, invstd, w, (True, True, True)),
           _reference(ones, x, w, mean, invstd), ones, x, mean, invstd)


def test_exponent_scales_the_input():
    """The same mantissas at two exponents 12 apart (eps 0): x, its mean and 1/std scale by
    powers of two, so the input gradient scales by exactly 2**-12 and the weight and bias
    gradients do not change."""
    g, m, _, _, w, _, _ = _case((4, 3, 5, 5), torch.int8, True, seed=3)
    outs = []
    for e in (-9, 3):
        x = m.float() * 2.0**e
        _, mean, invstd = torch.native_batch_norm(x, w, None, None, None, True, 0.1, 0.0)
        outs.append(batch_norm_backward(g, m, e, mean, invstd, w, (True, True, True)))
    assert torch.equal(outs[0][0], outs[1][0] * 2.0**12)
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])


def test_nan_gradient_stays_in_its_channel():
    g, m, e, x, w, mean, invstd = _case((4, 3, 5, 5), torch.int8, True, seed=4)
    g[1, 2, 3, 0] = float("nan")
    gx, gw, gb = batch_norm_backward(g, m, e, mean, invstd, w, (True, True, True))
    assert gx[:, 2].isnan().all() and gw[2].isnan() and gb[2].isnan()
    assert gx[:, :2].isfinite().all() and gw[:2].isfinite().all() and gb[:2].isfinite().all()


def test_declines_what_it_does_not_cover(monkeypatch):
    g, m, e, _, w, mean, invstd = _case((2, 3, 4, 4), torch.int8, True)
    args = (mean, invstd, w, (True, True, True))
    assert batch_norm_backward(g, m.int(), e, *args) is None  # int32 mantissas
    assert batch_norm_backward(g.double(), m, e, *args) is None
    assert batch_norm_backward(g, m, -127, *args) is None  # 2**e not a normal float32
    assert batch_norm_backward(g, m.transpose(2, 3), e, *args) is None  # no dense walk
    short = m.contiguous()  # contiguous with 16 values per channel run: ATen is faster
    assert batch_norm_backward(g.contiguous(), short, e, *args) is None
    assert batch_norm_backward(g[:, :, :0], m[:, :, :0], e, *args) is None
    monkeypatch.setattr(batch_norm_cpu, "_library", lambda: None)
    assert batch_norm_backward(g, m, e, *args) is None


def _forward_oracle(m, e, w, b, rm, rv, momentum, eps=1e-5):
    x = m.double() * 2.0**e
    dims = [d for d in range(x.dim()) if d != 1]
    view = [1, -1] + [1] * (x.dim() - 2)
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    invstd = (var + eps).rsqrt()
    alpha = invstd * (1.0 if w is None else w.double())
    beta = (0.0 if b is None else b.double()) - mean * alpha
    y = x * alpha.view(view) + beta.view(view)
    count = x.numel() // x.shape[1]
    return (y, mean, invstd, (1 - momentum) * rm.double() + momentum * mean,
            (1 - momentum) * rv.double() + momentum * var * count / (count - 1), x, alpha, beta)


def _check_forward(m, e, w, b, momentum=0.1, forward=batch_norm_forward, device="cpu"):
    """``forward(m, e, w, b, running_mean, running_var, momentum, eps)`` (on ``device``)
    against :func:`_forward_oracle`."""
    C = m.shape[1]
    rm, rv = torch.linspace(-1, 1, C), torch.linspace(0.5, 2, C)
    y_o, mean_o, invstd_o, rm_o, rv_o, x, alpha, beta = _forward_oracle(m, e, w, b, rm, rv, momentum)
    on = [None if t is None else t.to(device) for t in (m, w, b, rm, rv)]
    got = forward(on[0], e, *on[1:], momentum, 1e-5)
    assert got is not None
    y, mean, invstd = (t.cpu() for t in got)
    rm, rv = on[3].cpu(), on[4].cpu()
    assert y.dtype == torch.float32 and y.shape == m.shape and y.stride() == m.stride()
    assert (mean.double() - mean_o).abs().le(EPS * mean_o.abs()).all()
    assert (invstd.double() - invstd_o).abs().le(EPS * invstd_o).all()
    view = [1, -1] + [1] * (m.dim() - 2)
    shift = (mean_o * alpha).abs() + (0.0 if b is None else b.double().abs())
    bound = 4 * EPS * ((x * alpha.view(view)).abs() + shift.view(view) + y_o.abs())
    assert ((y.double() - y_o).abs() <= bound).all(), ((y.double() - y_o).abs() / bound).max().item()
    for got_r, want_r in ((rm, rm_o), (rv, rv_o)):
        assert (got_r.double() - want_r).abs().le(2 * EPS * (want_r.abs() + 1)).all()


@pytest.mark.parametrize("shape,channels_last", [
    ((5, 3, 7, 9), True), ((3, 16, 7, 7), True), ((2, 32, 5, 3), True), ((4, 64, 3, 3), True),
    ((2, 80, 3, 5), True), ((2, 3, 1, 1), True), ((3, 5, 17, 16), False), ((7, 33), False), ((4, 3, 300), False),
    ((6, 16, 37), True), ((3, 7, 5), True), ((2, 5, 3, 4, 6), True)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_forward_matches_float64(shape, channels_last, dtype):
    """Channels-last shapes whose rows do not fill the last group of 64 values (16 channels on
    147 rows: 36 groups of 4 rows and 3 left over), channel counts above 64, and contiguous ones."""
    g, m, e, x, w, _, _ = _case(shape, dtype, channels_last, seed=5)
    _check_forward(m, e, w, torch.randn(shape[1], generator=torch.Generator().manual_seed(6)))


def test_forward_without_affine_parameters_and_at_other_exponents():
    _, m, _, _, _, _, _ = _case((6, 16, 5, 5), torch.int16, True, seed=7)
    for e in (-30, -15, 0, 20):
        _check_forward(m, e, None, None, momentum=0.3)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_forward_sums_stay_exact_past_the_int32_blocks(dtype):
    """131,200 rows of 16 channels (32,800 groups: more than one int32 block) at the largest
    magnitudes, where a sum of squares kept in int32 would wrap."""
    lim = 127 if dtype == torch.int8 else 32767
    n = 131200
    m = torch.full((n, 16, 1, 1), lim, dtype=dtype).contiguous(memory_format=torch.channels_last)
    m[::3] = -lim  # mean lim / 3 of the way down, variance near lim**2
    m[:, 5] = lim
    _check_forward(m, -7, None, None)
    y, mean, invstd = batch_norm_forward(m, -7, None, None, None, None, 0.1, 1e-5)
    assert mean[5] == lim * 2.0**-7  # a constant channel: variance 0, invstd from eps alone
    assert invstd[5] == torch.tensor(1e-5, dtype=torch.float64).rsqrt().float()


def test_forward_declines_what_it_does_not_cover(monkeypatch):
    _, m, e, _, w, _, _ = _case((2, 3, 4, 4), torch.int8, True)
    args = (w, None, None, None, 0.1, 1e-5)
    assert batch_norm_forward(m.int(), e, *args) is None  # int32 mantissas
    assert batch_norm_forward(m, -127, *args) is None  # 2**e not a normal float32
    assert batch_norm_forward(m, e, w.double(), None, None, None, 0.1, 1e-5) is None
    assert batch_norm_forward(m.transpose(2, 3), e, *args) is None  # no dense walk
    assert batch_norm_forward(m.contiguous(), e, *args) is None  # 16-value channel runs: ATen
    assert batch_norm_forward(m[:1, :, :1, :1], e, *args) is None  # one value per channel
    monkeypatch.setattr(batch_norm_cpu, "_library", lambda: None)
    assert batch_norm_forward(m, e, *args) is None


@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_relu_equals_relu_after_the_kernels(channels_last):
    """``relu=True`` forward: ``relu(y)`` and ``relu_cpu``'s mask ``relu(y) != 0`` from the same
    pass; backward with that mask equals backward of the masked gradient, bit for bit."""
    from muppet_fx.kernels.relu_cpu import relu_mask_backward, relu_with_mask

    shape = (5, 16, 23, 19) if channels_last else (2, 3, 16, 17)  # channels last: two threads, a group tail
    g, m, e, _, w, _, _ = _case(shape, torch.int8, channels_last, seed=8)
    b = torch.randn(shape[1], generator=torch.Generator().manual_seed(9))
    y, mean, invstd = batch_norm_forward(m, e, w, b, None, None, 0.1, 1e-5)
    r, mean_r, invstd_r, mask = batch_norm_forward(m, e, w, b, None, None, 0.1, 1e-5, relu=True)
    want_r, want_mask = relu_with_mask(y)
    assert torch.equal(r, want_r) and torch.equal(mask, want_mask) and mask.stride() == m.stride()
    assert torch.equal(mean_r, mean) and torch.equal(invstd_r, invstd)
    assert 0 < int(mask.sum()) < mask.numel()
    need = (True, True, True)
    got = batch_norm_backward(g, m, e, mean, invstd, w, need, relu_mask=mask)
    want = batch_norm_backward(relu_mask_backward(g, mask), m, e, mean, invstd, w, need)
    assert all(torch.equal(a, c) for a, c in zip(got, want))
