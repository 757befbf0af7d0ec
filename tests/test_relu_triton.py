"""ReLU with a byte mask on the Triton route (``muppet_fx.kernels.relu_triton``).

Oracle: torch's own ops, bit for bit (``torch.relu``, ``a + b``, ``where(mask, grad, 0)``), on
odd sizes with NaN, infinities, zeros of both signs; the max slot the output carries against a
fresh quantisation of it.
"""
import pytest
import torch

from muppet_fx.kernels import quantise, relu_triton
from muppet_fx.numerics import quantise_parts

from .conftest import DEVICES

pytestmark = pytest.mark.skipif(not DEVICES, reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    monkeypatch.setattr(quantise, "FORCE_TRITON_PATH", True)  # CPU tensors too, in the interpreter


def _special(shape, device, seed, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    flat = x.view(-1)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1e-45])
    flat[:6] = special[:flat.numel()]
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,channels_last", [((1,), False), ((7, 33), False), ((3, 5, 17, 19), True),
                                                 ((2, 1025), False)])
def test_bit_identical_to_torch(device, shape, channels_last):
    if shape == (1,):
        x, b = torch.tensor([-0.0], device=device), torch.tensor([0.0], device=device)
    else:
        x, b = _special(shape, device, 0, channels_last), _special(shape, device, 1, channels_last)
    y, mask = relu_triton.relu_with_mask(x)
    assert torch.equal(_bits(y), _bits(torch.relu(x))) and y.stride() == x.stride()
    assert torch.equal(mask, (torch.relu(x) != 0).to(torch.uint8)) and mask.stride() == x.stride()
    y2, mask2 = relu_triton.add_relu_with_mask(x, b)
    assert torch.equal(_bits(y2), _bits(torch.relu(x + b))) and torch.equal(mask2, (torch.relu(x + b) != 0).byte())
    g = _special(shape, device, 2, channels_last)
    got = relu_triton.relu_mask_backward(g, mask2)
    assert torch.equal(_bits(got), _bits(torch.where(mask2.bool(), g, 0.0)))


@pytest.mark.parametrize("device", DEVICES)
def test_output_carries_its_max_for_the_next_quantiser(device):
    x = torch.randn(3, 8, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    y, _ = relu_triton.relu_with_mask(x)
    assert quantise.recorded_amax_slot(y) is not None
    got, want = quantise_parts(y, 8, "nearest"), quantise_parts(y.clone(), 8, "nearest")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    x[0, 0, 0, 0] = float("nan")
    y, _ = relu_triton.add_relu_with_mask(x, x)
    assert int(quantise_parts(y, 8, "nearest")[1]) == -(2**30)  # the NaN marker from the slot's flag


@pytest.mark.parametrize("device", DEVICES)
def test_declines_what_it_does_not_cover(device):
    a = torch.randn(2, 3, 4, 5, device=device)
    assert relu_triton.relu_with_mask(a.double()) is None
    assert relu_triton.relu_with_mask(a.transpose(1, 2)) is None  # not dense in a walkable order
    assert relu_triton.add_relu_with_mask(a, a[:1]) is None  # broadcasting
    assert relu_triton.add_relu_with_mask(a, a.double()) is None
    assert relu_triton.add_relu_with_mask(a, a.contiguous(memory_format=torch.channels_last)) is None
    mask = torch.ones_like(a, dtype=torch.uint8)
    assert relu_triton.relu_mask_backward(a, mask.bool()) is None
    assert relu_triton.relu_mask_backward(a.contiguous(memory_format=torch.channels_last), mask) is None


def test_off_the_triton_route_nothing_applies(monkeypatch):
    monkeypatch.setattr(quantise, "FORCE_TRITON_PATH", False)
    a = torch.randn(4, 5)
    assert relu_triton.relu_with_mask(a) is None and relu_triton.add_relu_with_mask(a, a) is None
    assert relu_triton.relu_mask_backward(a, torch.ones_like(a, dtype=torch.uint8)) is None
