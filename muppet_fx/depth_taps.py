"""3-d convolutions on the 2-d integer kernels, one depth tap at a time.

A 3-d convolution sums its ``kd`` depth taps: tap ``i`` is a 2-d convolution of the input's
depth slices ``i * dd + sd * o`` (``o`` over the output depths, folded into the batch) with the
weight's slice ``w[:, :, i]``. The 2-d routes return each tap's exact integer sums scaled by
``2**e`` in float32, exact while the tap's sums stay below ``2**24``; while the taps' largest
magnitudes add up to less than that, every partial sum of the taps is exact too, so the result
is the exact integer sum scaled once, as a 2-d integer convolution returns it. Where that bound
fails (long reductions of large mantissas), the functions return ``None`` and the caller keeps
its other route. The weight gradient needs no sum across taps: each tap's slice is one 2-d
weight gradient.

Inputs are int8 mantissas of 5-d tensors (per-tensor exponents, ``groups == 1``); outputs are
float32 in the channels-last 3-d order (``[N, D, H, W, C]`` in memory).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from muppet_fx.kernels.quantise_cpu import absmax

__all__ = ["applies", "forward", "grad_input", "grad_weight"]

_EXACT = 2.0**24  # float32 holds every integer below this


def applies(x_m: Tensor, w_m: Tensor, groups: int, w_axis) -> bool:
    """Whether the taps take this convolution (int8 operands on the CPU, see the module notes)."""
    return (x_m.dim() == 5 and x_m.dtype == torch.int8 and w_m.dtype == torch.int8 and groups == 1
            and w_axis is None and x_m.device.type == "cpu" and x_m.numel() > 0)


def _out_depth(D: int, k: int, s: int, p: int, d: int) -> int:
    return (D + 2 * p - d * (k - 1) - 1) // s + 1


def _fold(t: Tensor, pad: int = 0) -> Tensor:
    """``[N, C, D, H, W]`` as ``[N, D + 2 pad, H, W, C]`` in memory (zeros in the depth padding)."""
    N, C, D, H, W = t.shape
    out = t.new_zeros(N, D + 2 * pad, H, W, C) if pad else t.new_empty(N, D, H, W, C)
    out[:, pad:pad + D].copy_(t.permute(0, 2, 3, 4, 1))
    return out


def _tap(folded: Tensor, start: int, step: int, count: int) -> Tensor:
    """Depth slices ``start + step * o`` of a folded tensor as a channels-last 2-d batch
    ``[N * count, C, H, W]`` (a copy where the slices are not one run)."""
    N, _, H, W, C = folded.shape
    part = folded[:, start:start + step * (count - 1) + 1:step]
    return part.reshape(N * count, H, W, C).permute(0, 3, 1, 2)


def _unfold(t: Tensor, N: int) -> Tensor:
    """A channels-last 2-d batch ``[N * D, C, H, W]`` as ``[N, C, D, H, W]`` (channels-last 3-d)."""
    _, C, H, W = t.shape
    return t.permute(0, 2, 3, 1).reshape(N, -1, H, W, C).permute(0, 4, 1, 2, 3)


def _absmax(t: Tensor) -> float:
    """The largest magnitude in ``t`` (NaN where ``t`` holds one: the bound then fails)."""
    top = absmax(t)
    return top if top is not None else float(t.abs().amax()) if t.numel() else 0.0


def forward(conv2d: Callable, x_m: Tensor, x_s: Tensor, w_m: Tensor, w_s: Tensor, e: int, bias,
            stride, padding, dilation) -> Tensor | None:
    """``conv3d(x, w) (+ bias)`` in float32 from ``conv2d(x_m, x_s, w_m, w_s, stride, padding,
    dilation)`` (a 2-d route returning scaled float32) per depth tap; ``None`` where the sums
    could round."""
    N, _, D = x_m.shape[:3]
    kd = w_m.shape[2]
    (sd, *s2), (pd, *p2), (dd, *d2) = stride, padding, dilation
    Do = _out_depth(D, kd, sd, pd, dd)
    if Do <= 0 or not -126 <= e <= 126:  # 2**e a normal float32, as the 2-d routes take it
        return None
    folded, y, room = _fold(x_m, pd), None, _EXACT * 2.0**e
    for i in range(kd):
        part = conv2d(_tap(folded, i * dd, sd, Do), x_s, w_m[:, :, i], w_s, s2, p2, d2)
        room -= _absmax(part)
        if not room > 0:  # NaN fails too
            return None
        y = part if y is None else y.add_(part)
    y = _unfold(y, N)
    return y if bias is None else y.add_(bias.view(1, -1, 1, 1, 1))


def grad_input(grad_input2d: Callable, g_m: Tensor, g_s: Tensor, w_m: Tensor, w_s: Tensor, e: int,
               x_shape, stride, padding, dilation) -> Tensor | None:
    """The input gradient ``[N, C, D, H, W]`` from ``grad_input2d(g_m, g_s, w_m, w_s, x_shape,
    stride, padding, dilation)`` per depth tap, each added at its input depths; ``None`` where
    the sums could round."""
    N, C, D, H, W = x_shape
    kd = w_m.shape[2]
    (sd, *s2), (pd, *p2), (dd, *d2) = stride, padding, dilation
    Do = g_m.shape[2]
    if not -126 <= e <= 126:
        return None
    g2 = _tap(_fold(g_m), 0, 1, Do)
    gx = torch.zeros(N, D + 2 * pd, H, W, C, dtype=torch.float32)
    room = _EXACT * 2.0**e
    for i in range(kd):
        part = grad_input2d(g2, g_s, w_m[:, :, i], w_s, (N * Do, C, H, W), s2, p2, d2)
        room -= _absmax(part)
        if not room > 0:  # NaN fails too
            return None
        start = i * dd
        gx[:, start:start + sd * (Do - 1) + 1:sd] += part.permute(0, 2, 3, 1).reshape(N, Do, H, W, C)
    return gx[:, pd:pd + D].permute(0, 4, 1, 2, 3)


def grad_weight(grad_weight2d: Callable, g_m: Tensor, g_s: Tensor, x_m: Tensor, x_s: Tensor, w_shape,
                stride, padding, dilation) -> Tensor:
    """The weight gradient ``w_shape`` from ``grad_weight2d(g_m, g_s, x_m, x_s, w_shape_2d,
    stride, padding, dilation)`` per depth tap: each tap's slice is one exact 2-d gradient."""
    Co, C, kd, kh, kw = w_shape
    (sd, *s2), (pd, *p2), (dd, *d2) = stride, padding, dilation
    Do = g_m.shape[2]
    g2, folded = _tap(_fold(g_m), 0, 1, Do), _fold(x_m, pd)
    taps = [grad_weight2d(g2, g_s, _tap(folded, i * dd, sd, Do), x_s, (Co, C, kh, kw), s2, p2, d2)
            for i in range(kd)]
    return torch.stack(taps, dim=2)
