"""The AVX-512 VNNI weight-gradient kernel (``kernels/vnni_cpu``): exact against float64
convolutions (every value below 2**53, so float64 sums are exact), the int32 runs that keep
long reductions exact, and its place in the integer route."""
import pytest
import torch

from muppet_fx.kernels import gemm_cpu, vnni_cpu

pytestmark = pytest.mark.skipif(not vnni_cpu.available(), reason="CPU without AVX-512 VNNI/VBMI (or no C compiler)")


def _exact(g, x, weight_shape, stride, padding, dilation):
    return torch.ops.aten.convolution_backward(
        g.double(), x.double(), torch.empty(weight_shape, dtype=torch.float64), None, stride, padding, dilation,
        False, [0, 0], 1, [False, True, False])[1]


def _operands(N, C, Cout, H, W, k, stride, padding, dilation, seed=0, channels_last=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (N, C, H, W), dtype=torch.int8, generator=gen)
    OH, OW = ((size + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for size in (H, W))
    g = torch.randint(-128, 128, (N, Cout, OH, OW), dtype=torch.int8, generator=gen)
    if channels_last:
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    return g, x


@pytest.mark.parametrize("N,C,Cout,H,W,k,stride,padding,dilation", [
    (1, 16, 16, 1, 1, 1, 1, 0, 1),     # one position
    (3, 16, 16, 7, 9, 3, 1, 1, 1),     # output widths not a multiple of 4
    (2, 32, 20, 10, 10, 3, 2, 1, 1),   # strided; output channels padded to 32 in the kernel
    (1, 48, 5, 5, 13, 1, 1, 0, 1),     # 1x1, three channel vectors
    (2, 64, 64, 8, 8, 3, 1, 1, 1),
    (2, 16, 7, 9, 11, 5, 2, 2, 2),     # dilated 5x5
    (2, 16, 16, 6, 6, 3, 1, 0, 1),     # unpadded
    (33, 16, 16, 4, 4, 3, 1, 1, 1),    # an odd batch over two threads, several images per chunk
    (2, 128, 129, 3, 5, 3, 1, 2, 1),   # padded wider than the kernel
])
def test_matches_exact_convolution(N, C, Cout, H, W, k, stride, padding, dilation):
    g, x = _operands(N, C, Cout, H, W, k, stride, padding, dilation)
    got = vnni_cpu.conv_grad_weight(g, x, (Cout, C, k, k), stride, padding, dilation)
    assert got.dtype == torch.int64 and got.shape == (Cout, C, k, k)
    assert torch.equal(got.double(), _exact(g, x, (Cout, C, k, k), [stride] * 2, [padding] * 2, [dilation] * 2))


def test_other_memory_orders_and_non_square_kernels():
    g, x = _operands(2, 16, 16, 9, 8, 3, 1, 1, 1, seed=1, channels_last=False)
    got = vnni_cpu.conv_grad_weight(g, x, (16, 16, 3, 3), (1, 1), (1, 1), (1, 1))
    assert torch.equal(got.double(), _exact(g, x, (16, 16, 3, 3), [1, 1], [1, 1], [1, 1]))
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-128, 128, (2, 32, 9, 10), dtype=torch.int8, generator=gen)
    g = torch.randint(-128, 128, (2, 8, 5, 10), dtype=torch.int8, generator=gen)  # 3x1 kernel, stride (2, 1)
    got = vnni_cpu.conv_grad_weight(g, x, (8, 32, 3, 1), (2, 1), (1, 0), (1, 1))
    assert torch.equal(got.double(), _exact(g, x, (8, 32, 3, 1), [2, 1], [1, 0], [1, 1]))


def test_long_reductions_of_extreme_values_stay_exact():
    """Every product at its extreme (x = 127 is the unsigned 255; g = -128), 90,000 positions
    per image: one int32 sum would overflow (90,000 * 255 * 128 > 2**31), so the kernel must
    close its runs in between; the int64 result -127 * 128 * 180,000 is exact."""
    x = torch.full((2, 16, 300, 300), 127, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    g = torch.full((2, 16, 300, 300), -128, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    got = vnni_cpu.conv_grad_weight(g, x, (16, 16, 1, 1), 1, 0, 1)
    assert torch.equal(got, torch.full((16, 16, 1, 1), -127 * 128 * 180_000, dtype=torch.int64))


def test_declines_what_it_does_not_cover():
    g, x = _operands(1, 16, 16, 4, 4, 3, 1, 1, 1)
    assert vnni_cpu.conv_grad_weight(g, x[:, :8], (16, 8, 3, 3), 1, 1, 1) is None  # channels not 16k
    assert vnni_cpu.conv_grad_weight(g.short(), x.short(), (16, 16, 3, 3), 1, 1, 1) is None
    assert vnni_cpu.conv_grad_weight(g[:, :0], x, (0, 16, 3, 3), 1, 1, 1) is None


def test_the_integer_route_takes_it_up_to_max_channels(monkeypatch):
    """``gemm_cpu.conv_grad_weight`` calls the kernel on CPUs without AMX tiles for up to
    ``MAX_CHANNELS`` input channels (above them im2col + ``torch._int_mm`` was faster) and
    returns the same integers as the im2col route."""
    if gemm_cpu.amx_cpu.available():
        pytest.skip("AMX CPUs take the AMX kernel")
    calls = []
    kernel = vnni_cpu.conv_grad_weight
    monkeypatch.setattr(vnni_cpu, "conv_grad_weight", lambda *a: calls.append(a[1].shape[1]) or kernel(*a))
    for C in (16, vnni_cpu.MAX_CHANNELS, 2 * vnni_cpu.MAX_CHANNELS):
        g, x = _operands(3, C, 24, 6, 7, 3, 1, 1, 1, seed=C)
        got = gemm_cpu.conv_grad_weight(g, x, (24, C, 3, 3), 1, 1, 1, magnitude=128)
        assert torch.equal(got.double(), _exact(g, x, (24, C, 3, 3), [1, 1], [1, 1], [1, 1]))
    assert calls == [16, vnni_cpu.MAX_CHANNELS]
