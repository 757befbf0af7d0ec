"""Run-time state shared by every quantised layer of one prepared model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from muppet_fx.config import FP32, MuppetConfig, as_level

__all__ = ["Site", "PrecisionState", "Fp32Layer"]


@dataclass
class Site:
    """One quantised product in the model: a conv/linear layer or a matmul call.

    ``calls`` counts eager executions (not those inside a ``torch.compile`` graph); ``w_exp``/``x_exp``/``out_exp`` hold the last exponents as
    tensors (read lazily by ``summary`` so the forward never synchronises).
    """

    name: str
    op: str
    state: "PrecisionState" = field(repr=False)
    weight_axis: int | None = None
    calls: int = 0
    weight: torch.nn.Parameter | None = field(default=None, repr=False)  # a reference, no copy
    w_exp: torch.Tensor | None = field(default=None, repr=False)
    x_exp: torch.Tensor | None = field(default=None, repr=False)
    # Set by the memory pass where a compact batch norm reads this layer's output; the layer
    # then leaves ``(output, mantissas, exponent)`` here for that batch norm, which takes them.
    feeds_batch_norm: bool = False
    # ... and where that batch norm is the output's only reader: the quantiser then writes the
    # mantissas alone (the batch norm reads nothing else; the float32 values stay unquantised).
    output_values_unread: bool = False
    output_parts: tuple | None = field(default=None, repr=False)

    def record(self, x_exp: torch.Tensor | None, w_exp: torch.Tensor | None) -> None:
        if not torch.compiler.is_compiling():  # under torch.compile a counter would be a guard
            self.calls += 1                     # that fails every call: one recompile per step
        self.x_exp, self.w_exp = x_exp, w_exp


@dataclass(frozen=True)
class Fp32Layer:
    name: str
    op: str
    reason: str


class PrecisionState:
    """Current level and word lengths, read by every quantised op at run time.

    Changing ``fwd_bits`` within a fixed-point level (CPT) needs no new graph: the ops read it
    when they run.
    """

    def __init__(self, config: MuppetConfig):
        self.config = config
        self.sites: dict[str, Site] = {}
        self.fp32_layers: dict[str, Fp32Layer] = {}
        self.suspended = 0  # >0: quantised wrappers run the FP32 op
        self.stack: list = []  # prepared modules currently running, innermost last
        # the gradients the last optimiser step applied, for the manager's end-of-epoch policy;
        # the next training forward drops them, so they never live beside the next step's
        self.stepped_gradients: dict[str, torch.Tensor] = {}
        self.opaque: dict[str, str] = {}  # untraceable module path -> why
        self.set_level(config.ladder[0])

    @property
    def route(self) -> str:
        """The configured kernel route ("auto" resolves per device, see ``route_for``)."""
        return self.config.backend

    def route_for(self, device: torch.device) -> str:
        from muppet_fx.routes import resolve_route

        return resolve_route(self.config.backend, device, self.config.exact)

    @property
    def quantised(self) -> bool:
        return self.level != FP32

    def set_level(self, level) -> None:
        level = as_level(level)
        if not isinstance(level, (int, str)) or isinstance(level, bool) or level not in self.config.ladder:
            raise ValueError(f"precision level {level!r} is not in the ladder {self.config.ladder}")
        self.level = level
        self.fwd_bits = self.bwd_bits = None if level == FP32 else level

    def set_bits(self, fwd_bits: int, bwd_bits: int) -> None:
        """Word lengths inside the current fixed-point level (CPT); no graph changes."""
        if not self.quantised:
            raise ValueError("set_bits needs a fixed-point level; the model is at 'fp32'")
        for name, b in (("fwd_bits", fwd_bits), ("bwd_bits", bwd_bits)):
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 24:
                raise ValueError(f"{name}={b!r} must be an int in [2, 24]")
        self.fwd_bits, self.bwd_bits = fwd_bits, bwd_bits

    def site(self, name: str, op: str, weight_axis: int | None = None, weight=None) -> Site:
        """The site ``name``, created on first use. ``weight``: the parameter it multiplies, where
        the pass knows it (otherwise the layer's first call records it, which under
        ``torch.compile`` changes a guard and compiles the graph a second time)."""
        if name not in self.sites:
            self.sites[name] = Site(name, op, self, weight_axis)
        site = self.sites[name]
        if site.weight is None and isinstance(weight, torch.nn.Parameter):
            site.weight = weight
        return site

    def keep_fp32(self, name: str, op: str, reason: str) -> None:
        self.fp32_layers[name] = Fp32Layer(name, op, reason)
