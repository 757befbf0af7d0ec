"""Exact integer convolutions on AVX-512 VNNI (``vnni_cpu.c``) for CPUs with int8 dot products
but no AMX tiles: AVX-512 VNNI, VBMI and BW (AMD Zen 4 and 5, Intel Ice Lake; measured on Zen
5). Intel Cascade Lake lacks VBMI and keeps the other routes.

Without AMX the integer convolutions had fallen back to oneDNN's int8 convolution (forward,
grad-input), which packs the weight on every call, and to im2col + ``torch._int_mm`` (weight
gradient), whose im2col matrix is 9x the input for a 3x3 kernel and whose long, thin
reduction (16 x 131,072 x 144 on ResNet-20's first stage) ran slower than FP32's. Here each
image is packed once into the byte order ``vpdpbusd`` reads and 16 int32 accumulators stay in
registers; see the C source for the layouts and the offset that makes unsigned x signed
products exact.

- :func:`conv_grad_weight`: lanes are input channels, a lane's 4 bytes 4 output columns
  (int16 operands on ``vpdpwssd``: 2 columns).
- :func:`conv2d`: lanes are 16 output positions, a lane's 4 bytes 4 input channels; int16
  operands on ``vpdpwssd`` (two products per lane); also one phase of a strided grad-input
  written in place.

Both return ``None`` where they do not apply, so callers keep their other routes.
"""
from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch

from .amx_cpu import _pairs
from .cbuild import bound_library
from .quantise_cpu import remember_absmax

__all__ = ["available", "conv_applies", "conv2d", "conv_grad_weight", "MAX_CHANNELS", "MAX_K"]

_I64 = ctypes.c_int64
_SIGNATURES = {
    "vnni_available": (ctypes.c_int, []),
    "vnni_conv_grad_weight": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int] + [_I64] * 7 + [ctypes.c_void_p] + [_I64] * 6
                              + [ctypes.c_int] * 8 + [ctypes.c_void_p, ctypes.c_int]),
    "vnni_conv_forward": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int] + [_I64] * 8 + [ctypes.c_void_p] * 2 + [_I64]
                          + [ctypes.c_int] * 8 + [_I64] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 2 + [_I64] * 3
                          + [ctypes.POINTER(ctypes.c_uint32), ctypes.c_int]),
}
# Longest reduction (taps x input channels) whose int32 lanes cannot overflow: 255 * 128 each.
MAX_K = (2**31 - 1) // (255 * 128)


# Input channels up to which the kernel beat im2col + ``torch._int_mm`` (AMD EPYC Zen 5, 2
# threads, batch 128, 3x3, same run): 3.4x at 16 channels on 32x32 maps, 3.0x at 32 on 16x16,
# 1.5x at 64 on 8x8 and 1.4x on 32x32; 1.0x at 128 on 16x16; above, ``torch._int_mm``'s
# blocking wins (0.73x at 256 on 8x8, 0.45x at 512 on 4x4).
MAX_CHANNELS = 64


@functools.cache
def _library():
    lib = bound_library(Path(__file__).with_name("vnni_cpu.c"), _SIGNATURES)
    return lib if lib is not None and lib.vnni_available() == 1 else None


def available() -> bool:
    """Whether the kernel was built for this CPU (AVX-512 VNNI, VBMI and BW)."""
    return _library() is not None


def conv_grad_weight(g_m: torch.Tensor, x_m: torch.Tensor, weight_shape, stride, padding,
                     dilation) -> torch.Tensor | None:
    """Exact int64 weight gradient ``[Cout, C, kh, kw]`` of a 2-d convolution (``groups == 1``)
    from int8 or int16 output-gradient and input mantissas, or ``None`` where the kernel does
    not apply: see the module notes; int16 operands both holding -32768 are declined too.
    Other layouts than channels-last are copied.

    int8 products run on ``vpdpbusd`` (a lane's 4 bytes: 4 output columns), int16 ones on
    ``vpdpwssd`` (2 columns), whose int32 lanes sum as many rows as the packed images' largest
    values allow (16 columns' worth of 12-bit pairs: 256 dword steps) before int64 takes them."""
    lib = _library()
    Cout, C, kh, kw = weight_shape
    if (lib is None or g_m.dtype not in (torch.int8, torch.int16) or x_m.dtype != g_m.dtype or x_m.dim() != 4
            or g_m.dim() != 4 or x_m.device.type != "cpu" or g_m.device.type != "cpu" or C % 16 or x_m.shape[1] != C
            or g_m.shape[1] != Cout or min(g_m.shape) == 0 or x_m.shape[0] != g_m.shape[0]):
        return None
    (sh, sw), (ph, pw), (dh, dw) = _pairs(stride, padding, dilation)
    x_m = x_m.contiguous(memory_format=torch.channels_last)  # a copy only for other layouts
    g_m = g_m.contiguous(memory_format=torch.channels_last)
    N, _, H, W = x_m.shape
    OH, OW = g_m.shape[2:]
    out = torch.empty(Cout, kh, kw, C, dtype=torch.int64)
    size = x_m.element_size()
    (xn, _, xh, xw), (gn, _, gh, gw) = ([v * size for v in t.stride()] for t in (x_m, g_m))  # bytes
    ok = lib.vnni_conv_grad_weight(g_m.data_ptr(), int(size == 2), N, Cout, OH, OW, gn, gh, gw, x_m.data_ptr(), C,
                                   H, W, xn, xh, xw, kh, kw, sh, sw, ph, pw, dh, dw, out.data_ptr(),
                                   torch.get_num_threads())
    return out.permute(0, 3, 1, 2) if ok else None


def conv_applies(x_m: torch.Tensor, w_m: torch.Tensor) -> bool:
    """Whether :func:`conv2d` takes ``x_m`` and ``w_m`` (see there; the exponent and int16
    extremes aside)."""
    Cout, C, kh, kw = w_m.shape if w_m.dim() == 4 else (0, 0, 0, 0)
    per_dword = 4 if x_m.dtype == torch.int8 else 2
    return (x_m.dtype in (torch.int8, torch.int16) and w_m.dtype == x_m.dtype and x_m.dim() == 4
            and x_m.device.type == "cpu" and C > 0 and C % per_dword == 0 and Cout % 16 == 0 and x_m.shape[1] == C
            and (x_m.dtype == torch.int16 or C * kh * kw <= MAX_K) and x_m.numel() > 0 and available())


def conv2d(x_m: torch.Tensor, w_m: torch.Tensor, e: int, stride, padding, dilation,
           bias: torch.Tensor | None = None, out: torch.Tensor | None = None, origin=(0, 0)) -> torch.Tensor | None:
    """float32 ``conv2d(x_m, w_m) * 2**e (+ bias)``, channels-last, from int8 or int16
    mantissas: the exact integer sums converted to float32 once and scaled (as
    ``conv_onednn.conv2d``), or ``None`` where the kernel does not apply (no AVX-512
    VNNI/VBMI, other dtypes, input channels not a multiple of 4 (int8) or 2 (int16), output
    channels not a multiple of 16, int8 reductions over ``MAX_K``, ``2**e`` outside float32's
    normal range, int16 operands both holding -32768).

    int16 operands run on ``vpdpwssd`` (two signed products per int32 lane, no offset): an
    int32 lane sums as many products as the image's and the weight's largest magnitudes allow
    (256 pairs for 12-bit mantissas, 16 at 14 bits, 1 at 16) before they are added in int64.

    ``out``: where given, a float32 ``[N, qh, qw, Cout]`` view with channel stride 1 (one phase
    of a strided grad-input, as ``gemm_cpu.conv_grad_input``'s ``place``) that receives the
    output positions ``origin[0] .. origin[0] + qh - 1`` by ``origin[1] .. origin[1] + qw - 1``;
    returns ``out``."""
    from .gemm_cpu import _max_abs  # gemm_cpu imports this module

    lib = _library()
    if (not conv_applies(x_m, w_m) or not -126 <= e <= 126
            or bias is not None and (bias.dtype != torch.float32 or bias.shape != (w_m.shape[0],))):
        return None
    Cout, C, kh, kw = w_m.shape
    wide = x_m.dtype == torch.int16
    w_top = _max_abs(w_m) if wide else 0
    (sh, sw), (ph, pw), (dh, dw) = _pairs(stride, padding, dilation)
    N, _, H, W = x_m.shape
    OH, OW = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    oy, ox = origin
    if out is None:
        if OH <= 0 or OW <= 0:
            return None
        y = torch.empty(N, Cout, OH, OW, dtype=torch.float32, memory_format=torch.channels_last)
    else:
        y, (OH, OW) = out, out.shape[1:3]
        if (y.dtype != torch.float32 or y.dim() != 4 or y.shape[0] != N or y.shape[3] != Cout or y.stride(3) != 1
                or oy < 0 or ox < 0 or OH <= 0 or OW <= 0):
            return None
    x_m = x_m.contiguous(memory_format=torch.channels_last)  # a copy only for other layouts
    # wq[i][j][c / 4][co]: 4 channels of one output channel as a dword; corr[co] = 128 * sum of
    # w[co] (the unsigned operand's offset)
    per_dword = 2 if wide else 4
    wq = w_m.permute(2, 3, 1, 0).unflatten(2, (C // per_dword, per_dword)).transpose(3, 4).contiguous()  # one copy
    corr = None if wide else w_m.sum((1, 2, 3), dtype=torch.int32).mul_(128)
    b = None if bias is None else bias.contiguous()
    xn, _, xh, xw = (stride * x_m.element_size() for stride in x_m.stride())  # bytes
    yn, yh, yw = (y.stride(0), y.stride(1), y.stride(2)) if out is not None else (y.stride(0), y.stride(2), y.stride(3))
    top = ctypes.c_uint32(0)
    ok = lib.vnni_conv_forward(x_m.data_ptr(), int(wide), w_top, N, C, H, W, xn, xh, xw, wq.data_ptr(),
                               None if corr is None else corr.data_ptr(), Cout,
                               kh, kw, sh, sw, ph, pw, dh, dw, oy, ox, OH, OW, math.ldexp(1.0, e),
                               None if b is None else b.data_ptr(), y.data_ptr(), yn, yh, yw, ctypes.byref(top),
                               torch.get_num_threads())
    if not ok:
        return None
    if out is None:
        remember_absmax(y, top.value)  # the quantiser reading y next skips its scan
    return y
