"""The FP16-throughout baseline: weights, activations and gradients in IEEE FP16, no FP32 master
copy, dynamic loss scaling. CPUs have no FP16 arithmetic (about 1 GFLOP/s here), so on the CPU
the same mode runs in BF16 and says so."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["half_dtype", "to_half", "DynamicLossScaler"]


def half_dtype(device: torch.device | str) -> torch.dtype:
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def to_half(model: nn.Module, device: torch.device | str = "cpu") -> tuple[nn.Module, str]:
    """Move ``model`` (in place) to the half dtype of ``device``; normalisation layers too (the
    baseline keeps no FP32 copy). Returns the model and a one-line description for reports."""
    dtype = half_dtype(device)
    model.to(device=device, dtype=dtype)
    note = ("fp16 mode: IEEE float16 weights, activations and gradients" if dtype == torch.float16 else
            "fp16 mode on CPU: bfloat16 weights, activations and gradients (the CPU has no FP16 hardware)")
    return model, note


class DynamicLossScaler:
    """Loss scaling for half-precision gradients: multiply the loss by ``scale``; after
    backward, ``step(optimizer)`` unscales the gradients, skips the update (and halves the
    scale) when any is non-finite, and doubles the scale after ``growth_interval`` clean steps."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000,
                 min_scale: float = 1.0):
        if init_scale <= 0 or growth_interval < 1:
            raise ValueError(f"init_scale={init_scale} must be > 0 and growth_interval={growth_interval} >= 1")
        self.scale, self.growth_interval, self.min_scale = float(init_scale), growth_interval, min_scale
        self.clean_steps, self.skipped_steps = 0, 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            self.skipped_steps += 1
            self.clean_steps = 0
            self.scale = max(self.min_scale, self.scale / 2)
            return False
        for g in grads:
            g.div_(self.scale)
        optimizer.step()
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0 and math.isfinite(self.scale * 2):
            self.scale *= 2
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = state["scale"], state["clean_steps"]
        self.skipped_steps = state["skipped_steps"]
