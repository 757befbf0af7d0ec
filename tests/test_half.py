"""FP16-throughout baseline: half weights, loss scaling, overflow handling."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from muppet_fx.half import DynamicLossScaler, half_dtype, to_half


def test_cpu_runs_bf16_and_says_so():
    model, note = to_half(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), "cpu")
    assert half_dtype("cpu") == torch.bfloat16 and "bfloat16" in note and "CPU" in note
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_training_steps_and_overflow_skip():
    """Clean steps update the half weights; an overflowing gradient skips the step and halves
    the scale; the scale doubles after growth_interval clean steps."""
    torch.manual_seed(0)
    model, _ = to_half(nn.Linear(4, 3), "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    x, y = torch.randn(16, 4).bfloat16(), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        scaler.scale_loss(loss).backward()
        assert scaler.step(opt)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] and scaler.scale == 32.0
    before = [p.clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale_loss(F.cross_entropy(model(x).float(), y)).backward()
    model.weight.grad[0, 0] = float("inf")
    assert not scaler.step(opt) and scaler.skipped_steps == 1 and scaler.scale == 16.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="init_scale"):
        DynamicLossScaler(init_scale=0)
