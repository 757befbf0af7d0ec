"""The AMX int8 GEMM (``kernels/amx_gemm``) against int64 products.

Runs where the CPU has AMX tiles (others skip; there every entry point must decline)."""
import pytest
import torch

from muppet_fx.kernels import amx_gemm, gemm_cpu, scaled_mm_cpu

needs_amx = pytest.mark.skipif(not amx_gemm.available(), reason="CPU without AMX int8 tiles")
SHAPES = [(1, 1, 1), (7, 33, 129), (33, 64, 17), (129, 200, 31), (16, 64, 16), (32, 128, 32), (65, 1000, 70),
          (3, 2000, 5), (96, 63, 95)]  # (M, K, N): block edges, K not a multiple of 64, single rows


@pytest.fixture
def every_size(monkeypatch):
    """Small products too, which the size thresholds otherwise leave to ``torch._int_mm``."""
    monkeypatch.setattr(amx_gemm, "MIN_MACS", 0)
    monkeypatch.setattr(amx_gemm, "MIN_ROWS", 0)
    monkeypatch.setattr(amx_gemm, "MIN_FILL", 0)


@pytest.fixture
def taken(monkeypatch):
    """For each call of ``routes.matmul_batched_int``, whether the tiles took the product."""
    from muppet_fx import routes

    log = []

    def batched(*args, original=routes.matmul_batched_int):
        y = original(*args)
        log.append(y is not None)
        return y

    monkeypatch.setattr(routes, "matmul_batched_int", batched)
    return log


def _operands(M, K, N, a_transposed, b_transposed, seed=0):
    """int8 ``a [M, K]``, ``b [K, N]``, each row-major or a transposed view (column-major)."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *s: torch.randint(-128, 128, s, generator=gen, dtype=torch.int8)  # noqa: E731
    a = draw(K, M).t() if a_transposed else draw(M, K)
    b = draw(N, K).t() if b_transposed else draw(K, N)
    return a, b


@needs_amx
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("a_transposed", [False, True])
@pytest.mark.parametrize("b_transposed", [False, True])
def test_matmul_is_exact(every_size, shape, a_transposed, b_transposed):
    a, b = _operands(*shape, a_transposed, b_transposed)
    got = amx_gemm.matmul(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), a.long() @ b.long())


@needs_amx
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_matmul_rounds_once(every_size, shape, with_bias):
    """float32(exact sum) * 2**e + bias, bit for bit: the int64 sum's own float32 rounding."""
    a, b = _operands(*shape, False, True, seed=1)
    bias = torch.randn(shape[2]) if with_bias else None
    for e in (-20, 0, 5):
        want = (a.long() @ b.long()).float() * 2.0**e
        want = want + bias if with_bias else want
        assert torch.equal(amx_gemm.scaled_matmul(a, b, e, bias), want)


@needs_amx
def test_out_with_row_stride(every_size):
    a, b = _operands(40, 70, 20, False, False, seed=2)
    big = torch.full((40, 33), 7, dtype=torch.int32)
    out = big[:, 5:25]
    assert amx_gemm.matmul(a, b, out) is out
    assert torch.equal(out.long(), a.long() @ b.long())
    assert (big[:, :5] == 7).all() and (big[:, 25:] == 7).all()  # nothing written outside the view


@needs_amx
def test_longest_reduction_stays_exact(every_size):
    """K = 131071 products of -128 * -128 sum to 2147467264, just below 2**31."""
    K = (2**31 - 1) // 128**2
    a = torch.full((16, K), -128, dtype=torch.int8)
    b = torch.full((K, 3), -128, dtype=torch.int8)
    assert (amx_gemm.matmul(a, b) == K * 16384).all()
    assert amx_gemm.matmul(a, torch.full((K + 1, 3), 1, dtype=torch.int8).narrow(0, 0, K)) is not None
    assert not amx_gemm.applies(torch.zeros(16, K + 1, dtype=torch.int8), torch.zeros(K + 1, 3, dtype=torch.int8))


@needs_amx
def test_routes_reach_it(every_size, monkeypatch):
    """``gemm_cpu.int8_mm`` and ``scaled_int_matmul``'s one-product case take the AMX kernel."""
    calls = []
    run = amx_gemm._run
    monkeypatch.setattr(amx_gemm, "_run", lambda *args: calls.append(1) or run(*args))
    a, b = _operands(33, 100, 21, False, True, seed=3)
    assert torch.equal(gemm_cpu.int8_mm(a, b).long(), a.long() @ b.long())
    y = scaled_mm_cpu.scaled_int_matmul(a, b, -3)
    assert torch.equal(y, (a.long() @ b.long()).float() / 8)
    assert len(calls) == 2


def test_declines_what_it_does_not_take(every_size):
    i8, i16 = torch.zeros(32, 64, dtype=torch.int8), torch.zeros(64, 32, dtype=torch.int16)
    assert amx_gemm.matmul(i8, i16) is None
    assert amx_gemm.matmul(i8.float(), i8.t().float()) is None
    assert amx_gemm.scaled_matmul(i8, i8.t(), 200) is None  # 2**200 is no float32
    assert amx_gemm.scaled_matmul(i8, i8.t(), 0, torch.zeros(5)) is None  # bias of the wrong length
    assert amx_gemm.matmul(i8, i8.t(), torch.empty(32, 32, dtype=torch.int64)) is None
    if not amx_gemm.available():
        assert amx_gemm.matmul(i8, i8.t()) is None


def test_size_thresholds_leave_small_products():
    small = torch.zeros(32, 64, dtype=torch.int8)
    assert not amx_gemm.applies(small, small.t())
    tall = torch.zeros(64, 8192, dtype=torch.int8)  # fewer rows than MIN_ROWS
    assert not amx_gemm.applies(tall, torch.zeros(8192, 576, dtype=torch.int8))


@needs_amx
@pytest.mark.parametrize("shape", [(3, 7, 33, 20), (5, 128, 64, 128), (2, 40, 130, 17), (4, 1, 1, 1)])
@pytest.mark.parametrize("layout", ["rows", "transposed", "shared_b", "shared_a"])
def test_batched_is_exact(every_size, shape, layout):
    """Batches of products, as attention's ``Q K^T`` and ``P V``: strided views, transposed
    operands, and an operand shared by every batch (batch stride 0)."""
    B, M, K, N = shape
    gen = torch.Generator().manual_seed(4)
    draw = lambda *s: torch.randint(-128, 128, s, generator=gen, dtype=torch.int8)  # noqa: E731
    a, b = draw(B, M, K), draw(B, K, N)
    if layout == "transposed":
        a, b = draw(B, K, M).transpose(1, 2), draw(B, N, K).transpose(1, 2)
    elif layout == "shared_b":
        b = draw(K, N).expand(B, K, N)
    elif layout == "shared_a":
        a = draw(M, K).expand(B, M, K)
    want = torch.bmm(a.long(), b.long())
    assert torch.equal(amx_gemm.matmul(a, b).long(), want)
    big = torch.zeros(B, M + 3, N + 5)
    out = big[:, 2:2 + M, 1:1 + N]  # rows and batches at strides of their own
    assert amx_gemm.scaled_matmul(a, b, -7, out=out) is out
    assert torch.equal(out, want.float() / 128)
    assert big[:, :2].abs().sum() == 0 and big[:, :, :1].abs().sum() == 0


def test_batched_shapes_must_agree(every_size):
    a = torch.zeros(3, 8, 64, dtype=torch.int8)
    assert not amx_gemm.applies(a, torch.zeros(2, 64, 8, dtype=torch.int8))  # batch sizes differ
    assert not amx_gemm.applies(a, torch.zeros(64, 8, dtype=torch.int8))  # ranks differ
    assert not amx_gemm.applies(a[None], torch.zeros(1, 3, 64, 8, dtype=torch.int8))  # 4-d


def test_thin_products_stay_off_the_tiles():
    """A head dimension of 8 would fill an eighth of each 64-deep tile step."""
    q, k = torch.zeros(4096, 128, 8, dtype=torch.int8), torch.zeros(4096, 8, 128, dtype=torch.int8)
    assert not amx_gemm.applies(q, k)


class _Attention(torch.nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` and a projection by a shared 2-d weight
    (a batched product whose weight is broadcast over the batch)."""

    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(64, 2, batch_first=True)
        self.w = torch.nn.Parameter(torch.randn(64, 48) / 8)

    def forward(self, x):
        return torch.matmul(self.mha(x, x, x, need_weights=False)[0], self.w)


def _attention_grads(pm, x):
    torch.manual_seed(5)  # the stochastic quantisers draw alike in both runs
    x = x.clone().requires_grad_()
    y = pm(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in pm.parameters()]
    pm.zero_grad(set_to_none=True)
    return y.detach(), grads


@needs_amx
def test_attention_products_on_the_tiles_match_exact_float_products(every_size, taken, monkeypatch):
    """Below 1040 terms int8 products sum exactly in FP32, so the float path the batched
    products took before is an exact oracle: the prepared block's outputs and every gradient
    agree bit for bit with the tiles on and off."""
    from muppet_fx import prepare

    torch.manual_seed(0)
    pm = prepare(_Attention(), ladder=(8, "fp32"))
    x = torch.randn(3, 20, 64)
    y_on, g_on = _attention_grads(pm, x)
    # Q K^T, P V, the projection by the broadcast weight, and two gradients of each
    assert taken == [True] * 9
    monkeypatch.setattr(amx_gemm, "MIN_MACS", 1 << 62)
    y_off, g_off = _attention_grads(pm, x)
    assert taken[9:] and not any(taken[9:])
    assert torch.equal(y_on, y_off)
    for a, b in zip(g_on, g_off):
        assert torch.equal(a, b)


@needs_amx
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_batched_route_rounds_the_exact_product_once(every_size, bits):
    """``routes.matmul_batched_int`` against float64 products of the mantissas (exact below
    2**53), rounded once to float32: one int8 product at 8 bits, the digit products above."""
    from muppet_fx import routes

    gen = torch.Generator().manual_seed(bits)
    top = 2 ** (bits - 1) - 1
    dtype = torch.int8 if bits == 8 else torch.int16
    a = torch.randint(-top, top + 1, (2, 3, 17, 40), generator=gen).to(dtype)
    b = torch.randint(-top, top + 1, (2, 3, 33, 40), generator=gen).to(dtype).transpose(-1, -2)  # as K^T
    a_s, b_s = torch.scalar_tensor(9, dtype=torch.int32), torch.scalar_tensor(4, dtype=torch.int32)
    for route in ("aten", "aten_exact"):
        got = routes.matmul_batched_int(route, a, a_s, b, b_s)
        want = (a.double() @ b.double() * 2.0**-13).float()
        assert got is not None and torch.equal(got, want)


@needs_amx
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 70, 130)])
@pytest.mark.parametrize("a_transposed", [False, True])
@pytest.mark.parametrize("b_transposed", [False, True])
def test_digit_products_round_once(every_size, shape, a_transposed, b_transposed):
    """16-bit mantissas, the four digit products summed in the tiles: float32 of the exact
    (float64, below 2**53) product, scaled, plus the bias, bit for bit."""
    *batch, M, K, N = shape
    gen = torch.Generator().manual_seed(M * K + N)
    draw = lambda *s: torch.randint(-32768, 32768, s, generator=gen, dtype=torch.int16)  # noqa: E731
    a = draw(*batch, K, M).transpose(-1, -2) if a_transposed else draw(*batch, M, K)
    b = draw(*batch, N, K).transpose(-1, -2) if b_transposed else draw(*batch, K, N)
    bias = torch.randn(N)
    got = amx_gemm.scaled_matmul_wide(a, b, -30, bias)
    want = (a.double() @ b.double()).float() * 2.0**-30 + bias
    assert torch.equal(got, want)


@needs_amx
def test_digit_products_at_the_extremes(every_size):
    """-32768 * -32768 over the longest reduction the digit sums allow: 2**30 * 32768 = 2**45."""
    K = amx_gemm.DIGITS_K
    a = torch.full((5, K), -32768, dtype=torch.int16)
    b = torch.full((K, 3), -32768, dtype=torch.int16)
    assert (amx_gemm.scaled_matmul_wide(a, b, -45) == 1.0).all()
    c = torch.full((K, 3), 32767, dtype=torch.int16)
    assert (amx_gemm.scaled_matmul_wide(a, c, 0) == float(-32768 * 32767 * K)).all()
    assert amx_gemm.scaled_matmul_wide(torch.zeros(5, K + 1, dtype=torch.int16),
                                       torch.zeros(K + 1, 3, dtype=torch.int16), 0) is None


@needs_amx
def test_sixteen_bit_linear_runs_exact_digit_products(every_size):
    """At 15-16 bits the default route used FP32 products of the values; on the tiles a linear
    layer's forward and both gradients are the exact products of the mantissas, rounded once."""
    from muppet_fx import prepare
    from muppet_fx.numerics import quantise_parts

    torch.manual_seed(0)
    layer = torch.nn.Linear(70, 45)
    pm = prepare(layer, ladder=(16, "fp32"), rounding="nearest", grad_rounding="nearest", quantise_outputs=False)
    x = torch.randn(33, 70, requires_grad=True)
    g = torch.randn(33, 45)
    y = pm(x)
    y.backward(g)
    (x_m, x_s), (w_m, w_s), (g_m, g_s) = (quantise_parts(t, 16, "nearest")[:2] for t in (x.detach(), layer.weight.detach(), g))
    exact = lambda a, b, s: (a.double() @ b.double() * 2.0 ** -int(s)).float()  # noqa: E731
    assert torch.equal(y, exact(x_m, w_m.t(), x_s + w_s) + layer.bias)
    assert torch.equal(x.grad, exact(g_m, w_m, g_s + w_s))
    assert torch.equal(layer.weight.grad, exact(g_m.t(), x_m, g_s + x_s))


def test_build_cache_key_follows_local_headers(tmp_path):
    """The AMX kernels share ``amx_tiles.h``: an edited header must change the cached library's
    key of every source that includes it, or a stale build would load."""
    from muppet_fx.kernels import cbuild

    (tmp_path / "shared.h").write_text("#define WIDTH 16\n")
    source = tmp_path / "kernel.c"
    source.write_text('#include <stdint.h>\n#include "shared.h"\nint width(void) { return WIDTH; }\n')
    before = cbuild._source_text(source)
    (tmp_path / "shared.h").write_text("#define WIDTH 32\n")
    after = cbuild._source_text(source)
    assert before != after and b"WIDTH 32" in after and b"int width" in after


@needs_amx
def test_float_outputs_record_their_absmax(every_size):
    """The largest |value| of a float32 output, gathered as the tiles are stored, is what the
    quantiser's own scan would find, so the output quantiser after a linear layer skips it."""
    from muppet_fx.kernels import quantise_cpu

    lib = quantise_cpu._library()
    scan = lambda t: lib.absmax_bits(t.data_ptr(), t.numel(), 1)  # noqa: E731
    a, b = _operands(70, 130, 45, False, True, seed=6)
    wide_a, wide_b = (t.to(torch.int16) * 200 for t in (a, b))
    for y in (amx_gemm.scaled_matmul(a, b, -9, torch.randn(45)), amx_gemm.scaled_matmul_wide(wide_a, wide_b, -20),
              amx_gemm.scaled_matmul(a.expand(3, 70, 130), b.expand(3, 130, 45), -2)):
        assert y._muppet_absmax == (y._version, scan(y))
        view = quantise_cpu.carry_absmax(y, y.reshape(-1))
        assert view._muppet_absmax == (view._version, scan(y))
        y.add_(1.0)  # an in-place change voids the record
        assert quantise_cpu.carry_absmax(y, y.reshape(-1)).__dict__.get("_muppet_absmax") is None
    assert getattr(amx_gemm.matmul(a, b), "_muppet_absmax", None) is None  # int32 outputs: no record


class _Product(torch.nn.Module):
    def forward(self, a, b):
        return torch.matmul(a, b)


@needs_amx
def test_batched_gradients_split_between_tiles_and_values(every_size, taken, monkeypatch):
    """With 8 output columns the gradient of ``a`` reduces over 8 terms (an eighth of a tile
    step: left to FP32 products of the values) while that of ``b`` fills its tiles: each takes
    its own path, and both agree bit for bit with the all-values run (exact below 1040 terms)."""
    from muppet_fx import prepare

    monkeypatch.setattr(amx_gemm, "MIN_FILL", 0.25)
    pm = prepare(_Product(), ladder=(8, "fp32"))
    torch.manual_seed(0)
    a0, b0 = torch.randn(6, 128, 64), torch.randn(6, 64, 8)

    def run():
        torch.manual_seed(1)
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = pm(a, b)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        return y.detach(), a.grad, b.grad

    on = run()
    assert taken == [True, False, True]  # forward, gradient of a, gradient of b
    monkeypatch.setattr(amx_gemm, "MIN_MACS", 1 << 62)
    off = run()
    for x, y in zip(on, off):
        assert torch.equal(x, y)
