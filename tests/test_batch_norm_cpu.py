"""Batch-norm backward from mantissas (``muppet_fx.kernels.batch_norm_cpu``).

Oracle: ATen's ``native_batch_norm_backward`` in float64 on the dequantised input, with the
same float32 statistics. Bound: a float32 rounding per element plus a float32 reduction's
error, ``8 * eps * (sqrt(R) * max|term| + max|ref|)`` for ``R`` values per channel.
"""
import math

import pytest
import torch

from muppet_fx.kernels import batch_norm_cpu
from muppet_fx.kernels.batch_norm_cpu import batch_norm_backward

EPS = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.skipif(batch_norm_cpu._library() is None, reason="no C compiler")


def _case(shape, dtype, channels_last=False, e=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lim = 127 if dtype == torch.int8 else 32767
    m = torch.randint(-lim, lim + 1, shape, dtype=dtype, generator=gen)
    if channels_last:
        m = m.contiguous(memory_format=torch.channels_last)
    e = (-7 if dtype == torch.int8 else -15) if e is None else e
    x = m.float() * 2.0**e
    g = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last if channels_last
                                                      else torch.contiguous_format)
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
    ((3, 5, 17, 16), False), ((7, 33), False), ((4, 3, 300), False), ((129, 7), False)])
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
