"""3-d convolutions on the 2-d integer kernels, one depth tap at a time (``muppet_fx.depth_taps``
through ``routes``). Oracle: float64 sums of the mantissas (exact: every sum here stays far below
2**53), scaled by ``2**e`` once and rounded to float32, as a 2-d integer convolution returns them."""
import pytest
import torch
import torch.nn as nn

from muppet_fx import depth_taps, prepare, routes

E_X, E_W, E_G = 3, 6, 9  # mantissa exponents: x = m * 2**-3, ...

GEOMETRIES = [  # (C, Cout, D, H, W, kernel, stride, padding, dilation)
    (8, 16, 5, 7, 9, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    (4, 16, 7, 6, 5, (3, 3, 3), (2, 1, 2), (1, 0, 1), (1, 1, 1)),
    (16, 32, 6, 5, 5, (3, 1, 1), (1, 1, 1), (1, 0, 0), (2, 1, 1)),
    (12, 16, 4, 9, 8, (1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 1)),
    (3, 8, 5, 5, 6, (2, 3, 3), (2, 1, 1), (0, 1, 1), (1, 2, 1)),
]


def _mantissas(shape, seed, lim=127):
    return torch.randint(-lim, lim + 1, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def _scaled(t, e):
    return (t * 2.0**e).float()


def _spy(monkeypatch):
    """Records whether each depth_taps function ran and gave a result (rather than declining)."""
    ran = {}
    for name in ("forward", "grad_input", "grad_weight"):
        real = getattr(depth_taps, name)
        monkeypatch.setattr(depth_taps, name, lambda *a, real=real, name=name: (
            ran.__setitem__(name, (got := real(*a)) is not None), got)[1])
    return ran


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_each_product_is_the_exact_sum_scaled_once(geometry, monkeypatch):
    ran = _spy(monkeypatch)
    C, Co, D, H, W, k, s, p, d = geometry
    x_m, w_m = _mantissas((2, C, D, H, W), 1), _mantissas((Co, C, *k), 2)
    x_s, w_s = torch.tensor(E_X, dtype=torch.int32), torch.tensor(E_W, dtype=torch.int32)
    bias = torch.randn(Co)
    y, quantised = routes.conv_forward("aten", x_m, x_s, w_m, w_s, None, bias, list(s), list(p), list(d), 1)
    want = torch.nn.functional.conv3d(x_m.double(), w_m.double(), None, s, p, d)
    assert not quantised and torch.equal(y, _scaled(want, -E_X - E_W) + bias.view(1, -1, 1, 1, 1))

    g_m = _mantissas(want.shape, 3)
    g_s = torch.tensor(E_G, dtype=torch.int32)
    gx = routes.conv_grad_input("aten", g_m, g_s, w_m, w_s, None, x_m.shape, list(s), list(p), list(d), 1)
    gw = routes.conv_grad_weight("aten", g_m, g_s, x_m, x_s, w_m.shape, list(s), list(p), list(d), 1)
    want_gx, want_gw, _ = torch.ops.aten.convolution_backward(
        g_m.double(), x_m.double(), w_m.double(), None, s, p, d, False, [0, 0, 0], 1, [True, True, False])
    assert torch.equal(gx, _scaled(want_gx, -E_G - E_W))
    assert torch.equal(gw, _scaled(want_gw, -E_G - E_X))
    assert ran == {"forward": True, "grad_input": True, "grad_weight": True}


def test_sums_that_could_round_leave_the_taps():
    """Taps whose largest sums add up to 2**24 or more: the taps decline (``None``) and the
    route's other paths give the exact result (``exact=True``) or the values' FP32 products."""
    x_m = torch.full((1, 128, 3, 4, 4), 127, dtype=torch.int8)
    w_m = torch.full((16, 128, 3, 3, 3), 127, dtype=torch.int8)  # 1152 products of 127**2 per tap
    zero = torch.tensor(0, dtype=torch.int32)
    conv2d = lambda x, xs, w, ws, s, p, dd: routes.conv_forward(  # noqa: E731
        "aten", x, xs, w, ws, None, None, s, p, dd, 1)[0]
    assert depth_taps.forward(conv2d, x_m, zero, w_m, zero, 0, None, [1] * 3, [1] * 3, [1] * 3) is None
    y, _ = routes.conv_forward("aten_exact", x_m, zero, w_m, zero, None, None, [1] * 3, [1] * 3, [1] * 3, 1)
    want = torch.nn.functional.conv3d(x_m.double(), w_m.double(), padding=1).float()
    assert torch.equal(y, want)


def test_a_prepared_3d_network_matches_the_emulation(monkeypatch):
    """End to end at 8 bits, nearest rounding: short reductions, so the emulation's FP32 sums
    are exact too, and the integer taps must equal them bit for bit, forward and backward
    (a transposed 3-d convolution included: its products are a convolution's, exchanged)."""
    def run(backend):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                            nn.Conv3d(8, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
                            nn.Conv3d(8, 4, (3, 1, 1), padding=(1, 0, 0)),
                            nn.ConvTranspose3d(4, 4, 4, stride=2, padding=1))  # forward: a grad-input
        pm = prepare(net, ladder=(8, "fp32"), backend=backend, rounding="nearest", grad_rounding="nearest")
        x = torch.randn(2, 4, 5, 6, 7, generator=torch.Generator().manual_seed(3)).requires_grad_()
        out = pm(x)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [out.detach(), x.grad] + [q.grad for q in net.parameters()]

    want = run("emulate")
    ran = _spy(monkeypatch)
    for got, w in zip(run("aten"), want):
        assert torch.equal(got, w)
    assert ran == {"forward": True, "grad_input": True, "grad_weight": True}


def test_exponents_outside_float32s_normal_range_leave_the_taps():
    """A scale ``2**e`` that float32 cannot hold as a normal number (a diverged network's
    exponents): the taps decline instead of overflowing, and the route's other path runs."""
    x_m, w_m = _mantissas((1, 4, 3, 4, 4), 1), _mantissas((16, 4, 3, 3, 3), 2)
    big = torch.tensor(700, dtype=torch.int32)
    zero = torch.tensor(0, dtype=torch.int32)
    conv2d = lambda *a: pytest.fail("the taps ran")  # noqa: E731
    assert depth_taps.forward(conv2d, x_m, big, w_m, big, -1400, None, [1] * 3, [1] * 3, [1] * 3) is None
    g_m = _mantissas((1, 16, 3, 4, 4), 3)
    assert depth_taps.grad_input(conv2d, g_m, big, w_m, zero, 1400, x_m.shape, [1] * 3, [1] * 3, [1] * 3) is None
    y, _ = routes.conv_forward("aten", x_m, big, w_m, big, None, None, [1] * 3, [1] * 3, [1] * 3, 1)
    assert y.shape == (1, 16, 3, 4, 4) and torch.equal(y, torch.zeros_like(y))  # 2**-1400 underflows
