"""Fast CPU quantiser: the reference's arithmetic with fewer passes over memory.

Where the reference masks non-finite entries and draws float32 uniforms with ``torch.rand``
(the slowest step on CPU), this path
- checks finiteness once through ``torch.aminmax`` (NaN and inf propagate into it) and takes the
  masked reference route only when something is not finite;
- computes the exponent on the host (the tensor is on the CPU, so this costs no device sync) and
  scales with one multiplication when ``2**s`` is a normal float32;
- draws stochastic-rounding uniforms from 64-bit integer words (``random_`` on int64 emits a
  whole 64-bit Mersenne-Twister draw per element, about twice as fast per byte as ``rand``): two
  24-bit uniforms ``r * 2**-24`` per word, the same resolution as ``torch.rand``'s float32 draws;
- works in place on one scratch tensor.
The results follow the reference exactly for nearest rounding and for the same ``noise``.
"""
from __future__ import annotations

import math

import torch

from .quantise import MAX_EXPONENT, quantise_reference

__all__ = ["quantise_cpu", "uniform24", "host_exponent"]

_TWO_M24 = 2.0 ** -24


def uniform24(numel: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``numel`` float32 uniforms on the grid ``k * 2**-24``, ``0 <= k < 2**24``."""
    words = torch.empty((numel + 1) // 2, dtype=torch.int64)
    words.random_(generator=generator)  # full 64-bit draws
    r = words.view(torch.int32)[:numel] & 0xFFFFFF
    return r.to(torch.float32).mul_(_TWO_M24)


def host_exponent(amax: float, bits: int, max_exponent: int) -> int:
    if amax == 0.0:
        return 0
    qmax = 2 ** (bits - 1) - 1
    mant, e = math.frexp(amax)  # amax = mant * 2**e, 0.5 <= mant < 1
    s = math.floor(math.log2(qmax)) - e  # then correct exactly with ldexp in float64
    while math.ldexp(amax, s) > qmax:
        s -= 1
    while math.ldexp(amax, s + 1) <= qmax:
        s += 1
    return min(s, max_exponent)


def _mul_pow2_(t: torch.Tensor, s: int) -> torch.Tensor:
    if -126 <= s <= 127:
        return t.mul_(math.ldexp(1.0, s))
    h = s // 2
    return t.mul_(math.ldexp(1.0, h)).mul_(math.ldexp(1.0, s - h))


def quantise_cpu(x: torch.Tensor, bits: int, rounding: str, *, axis: int | None = None,
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
    """Same contract as :func:`quantise_reference` (returns ``(m, s, finite)``; ``finite`` is
    ``None`` when every entry is finite)."""
    if axis is not None or x.numel() == 0:
        return quantise_reference(x, bits, rounding, axis=axis, generator=generator, noise=noise)
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return quantise_reference(x, bits, rounding, generator=generator, noise=noise)
    s = host_exponent(max(-lo, hi), bits, MAX_EXPONENT[x.dtype])
    v = _mul_pow2_(x.to(torch.float32, copy=True), s)
    if rounding == "nearest":
        m = v.round_()
    else:
        u = noise.to(torch.float32, copy=True) if noise is not None else uniform24(v.numel(), generator).view(v.shape)
        f = torch.floor(v)
        m = f.add_(u.lt_(v.sub_(f)).to(torch.float32))  # f + (u < v - f)
    return m, torch.tensor(s, dtype=torch.int32), None

