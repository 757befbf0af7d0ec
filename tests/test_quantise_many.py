"""Many tensors quantised in one call (an optimiser's gradients): every tensor gets bit for bit
what quantising it alone with the same seed gives, on the CPU kernel and on the Triton route."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import muppet_fx
from muppet_fx import numerics
from muppet_fx.kernels import quantise, quantise_many
from muppet_fx.kernels.quantise import HAS_TRITON, quantise_triton
from muppet_fx.kernels.quantise_cpu import c_kernel_available, quantise_cpu, quantise_many_in_place
from muppet_fx.numerics import fake_quantise_inplace, fake_quantise_many_inplace

from .conftest import DEVICES

needs_c = pytest.mark.skipif(not c_kernel_available(), reason="no C compiler for the CPU kernels")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _alone_cpu(t, bits, rounding, seed):
    return quantise_cpu(t.clone(), bits, rounding, seed=seed, want_mantissa=False, want_values=True)[2]


def _same(a, b):
    """Bit-equal, NaN where NaN."""
    return a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


scales = st.sampled_from([0.0, 1e-40, 1e-8, 1e-3, 1.0, 7.5, 1e4, 1e30, 1e37])  # finite: randn < 34
shapes = st.sampled_from([(1,), (7,), (33,), (16, 3, 3, 3), (2049,), (40000,), (3, 5, 4, 4)])


@needs_c
@settings(max_examples=60, deadline=None)
@given(specs=st.lists(st.tuples(shapes, scales, st.booleans()), min_size=1, max_size=6),
       bits=st.sampled_from([2, 4, 8, 12, 16, 24]), rounding=st.sampled_from(["nearest", "stochastic"]),
       seed=st.integers(0, 2**63))
def test_cpu_batch_equals_each_tensor_alone(specs, bits, rounding, seed):
    g = torch.Generator().manual_seed(seed % 2**31)
    tensors = []
    for shape, scale, channels_last in specs:
        t = torch.randn(shape, generator=g) * scale
        tensors.append(t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t)
    seeds = [(seed + 7919 * i) % 2**64 for i in range(len(tensors))]
    batch = [t.clone(memory_format=torch.preserve_format) for t in tensors]
    assert quantise_many_in_place(batch, bits, rounding, seeds) == []
    for t, b, s in zip(tensors, batch, seeds):
        assert b.stride() == t.stride()
        assert _same(b, _alone_cpu(t, bits, rounding, s))


@needs_c
@settings(max_examples=200, deadline=None)
@given(a=st.floats(0, allow_infinity=False, allow_nan=False, width=32), bits=st.integers(2, 24))
def test_cpu_exponent_from_the_absmax_bits(a, bits):
    # the C exponent (integer, from the float's bits) against the host's float64 rule: the value
    # a one-element tensor rounds to at nearest encodes the exponent
    x = torch.tensor([a, -a / 3])
    batch = [x.clone()]
    quantise_many_in_place(batch, bits, "nearest", [0])
    assert _same(batch[0], _alone_cpu(x, bits, "nearest", 0))


@needs_c
def test_cpu_declines_what_it_cannot_take_and_leaves_it_untouched():
    nan = torch.tensor([1.0, float("nan"), 2.0])
    inf = torch.tensor([float("-inf"), 0.5])
    half = torch.randn(5).bfloat16()
    strided = torch.randn(6, 4)[:, ::2]
    empty = torch.empty(0)
    fine = torch.randn(9)
    tensors = [nan, inf, fine, half, strided, empty]
    before = [t.clone() for t in tensors]
    left = quantise_many_in_place(tensors, 8, "stochastic", [1, 2, 3, 4, 5, 6])
    assert left == [0, 1, 3, 4, 5]
    for i in left:
        assert _same(tensors[i].float(), before[i].float())
    assert _same(fine, _alone_cpu(before[2], 8, "stochastic", 3))


@needs_c
def test_cpu_thread_count_does_not_change_the_result():
    tensors = [torch.randn(100_000), torch.randn(70_001) * 1e-3] + [torch.randn(17) for _ in range(9)]
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            batch = [t.clone() for t in tensors]
            quantise_many_in_place(batch, 12, "stochastic", list(range(11, 22)))
            outs.append(batch)
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@needs_c
def test_unseeded_batch_draws_what_one_call_per_tensor_drew():
    # MasterCopyOptimizer's seeds: the batch must leave a run's rounding, and torch's random
    # stream, exactly where one fake_quantise_inplace per gradient left them
    tensors = [torch.randn(s) for s in [(16, 3, 3, 3), (16,), (40000,), (10, 64)]]
    torch.manual_seed(123)
    alone = [fake_quantise_inplace(t.clone(), 8, "stochastic") for t in tensors]
    next_alone = torch.randint(0, 2**62, (3,))
    torch.manual_seed(123)
    batch = [t.clone() for t in tensors]
    fake_quantise_many_inplace(batch, 8, "stochastic")
    assert all(torch.equal(a, b) for a, b in zip(alone, batch))
    assert torch.equal(torch.randint(0, 2**62, (3,)), next_alone)


@needs_c
def test_batch_hands_a_nan_tensor_to_the_single_route_with_its_drawn_seed():
    tensors = [torch.randn(30), torch.tensor([float("nan"), 1.0, -2.5]), torch.randn(7)]
    torch.manual_seed(9)
    seeds = torch.randint(0, 2**62, (3,)).tolist()
    torch.manual_seed(9)
    batch = [t.clone() for t in tensors]
    fake_quantise_many_inplace(batch, 4, "stochastic")
    for t, b, s in zip(tensors, batch, seeds):
        assert _same(b, fake_quantise_inplace(t.clone(), 4, "stochastic", seed=s))
    assert math.isnan(batch[1][0]) and batch[1][1] == 1.0


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,rounding", [(8, "stochastic"), (16, "stochastic"), (2, "nearest"), (12, "nearest")])
def test_triton_batch_equals_each_tensor_alone(device, bits, rounding):
    g = torch.Generator().manual_seed(bits)
    specs = [((1,), 1.0), ((7,), 1e-40), ((33,), 3e38), ((16, 3, 3, 3), 1e-3), ((2049,), 5.0), ((1025,), 0.0),
             ((3, 5, 4, 4), 2.0)]
    tensors = [(torch.randn(s, generator=g) * c).to(device) for s, c in specs]
    tensors[-1] = tensors[-1].contiguous(memory_format=torch.channels_last)
    tensors.append(torch.tensor([1.0, float("nan"), -3.0, float("inf")], device=device))
    seeds = torch.randint(0, 2**62, (len(tensors),), generator=g).to(device)
    batch = [t.clone(memory_format=torch.preserve_format) for t in tensors]
    assert quantise_many.quantise_many_triton(batch, bits, rounding, seeds)
    for i, (t, b) in enumerate(zip(tensors, batch)):
        alone = quantise_triton(t.clone(memory_format=torch.preserve_format), bits, rounding, seed=seeds[i:i + 1],
                                want_mantissa=False, want_values=True)[2]
        assert b.stride() == t.stride()
        assert _same(b, alone), i


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_triton_batch_checks_its_arguments_and_caches_its_table(device):
    a, b = torch.randn(5, device=device), torch.randn(2000, device=device)
    seeds = torch.tensor([1, 2], device=device)
    with pytest.raises(ValueError, match=r"tensor 1 \(torch.bfloat16"):
        quantise_many.quantise_many_triton([a, b.bfloat16()], 8, "nearest", seeds)
    with pytest.raises(ValueError, match="seeds must be int64 of shape"):
        quantise_many.quantise_many_triton([a, b], 8, "nearest", seeds[:1])
    with pytest.raises(ValueError, match="rounding must be"):
        quantise_many.quantise_many_triton([a, b], 8, "up", seeds)
    quantise_many._TABLES.clear()
    assert quantise_many.quantise_many_triton([a, b], 8, "nearest", seeds)
    table = next(iter(quantise_many._TABLES.values()))
    assert table.tolist() == [0, 1, 1, 0, 0, 1, 0, 5, 5, 2000]  # owners, block indices, starts, sizes
    assert quantise_many.quantise_many_triton([b.clone()[:5].clone(), a.repeat(400)], 8, "nearest", seeds)
    assert len(quantise_many._TABLES) == 1  # the same sizes: the same table
    for n in range(1, 21):  # sizes changing every step (a sparse gradient's values): a bounded cache
        assert quantise_many.quantise_many_triton([a, torch.randn(n, device=device)], 8, "nearest", seeds)
    assert len(quantise_many._TABLES) == quantise_many._KEPT
    assert [k[1] for k in quantise_many._TABLES][-1] == (5, 20)  # the latest kept, the oldest gone
    assert not any(k[1] == (5, 2000) for k in quantise_many._TABLES)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_optimiser_quantises_gradients_in_one_batch_on_the_triton_route(device, monkeypatch):
    monkeypatch.setattr(quantise, "FORCE_TRITON_PATH", True)  # CPU tensors too, in the interpreter
    calls = []
    real = quantise_many.quantise_many_triton
    monkeypatch.setattr(numerics, "quantise_many_triton", lambda *a: calls.append(len(a[0])) or real(*a))

    def alone(*a, **k):
        raise AssertionError("a gradient was quantised on its own")

    monkeypatch.setattr(numerics, "quantise_triton", alone)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 5))
    grads = [torch.randn_like(p, device=device) for p in net.parameters()]
    seeds = list(range(40, 44))
    batch = [g.clone() for g in grads]
    fake_quantise_many_inplace(batch, 8, "stochastic", seeds)
    assert calls == [4]
    monkeypatch.setattr(numerics, "quantise_triton", quantise_triton)
    for g, b, s in zip(grads, batch, seeds):
        assert _same(b, fake_quantise_inplace(g.clone(), 8, "stochastic", seed=s))


@needs_c
def test_master_copy_optimizer_step_unchanged_by_the_batch():
    # the optimiser's gradients equal one fake_quantise_inplace each, drawn in order
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 10))
    pm = muppet_fx.prepare(net, ladder=(8, "fp32"))
    opt = muppet_fx.MasterCopyOptimizer(torch.optim.SGD(pm.parameters(), lr=0.0), pm)
    x = torch.randn(4, 3, 32, 32)
    torch.nn.functional.cross_entropy(pm(x), torch.tensor([1, 2, 3, 4])).backward()
    grads = [p.grad.clone() for p in pm.parameters()]
    torch.manual_seed(5)
    opt.step()
    torch.manual_seed(5)
    for g, p in zip(grads, pm.parameters()):
        q = fake_quantise_inplace(g, 8, "stochastic")
        assert torch.equal(q, p.grad)


def test_batch_without_a_c_compiler_goes_tensor_by_tensor(monkeypatch):
    from muppet_fx.kernels import quantise_cpu as qc

    monkeypatch.setattr(qc, "_lib", False)  # no C library: every tensor on the reference route
    tensors = [torch.randn(5, 3), torch.randn(40)]
    assert quantise_many_in_place([t.clone() for t in tensors], 8, "stochastic", [1, 2]) == [0, 1]
    batch = [t.clone() for t in tensors]
    fake_quantise_many_inplace(batch, 8, "stochastic", [11, 12])
    for t, b, s in zip(tensors, batch, [11, 12]):
        assert torch.equal(b, fake_quantise_inplace(t.clone(), 8, "stochastic", seed=s))
        assert not torch.equal(b, t) and b.unique().numel() <= 256
