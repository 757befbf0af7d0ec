"""Configuration of a prepared model: frozen, validated data (SPEC sections 2 and 4)."""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from muppet_fx.numerics import ROUNDINGS

__all__ = ["MuppetConfig", "DEFAULT_LADDER", "FP32", "ROUTES"]

FP32 = "fp32"
DEFAULT_LADDER = (8, 12, 14, 16, FP32)
# Kernel routes for the quantised products (see muppet_fx.routes). "emulate": fake-quantised
# operands, FP32 products (what the paper ran); "aten": exact integer kernels on the CPU;
# "triton": Triton INT8/FP16 kernels on CUDA; "auto": triton on CUDA, aten on CPU.
ROUTES = ("auto", "emulate", "aten", "triton")
GRANULARITIES = ("tensor", "channel")


def as_level(level):
    """A precision level as the ladder holds it: ``"fp32"`` or a Python int (NumPy and 0-d
    torch integers convert); floats and bools stay as given, for the caller's error."""
    if isinstance(level, (str, bool, float)):
        return level
    try:
        return operator.index(level)
    except TypeError:
        return level


@dataclass(frozen=True)
class MuppetConfig:
    """Everything ``prepare`` needs to know.

    Args:
        ladder: precision levels in climbing order: word lengths (2..24) then optionally ``"fp32"``.
        backend: kernel route for the quantised products (see ``ROUTES``).
        rounding: rounding of weights and activations in forward (gradients always use
            stochastic rounding, SPEC section 2).
        grad_rounding: rounding of the incoming gradient in backward.
        weight_granularity: ``"tensor"`` (one exponent per weight, the paper's choice) or
            ``"channel"`` (one per output channel).
        quantise_outputs: quantise each layer's output feature map (SPEC section 2).
        exact: force exact routes at every level.
        compact_activations: at fixed-point levels, batch norms after quantised layers keep
            their input for backward as mantissas and ReLUs keep byte masks (same values and
            gradients, less memory; see ``muppet_fx.compact``).
        module_filter_fn: ``fn(module, fqn) -> bool``; modules for which it returns False stay
            FP32 (listed in the summary).
    """

    ladder: tuple = DEFAULT_LADDER
    backend: str = "auto"
    rounding: str = "stochastic"
    grad_rounding: str = "stochastic"
    weight_granularity: str = "tensor"
    quantise_outputs: bool = True
    exact: bool = False
    compact_activations: bool = True
    module_filter_fn: Callable[[nn.Module, str], bool] | None = field(default=None, compare=False)

    def __post_init__(self):
        ladder = tuple(as_level(v) for v in self.ladder)
        if not ladder:
            raise ValueError("ladder is empty; give word lengths (2..24) and optionally 'fp32', "
                             f"e.g. {DEFAULT_LADDER}")
        for i, level in enumerate(ladder):
            is_bits = isinstance(level, int) and 2 <= level <= 24
            if not (is_bits or level == FP32) or (level == FP32 and i != len(ladder) - 1):
                raise ValueError(f"ladder entry {level!r} at position {i} is invalid: entries are "
                                 "ints in [2, 24] and 'fp32' may only come last")
        bits = [b for b in ladder if b != FP32]
        if bits != sorted(set(bits)):
            raise ValueError(f"ladder {ladder} does not climb: word lengths must increase, "
                             f"e.g. {DEFAULT_LADDER}")
        object.__setattr__(self, "ladder", ladder)
        for name, value, valid in (("backend", self.backend, ROUTES),
                                   ("rounding", self.rounding, ROUNDINGS),
                                   ("grad_rounding", self.grad_rounding, ROUNDINGS),
                                   ("weight_granularity", self.weight_granularity, GRANULARITIES)):
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not supported; valid choices: {valid}")
        for name in ("quantise_outputs", "exact", "compact_activations"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.exact and self.backend == "emulate":
            raise ValueError("exact=True needs an exact route: backend 'auto', 'aten' or 'triton', "
                             "not 'emulate' (FP32 accumulation rounds above 8 bits)")
        if self.module_filter_fn is not None and not callable(self.module_filter_fn):
            raise TypeError(f"module_filter_fn must be callable, got {type(self.module_filter_fn).__name__}")

    @classmethod
    def build(cls, config: "MuppetConfig | None" = None, **overrides) -> "MuppetConfig":
        """``config`` (or the defaults) with ``overrides`` applied; unknown keys raise."""
        if config is not None and not isinstance(config, MuppetConfig):
            raise TypeError(f"config must be a MuppetConfig, got {type(config).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"unknown config option(s) {unknown}; valid options: {valid}")
        return dataclasses.replace(config or cls(), **overrides)
