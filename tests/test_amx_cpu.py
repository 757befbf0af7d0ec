"""The AMX convolution weight gradient (``kernels/amx_cpu``) against an int64 oracle.

Runs where the CPU has AMX tiles (others skip; there ``conv_grad_weight`` must decline)."""
import pytest
import torch

from muppet_fx.kernels import amx_cpu, gemm_cpu

needs_amx = pytest.mark.skipif(not amx_cpu.available(), reason="CPU without AMX int8 tiles")


def _oracle(g, x, weight_shape, stride, padding, dilation):
    """float64 sums of products of integers below 2**14: exact below 2**53."""
    return torch.nn.grad.conv2d_weight(x.double(), weight_shape, g.double(), stride, padding, dilation).long()


def _case(n, c, h, w, cout, kernel, stride, padding, dilation, g_channels_last=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *s: torch.randint(-127, 128, s, generator=gen, dtype=torch.int8)  # noqa: E731
    x = draw(n, c, h, w).contiguous(memory_format=torch.channels_last)
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    g = draw(n, cout, oh, ow)
    g = g.contiguous(memory_format=torch.channels_last) if g_channels_last else g
    return g, x, (cout, c, *kernel)


CASES = [  # (n, c, h, w, cout, kernel, stride, padding, dilation)
    (2, 16, 7, 9, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 32, 11, 5, 5, (3, 1), (2, 1), (0, 2), (1, 1)),
    (1, 16, 9, 9, 33, (3, 3), (2, 2), (1, 1), (2, 2)),
    (2, 48, 6, 6, 17, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 16, 13, 7, 1, (5, 5), (1, 2), (2, 0), (1, 1)),
    (4, 64, 8, 8, 64, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 32, 3, 3, 7, (3, 3), (1, 1), (3, 3), (1, 1)),  # padding wider than the kernel reach
]


@needs_amx
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("g_channels_last", [True, False])
@pytest.mark.parametrize("shared", [False, True], ids=["per-thread", "shared"])
def test_exact_on_odd_shapes(monkeypatch, case, g_channels_last, shared):
    *shape, stride, padding, dilation = case
    g, x, ws = _case(*shape, stride, padding, dilation, g_channels_last)
    if shared:  # every output above the bound: threads split each chunk's tile groups
        monkeypatch.setattr(amx_cpu, "_PARTIALS_BYTES", 0)
    got = amx_cpu.conv_grad_weight(g, x, ws, stride, padding, dilation)
    assert got is not None
    assert torch.equal(got.long(), _oracle(g, x, ws, stride, padding, dilation))


@needs_amx
@pytest.mark.parametrize("threads", [1, 3])
def test_thread_count_does_not_change_the_sums(threads):
    g, x, ws = _case(5, 32, 10, 10, 48, (3, 3), (1, 1), (1, 1), (1, 1), seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = amx_cpu.conv_grad_weight(g, x, ws, (1, 1), (1, 1), (1, 1))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got.long(), _oracle(g, x, ws, (1, 1), (1, 1), (1, 1)))


@needs_amx
def test_batch_longer_than_an_int32_sum_is_split_exactly():
    """131 images of 32x32 positions: where input and gradient channel 0 hold 127 everywhere,
    the weight-gradient sum is 134144 * 127**2 > 2**31; the batch runs in int32 parts added in
    int64."""
    g, x, ws = _case(131, 16, 32, 32, 16, (1, 1), (1, 1), (0, 0), (1, 1), seed=7)
    x[:, 0], g[:, 0] = 127, 127
    got = amx_cpu.conv_grad_weight(g, x, ws, (1, 1), (0, 0), (1, 1))
    want = _oracle(g, x, ws, (1, 1), (0, 0), (1, 1))
    assert want[0, 0, 0, 0] == 131 * 1024 * 127**2 > 2**31
    assert got.dtype == torch.int64 and torch.equal(got, want)


@needs_amx
def test_operands_within_127_sum_128_images_of_32x32_at_once(monkeypatch):
    """With ``magnitude=127`` (the quantiser's 8-bit mantissas) 128 x 1024 positions of extreme
    products stay below 2**31 (2,130,706,432): one int32 sum, exact; the default bound (any int8)
    cuts the batch in two."""
    from muppet_fx.kernels import gemm_cpu

    g, x, ws = _case(128, 16, 32, 32, 16, (1, 1), (1, 1), (0, 0), (1, 1), seed=8)
    x[:, 0], g[:, 0] = 127, 127
    want = _oracle(g, x, ws, (1, 1), (0, 0), (1, 1))
    parts = []
    real = gemm_cpu.sum_in_image_parts
    monkeypatch.setattr(gemm_cpu, "sum_in_image_parts", lambda *a: parts.append(1) or real(*a))
    got = amx_cpu.conv_grad_weight(g, x, ws, (1, 1), (0, 0), (1, 1), magnitude=127)
    assert not parts and got.dtype == torch.int32 and torch.equal(got.long(), want)
    assert want[0, 0, 0, 0] == 128 * 1024 * 127**2
    assert torch.equal(amx_cpu.conv_grad_weight(g, x, ws, (1, 1), (0, 0), (1, 1)), want) and parts
    assert amx_cpu.conv_grad_weight(g, x, ws, (1, 1), (0, 0), (1, 1), pad=-128, magnitude=127) is None


@needs_amx
def test_gemm_route_takes_it_and_agrees_with_im2col(monkeypatch):
    g, x, ws = _case(3, 16, 9, 9, 24, (3, 3), (2, 2), (1, 1), (1, 1), seed=5)
    calls = []
    real = amx_cpu.conv_grad_weight
    monkeypatch.setattr(amx_cpu, "conv_grad_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = gemm_cpu.conv_grad_weight(g, x, ws, (2, 2), (1, 1), (1, 1))
    monkeypatch.setattr(amx_cpu, "conv_grad_weight", lambda *a, **k: None)
    slow = gemm_cpu.conv_grad_weight(g, x, ws, (2, 2), (1, 1), (1, 1))
    assert calls and torch.equal(fast.long(), slow.long())


@needs_amx
def test_other_layouts_are_copied_to_channels_last():
    g, x, ws = _case(2, 16, 12, 12, 16, (3, 3), (1, 1), (1, 1), (1, 1))
    want = _oracle(g, x, ws, (1, 1), (1, 1), (1, 1))
    assert torch.equal(amx_cpu.conv_grad_weight(g, x.contiguous(), ws, (1, 1), (1, 1), (1, 1)).long(), want)
    w = torch.randint(-127, 128, ws, dtype=torch.int8)
    y = amx_cpu.conv_forward(x.contiguous(), w, 1, 1, 1)
    assert torch.equal(y.long(), torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1).long())


@pytest.mark.parametrize("what", ["channels", "dtype", "taps"])
def test_declines_what_it_does_not_cover(what):
    g, x, ws = _case(2, 16, 12, 12, 16, (3, 3), (1, 1), (1, 1), (1, 1))
    if what == "channels":
        g, x, ws = _case(2, 3, 8, 8, 16, (3, 3), (1, 1), (1, 1), (1, 1))
    elif what == "dtype":
        x = x.to(torch.int16)
    else:
        g, x, ws = _case(1, 16, 12, 12, 16, (9, 9), (1, 1), (4, 4), (1, 1))
    assert amx_cpu.conv_grad_weight(g, x, ws, (1, 1), (1, 1) if what != "taps" else (4, 4), (1, 1)) is None


def test_declines_without_amx():
    if amx_cpu.available():
        pytest.skip("this CPU has AMX: the kernels run (tested above)")
    g, x, ws = _case(2, 16, 8, 8, 16, (3, 3), (1, 1), (1, 1), (1, 1))
    assert amx_cpu.conv_grad_weight(g, x, ws, (1, 1), (1, 1), (1, 1)) is None


def _forward_case(n, c, h, w, cout, kernel, stride, padding, dilation, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (n, c, h, w), generator=gen, dtype=torch.int8).contiguous(
        memory_format=torch.channels_last)
    wt = torch.randint(-128, 128, (cout, c, *kernel), generator=gen, dtype=torch.int8)
    return x, wt


FORWARD_CASES = [  # output rows of at least 8 positions (amx_cpu.MIN_WIDTH)
    (2, 16, 7, 9, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 32, 11, 17, 5, (3, 1), (2, 1), (0, 2), (1, 1)),
    (1, 16, 19, 19, 33, (3, 3), (2, 2), (1, 1), (2, 2)),
    (2, 48, 6, 8, 17, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 16, 13, 12, 1, (5, 5), (1, 1), (2, 2), (1, 1)),
    (2, 128, 9, 21, 40, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 80, 5, 6, 7, (3, 3), (1, 1), (3, 3), (1, 1)),  # 16-channel pieces; padding wider than the kernel
    (2, 32, 9, 12, 24, (3, 3), (1, 1), (1, 1), (1, 1)),  # pieces of two pixels, the second group half empty
    (1, 32, 8, 10, 16, (2, 5), (2, 1), (0, 2), (1, 1)),  # three groups of two pixels, strided rows
    (2, 16, 10, 11, 17, (1, 7), (1, 1), (0, 3), (1, 1)),  # groups of four pixels, 7 columns
    # kernel rows as byte runs cut into 64-byte pieces, the last one partly past the run:
    (2, 16, 17, 19, 18, (3, 3), (2, 2), (1, 1), (1, 1)),  # one piece, strided rows
    (1, 48, 9, 13, 16, (3, 3), (1, 1), (1, 1), (1, 2)),  # 64 + 64 + 16 bytes
    (2, 96, 5, 9, 20, (1, 1), (1, 1), (0, 0), (1, 1)),  # one tap of 96 channels: 64 + 32
]


@needs_amx
@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
def test_forward_exact_on_odd_shapes(case, weight_layout):
    *shape, stride, padding, dilation = case
    x, w = _forward_case(*shape, stride, padding, dilation)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.conv2d(x.double(), w.double(), None, stride, padding, dilation).long()
    for reuse in (True, False):
        got, top = amx_cpu.conv_forward(x, w, stride, padding, dilation, reuse=reuse, with_absmax=True)
        assert torch.equal(got.long(), want) and top == want.abs().max()
        assert got.is_contiguous(memory_format=torch.channels_last)
    scaled = amx_cpu.conv_forward(x, w, stride, padding, dilation, reuse=False, scale_exp=-13)
    assert scaled.dtype == torch.float32 and torch.equal(scaled, torch.ldexp(want.float(), torch.tensor(-13.0)))


def test_forward_declines_narrow_rows_and_others():
    x, w = _forward_case(2, 16, 4, 4, 16, (3, 3), (1, 1), (1, 1), (1, 1))
    assert amx_cpu.conv_forward(x, w, (1, 1), (1, 1), (1, 1)) is None  # 4 positions a row: im2col's
    x, w = _forward_case(2, 16, 12, 12, 16, (3, 3), (1, 1), (1, 1), (1, 1))
    assert amx_cpu.conv_forward(x, w.to(torch.int16), (1, 1), (1, 1), (1, 1)) is None
    x, w = _forward_case(2, 24, 12, 12, 16, (3, 3), (1, 1), (1, 1), (1, 1))
    assert amx_cpu.conv_forward(x, w, (1, 1), (1, 1), (1, 1)) is None  # channels not a multiple of 16


def _train_step(make_net, x, bits, exact):
    """Output, input gradient and parameter gradients of one step of ``make_net()`` prepared at
    ``bits`` on the ``aten`` route, with fixed seeds."""
    import muppet_fx

    pm = muppet_fx.prepare(make_net(), ladder=(bits, "fp32"), backend="aten", exact=exact)
    torch.manual_seed(1)
    xi = x.clone().requires_grad_()
    out = pm(xi)
    out.square().sum().backward()
    return out, xi.grad, [p.grad for p in pm.parameters()]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 16, 1), torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10))


@needs_amx
@pytest.mark.parametrize("bits", [8, 12])
def test_network_is_bit_identical_with_and_without_amx(monkeypatch, bits):
    """The integer products are exact either way and the output quantiser draws the same
    uniforms, so outputs and every gradient agree bit for bit."""
    x = torch.randn(4, 3, 16, 16)
    calls = []
    real = amx_cpu.conv_forward
    monkeypatch.setattr(amx_cpu, "conv_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_amx = _train_step(_net, x, bits, exact=True)
    assert calls
    monkeypatch.setattr(amx_cpu, "_library", lambda: None)
    without = _train_step(_net, x, bits, exact=True)
    assert torch.equal(with_amx[0], without[0]) and torch.equal(with_amx[1], without[1])
    assert all(torch.equal(a, b) for a, b in zip(with_amx[2], without[2]))


def test_split_karatsuba_planes_rebuild_the_mantissas():
    from muppet_fx.kernels import scaled_mm_cpu

    m = torch.randint(-8191, 8192, (3, 32, 5, 7), dtype=torch.int16).contiguous(memory_format=torch.channels_last)
    m[0, 0, 0, :3] = torch.tensor([-8191, 8191, 0], dtype=torch.int16)
    for t in (m, m.transpose(0, 1)):  # channels-last, and a transposed view (dense in another order)
        planes = scaled_mm_cpu.split_karatsuba(t, "test")
        if planes is None:
            pytest.skip("no C compiler")
        h, low, s = (p.to(torch.int32) for p in planes)
        assert torch.equal(128 * h + low, t.to(torch.int32)) and torch.equal(s, h + low)
        assert low.abs().max() <= 64 and s.abs().max() <= 127
    m[1, 2, 3, 4] = 8192
    assert scaled_mm_cpu.split_karatsuba(m, "test") is False  # 15 bits: four products needed
    assert scaled_mm_cpu.split_karatsuba(m[:, :, ::2], "test") is None  # not dense


@needs_amx
@pytest.mark.parametrize("case", FORWARD_CASES[:4] + [(1, 16, 4, 4, 16, (3, 3), (1, 1), (1, 1), (1, 1))])
def test_karatsuba_convolution_is_the_exact_product_rounded_once(case):
    from muppet_fx.kernels import gemm_cpu
    from muppet_fx.routes import _fresh_int_conv

    *shape, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(-8191, 8192, shape[:4], generator=gen, dtype=torch.int16).contiguous(
        memory_format=torch.channels_last)
    w = torch.randint(-8191, 8192, (shape[4], shape[1], *shape[5]), generator=gen, dtype=torch.int16)
    bias = torch.randn(shape[4])
    exact = torch.nn.functional.conv2d(x.double(), w.double(), None, stride, padding, dilation)  # < 2**53
    for e, b in ((-30, None), (-7, bias)):
        for geometry in (None, (stride, padding, dilation)):  # int32 maps and one C pass; combined in the tiles
            got = gemm_cpu.conv_karatsuba_scaled(_fresh_int_conv(stride, padding, dilation), x, w, e, b, geometry)
            want = torch.ldexp(exact, torch.tensor(float(e))).float()
            want = want if b is None else want + b.view(1, -1, 1, 1)
            assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)


def _wide_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 1), torch.nn.Flatten(), torch.nn.Linear(64 * 6 * 6, 10))


@needs_amx
@pytest.mark.parametrize("bits", [12, 14])
def test_wide_convolutions_at_9_to_14_bits_run_exact_on_amx(monkeypatch, bits):
    """On AMX CPUs the default route computes 9-14 bit convolutions of 64+ channel inputs as
    three int8 products: the same values, bit for bit, as the exact route."""

    x = torch.randn(4, 64, 12, 12).contiguous(memory_format=torch.channels_last)
    calls = []
    real = gemm_cpu.conv_karatsuba_scaled
    monkeypatch.setattr(gemm_cpu, "conv_karatsuba_scaled", lambda *a: calls.append(1) or real(*a))
    default = _train_step(_wide_net, x, bits, exact=False)
    assert len(calls) >= 3  # forwards of all three convolutions and the stride-1 grad-input
    exact = _train_step(_wide_net, x, bits, exact=True)
    assert torch.equal(default[0], exact[0]) and torch.equal(default[1], exact[1])
    assert all(torch.equal(a, b) for a, b in zip(default[2], exact[2]))


@needs_amx
@pytest.mark.parametrize("scaled", [False, True])
def test_forward_writes_a_window_of_its_grid_into_a_strided_view(scaled):
    """``out`` + ``origin``: the outputs from ``origin`` on land in the view's positions (here
    every other pixel of a larger map) and nothing else in the map changes."""
    x, w = _forward_case(2, 32, 12, 21, 24, (3, 3), (1, 1), (2, 2), (1, 1), seed=5)
    full = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 2, 1)  # 14 x 23 grid
    dtype = torch.float32 if scaled else torch.int32
    big = torch.full((2, 25, 19, 24), -7, dtype=dtype)  # [N, H, W, C]
    view = big[:, 1::2, ::2]  # 12 x 10 positions, 2 pixels apart
    got = amx_cpu.conv_forward(x, w, 1, 2, 1, scale_exp=-3 if scaled else None, out=view, origin=(2, 11))
    want = full[:, :, 2:14, 11:21]
    want = torch.ldexp(want, torch.tensor(-3.0)).float() if scaled else want.int()
    assert got is not None and torch.equal(got, want) and torch.equal(view.permute(0, 3, 1, 2), want)
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[:, 1::2, ::2] = False
    assert (big[untouched] == -7).all()
    assert amx_cpu.conv_forward(x, w, 1, 2, 1, out=view.float() if not scaled else view, origin=(2, 11)) is None
    assert amx_cpu.conv_forward(x, w, 1, 2, 1, scale_exp=-3, out=big[:, 1::2, ::2].float(), origin=(3, 11)) is None


STRIDED_GRAD_CASES = [  # (n, c, h, w, cout, kernel, stride, padding, dilation): phases at least 8 wide
    (2, 16, 32, 33, 32, (3, 3), (2, 2), (1, 1), (1, 1)),
    (3, 16, 17, 19, 48, (1, 1), (2, 2), (0, 0), (1, 1)),  # three of four phases stay zero
    (1, 32, 20, 27, 16, (5, 3), (3, 2), (2, 1), (1, 1)),
    (2, 16, 21, 22, 32, (3, 3), (2, 2), (2, 2), (2, 2)),
    (2, 33, 18, 16, 64, (3, 3), (2, 1), (1, 1), (1, 1)),
]


@needs_amx
@pytest.mark.parametrize("case", STRIDED_GRAD_CASES)
@pytest.mark.parametrize("bits", [8, 12])
def test_strided_grad_input_phases_are_stored_in_place_exactly(monkeypatch, case, bits):
    """A strided convolution's input gradient with each phase's correlation stored straight into
    its positions (AMX; three products at 9-14 bits): the exact sum rounded once, no im2col phase."""
    from muppet_fx import routes

    n, c, h, w, cout, kernel, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(2)
    lim, dtype = (127, torch.int8) if bits == 8 else (2047, torch.int16)
    oh, ow = ((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in
              zip((h, w), kernel, stride, padding, dilation))
    g = torch.randint(-lim, lim + 1, (n, cout, oh, ow), generator=gen, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    wt = torch.randint(-lim, lim + 1, (cout, c, *kernel), generator=gen, dtype=dtype)
    exact = torch.nn.grad.conv2d_input((n, c, h, w), wt.double(), g.double(), stride, padding,
                                       dilation)  # integers below 2**53
    monkeypatch.setattr(gemm_cpu, "_grad_input_by_phases", lambda *a: pytest.fail("im2col phases ran"))
    got = gemm_cpu.conv_grad_input(g, wt, (n, c, h, w), stride, padding, dilation, place=routes._placed_conv(-9))
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, torch.ldexp(exact, torch.tensor(-9.0)).float())
