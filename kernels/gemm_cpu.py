"""Exact integer GEMM and convolution on the CPU through ``torch._int_mm`` (int8 x int8 -> int32),
or on CPUs without int8 dot products through :mod:`gemm_avx2` (:func:`int8_mm`).

- Up to 8 bits: one ``_int_mm``; the K dimension is cut into chunks short enough that the int32
  accumulator cannot overflow (``K * 127 * 127 < 2**31``), partial sums added in int64.
- 9 to 14 bits: ``m = 128 h + l`` with ``|h|, |l| <= 64``, so ``h + l`` is an int8 as well and
  three products suffice (Karatsuba): ``A@B = 16384 HH + 128 ((Ah+Al)@(Bh+Bl) - HH - LL) + LL``.
- 15 and 16 bits: each int16 mantissa is split as ``m = 256 * h + l + 128`` with
  ``h = m >> 8`` and ``l = (m & 255) - 128``, both in int8. Then
  ``A @ B = 65536 Ah@Bh + 256 (Ah@Bl + Al@Bh) + Al@Bl + 128 rowsum(A') + 128 colsum(B') + 16384 K``
  (``A' = A - 128``): four int8 products and rank-one corrections, combined exactly in int64.
Every result is the exact integer product, converted once to float32 with the power-of-two
scale ``2**-(s_a + s_b)``.

Convolutions with ``groups == 1`` lower to these GEMMs by im2col on the int8/int16 mantissas
(never on FP32 data; the AMX and AVX2 kernels gather the patches without an im2col matrix); grad-input of a stride-1 convolution is the convolution of the gradient
with the flipped, transposed kernel, strided ones one such convolution per phase of the input
positions; grad-weight is ``G^T @ cols``. On AMX CPUs the 15-16 bit convolutions take the four
digit products on the tiles, with no im2col matrix (:func:`conv_digits_scaled`).
``*_reference`` functions compute the same integers in int64 with plain torch.
"""
from __future__ import annotations

import ctypes
import functools
import math
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from . import amx_cpu, amx_gemm, gemm_avx2, vnni_cpu
from .cbuild import load_c_library

__all__ = ["fast_int8", "integer_products_fast", "int8_mm", "int_matmul", "int_matmul_reference", "im2col",
           "conv_forward", "conv_grad_input", "conv_grad_weight", "workspace", "gemm_layout", "CHUNK"]

# Longest K for which an int32 accumulator of int8 products (|p| <= 128*128) cannot overflow.
CHUNK = (2**31 - 1) // (128 * 128)


@functools.cache
def fast_int8() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX), the
    only ones on which ``torch._int_mm`` runs at a useful rate. Without them (AVX2 only: AMD
    Zen 1-3, Intel before Cascade Lake) it took 1166 ms at 1024^3 against FP32's 23 ms (AMD
    EPYC, 2 threads), so the routes keep their products in FP32 there."""
    vnni, amx = (getattr(torch.cpu, name, None) for name in ("_is_vnni_supported", "_is_amx_tile_supported"))
    if vnni is not None and amx is not None and (vnni() or amx()):
        return True
    try:  # torch's helpers are private and may move; AVX-VNNI is not among them
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def gemm_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is plainly row-major (strides ``(cols, 1)``) or column-major (``(1, rows)``,
    both sides above 1), else a row-major copy. ``torch._int_mm`` on the CPU misreads the
    degenerate strides of a transposed single row or column (``(1, 1)`` for a 1x2 view) and
    returns garbage."""
    rows, cols = t.shape
    if t.stride() == (cols, 1) or (t.stride() == (1, rows) and rows > 1 and cols > 1):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _mm_int8(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK, mm=None) -> torch.Tensor:
    a, b = gemm_layout(a), gemm_layout(b)
    K = a.shape[1]
    if mm is not None:  # another int8 x int8 -> int32 kernel (the Triton one on CUDA)
        if K <= chunk:
            return mm(a, b)
        out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
        for k in range(0, K, chunk):
            out += mm(a[:, k:k + chunk], b[k:k + chunk])
        return out
    if K <= chunk:
        if a.shape[0] * b.shape[1] >= 1 << 16:  # large outputs: reuse memory (see workspace)
            out = workspace(a.shape[0] * b.shape[1], torch.int32, "acc").view(a.shape[0], b.shape[1])
            return int8_mm(a, b, out=out)
        return int8_mm(a, b)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64)
    for k in range(0, K, chunk):
        out += int8_mm(a[:, k:k + chunk], b[k:k + chunk])
    return out


def int8_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int32 ``a @ b`` of int8 matrices (``K <= CHUNK``, layouts as :func:`gemm_layout`
    leaves them): the AMX kernel (:mod:`amx_gemm`) where it applies, else ``torch._int_mm`` on
    CPUs with int8 dot products, else the AVX2 kernel (:mod:`gemm_avx2`, 1.7-4x FP32
    ``torch.mm`` where ``torch._int_mm`` ran at 0.02x)."""
    got = amx_gemm.matmul(a, b, out) if fast_int8() else gemm_avx2.int8_mm(a, b, out)
    if got is not None:
        return got
    return torch._int_mm(a, b) if out is None else torch._int_mm(a, b, out=out)


def integer_products_fast(bits: int) -> bool:
    """Whether exact integer products at ``bits`` beat FP32 products on this CPU: at every
    level up to 14 bits with int8 dot products (:func:`fast_int8`), and at 8 bits on AVX2-only
    CPUs through :mod:`gemm_avx2`. Its 9-12 bit products (one ``vpmaddwd`` product of int16
    operands, int64 accumulators) only matched FP32 products of the values on ResNet-18/20
    steps there, so they serve ``exact=True``."""
    return fast_int8() or bits <= 8 and gemm_avx2.available()


def _max_abs(m: torch.Tensor) -> int:
    lo, hi = torch.aminmax(m)
    return max(-int(lo), int(hi))


def _split(m: torch.Tensor):
    """int16 -> (h, l) int8 with m = 256 h + l + 128."""
    return (m >> 8).to(torch.int8), ((m & 255) - 128).to(torch.int8)


def _split128(m: torch.Tensor):
    """|m| <= 8191 -> (h, l) int8 with m = 128 h + l, |h| <= 64, |l| <= 64, |h + l| <= 128."""
    h = torch.div(m + 64, 128, rounding_mode="floor")
    return h.to(torch.int8), (m - 128 * h).to(torch.int8)


def int_matmul(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK, mm=None) -> torch.Tensor:
    """Exact ``a @ b`` for int8 or int16 2-d mantissa tensors (any strides); int32 or int64.

    ``mm`` replaces ``torch._int_mm`` as the int8 kernel. A large int32 result may live in a
    reused workspace: consume it before the next call."""
    if a.dtype == torch.int8 and b.dtype == torch.int8:
        return _mm_int8(a, b, chunk, mm)
    if a.dtype not in (torch.int8, torch.int16) or b.dtype not in (torch.int8, torch.int16):
        raise TypeError(f"int_matmul takes int8/int16 mantissas, got {a.dtype} and {b.dtype}")
    if mm is None and not fast_int8():  # AVX2: one product on int16 operands up to 12 bits
        acc = gemm_avx2.narrow_mm(a, b)
        if acc is not None:
            return acc
    a16, b16 = a.to(torch.int16), b.to(torch.int16)
    planes = _narrow_planes(a16, b16)
    if planes is not None:  # three products: A@B = 16384 HH + 128 (MID - HH - LL) + LL
        return _karatsuba_bilinear(lambda x, y: _mm_int8(x, y, chunk, mm), planes)
    ah, al = _split(a16)
    bh, bl = _split(b16)
    K = a.shape[1]
    out = _mm_int8(ah, bh, chunk, mm).to(torch.int64) * 65536
    out += (_mm_int8(ah, bl, chunk, mm).to(torch.int64) + _mm_int8(al, bh, chunk, mm)) * 256
    out += _mm_int8(al, bl, chunk, mm)
    out += 128 * (a16.sum(1, dtype=torch.int64) - 128 * K).unsqueeze(1)
    out += 128 * (b16.sum(0, dtype=torch.int64) - 128 * K).unsqueeze(0)
    return out + 16384 * K


def int_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int64 oracle."""
    return a.to(torch.int64) @ b.to(torch.int64)


def _pair(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


_IM2COL = {torch.int8: "im2col_i8", torch.int16: "im2col_i16"}
_lib = None
_workspace = threading.local()


def workspace(numel: int, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """A reusable flat buffer per thread, dtype and slot. Fresh large allocations cost more in
    page faults than im2col or the GEMM writing them, so intermediates reuse their memory."""
    key = (slot, dtype)
    buf = getattr(_workspace, "bufs", {}).get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        _workspace.__dict__.setdefault("bufs", {})[key] = buf
    return buf[:numel]


def _library():
    global _lib
    if _lib is None:
        lib = load_c_library(Path(__file__).with_name("im2col_cpu.c"))
        if lib is not None:
            for name in _IM2COL.values():
                fn = getattr(lib, name)
                fn.restype = None
                fn.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 8 + [ctypes.c_int] * 8
                               + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int])
        _lib = lib if lib is not None else False
    return _lib or None


def im2col(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """``[N, C, H, W]`` (any memory format) -> ``[N*OH*OW, kh*kw*C]`` patches, columns ordered
    (tap, channel) so that channels-last inputs copy whole channel vectors."""
    if x.dim() != 4:
        raise NotImplementedError(f"im2col handles 2-d convolutions, got a {x.dim()}-d input")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v, 2) for v in (kernel, stride, padding, dilation))
    N, C, H, W = x.shape
    OH, OW = _out_size(H, kh, sh, ph, dh), _out_size(W, kw, sw, pw, dw)
    lib = _library()
    if lib is not None and x.dtype in _IM2COL and x.device.type == "cpu":
        if x.stride(1) != 1 and C > 1:  # one small transpose buys contiguous channel copies
            x = x.contiguous(memory_format=torch.channels_last)
        out = workspace(N * OH * OW * kh * kw * C, x.dtype, "cols").view(N * OH * OW, kh * kw * C)
        getattr(lib, _IM2COL[x.dtype])(x.data_ptr(), N, C, H, W, *x.stride(), kh, kw, sh, sw,
                                       ph, pw, dh, dw, OH, OW, out.data_ptr(), torch.get_num_threads())
        return out
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    s = xp.stride()
    patches = xp.as_strided((N, OH, OW, kh, kw, C),
                            (s[0], s[2] * sh, s[3] * sw, s[2] * dh, s[3] * dw, s[1]))
    return patches.reshape(N * OH * OW, kh * kw * C)


def _taps_last(w: torch.Tensor) -> torch.Tensor:
    """``[Cout, C, kh, kw]`` -> ``[Cout, kh*kw*C]``, the column order of :func:`im2col`."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _to_nchw(y2d: torch.Tensor, N: int, OH: int, OW: int) -> torch.Tensor:
    """``[N*OH*OW, C]`` -> ``[N, C, OH, OW]`` in channels-last memory (no copy)."""
    return y2d.reshape(N, OH, OW, y2d.shape[-1]).permute(0, 3, 1, 2)  # not -1: N may be 0


def _out_size(H, k, s, p, d):
    return (H + 2 * p - d * (k - 1) - 1) // s + 1


def sum_in_image_parts(grad_weight, g_m: torch.Tensor, x_m: torch.Tensor, images: int):
    """``grad_weight(g, x)`` of a batch cut into equal parts of at most ``images`` images (so that
    each part's int32 sums are exact), the parts added in int64; ``None`` if a part declines."""
    N = x_m.shape[0]
    step = -(-N // -(-N // images))
    total = None
    for i in range(0, N, step):
        part = grad_weight(g_m[i:i + step], x_m[i:i + step])
        if part is None:
            return None
        total = part.to(torch.int64) if total is None else total + part
    return total


def _karatsuba_bilinear(f, planes):
    """Exact bilinear ``f`` (a conv or a GEMM that is exact on int8 operands) of two operands up
    to 14 bits from three int8 evaluations: with ``m = 128 h + l``,
    ``f(A, B) = 16384 f(Ah, Bh) + 128 (f(Ah+Al, Bh+Bl) - f(Ah, Bh) - f(Al, Bl)) + f(Al, Bl)``.
    ``planes``: the operands' ``(h, l, h + l)`` from :func:`_narrow_planes`."""
    (ah, al, asum), (bh, bl, bsum) = planes
    hh = f(ah, bh).to(torch.int64)
    ll = f(al, bl).to(torch.int64)
    mid = f(asum, bsum).to(torch.int64) - hh - ll
    return hh * 16384 + mid * 128 + ll


def _narrow_planes(a: torch.Tensor, b: torch.Tensor):
    """Karatsuba int8 planes ``((h, l, h + l), ...)`` of two int16 operands up to 14 bits (one
    C pass each where it applies, else torch ops after a range check), or ``None`` where an
    operand is wider (or not int16)."""
    if a.dtype != torch.int16 or b.dtype != torch.int16:
        return None
    pa = karatsuba_planes(a, "ka")
    pb = karatsuba_planes(b, "kb") if pa is not None else None
    return None if pb is None else (pa, pb)


def karatsuba_planes(t: torch.Tensor, tag: str):
    """``(h, l, h + l)`` of one int16 operand up to 14 bits (``tag``: the C pass's workspace),
    or ``None`` where it is wider."""
    from . import scaled_mm_cpu  # it imports this module

    p = scaled_mm_cpu.split_karatsuba(t, tag)
    if p is None and _max_abs(t) <= 8191:  # no C pass for this layout: torch ops
        h, low = _split128(t)
        p = (h, low, h + low)
    return p or None


def conv_karatsuba_scaled(conv, a16: torch.Tensor, b16: torch.Tensor, e: int, bias=None, geometry=None):
    """float32 ``conv(a16, b16) * 2**e (+ bias)`` for int16 mantissas up to 14 bits: three int8
    convolutions (Karatsuba) combined exactly in int64 and rounded once: with ``geometry``
    ``(stride, padding, dilation)``, on the AMX tiles as they are stored
    (:func:`amx_cpu.conv_forward_karatsuba`), else by one C pass over the int32 accumulators of
    ``conv(a8, b8)`` (a channels-last int32 tensor of its own, or ``None``). ``None`` where it
    does not apply."""
    planes = _narrow_planes(a16, b16)
    if planes is None:
        return None
    if geometry is not None:
        y = amx_cpu.conv_forward_karatsuba(*planes, *geometry, e, bias)
        if y is not None:
            return y
    (ah, al, asum), (bh, bl, bsum) = planes
    hh = conv(ah, bh)
    ll = conv(al, bl) if hh is not None else None
    mid = conv(asum, bsum) if ll is not None else None
    from . import scaled_mm_cpu  # it imports this module

    return None if mid is None else scaled_mm_cpu.combine_karatsuba(hh, mid, ll, e, bias)


# 15-16 bit convolutions on AMX. Each int16 operand splits as m = 256 h + l + 128 (int8 digit
# planes, scaled_mm_cpu.split_digits), so a product is four int8 ones plus the offsets' terms:
#   sum m_a m_b = 65536 HH + 256 (HL + LH) + LL + 128 (sum m_a - 128 K) + 128 (sum m_b - 128 K) + 16384 K
# over a reduction of K pairs, as in int_matmul. A zero-padded input position (m = 0) has h = 0 and
# l = -128, so the kernels read -128 outside the image in the l plane (their ``pad``), and the window
# sums of m over the padded input give the first offset term.
def conv_digits_scaled(conv, x16: torch.Tensor, w16: torch.Tensor, stride, padding, dilation, e: int, bias=None,
                       fused: bool = True):
    """float32 ``conv2d(x16, w16) * 2**e (+ bias)`` for int16 mantissas of any width (used above
    14 bits, where the three-product split does not fit): four int8 convolutions of the digit
    planes, combined with the offsets' terms exactly in int64 and rounded once, on the AMX
    tiles as they are stored (``fused``, :func:`amx_cpu.conv_forward_digits`), else by one C
    pass over four int32 maps from ``conv(a8, b8, pad)`` (a channels-last int32 tensor of its
    own, reading ``pad`` outside the image, or ``None``). ``None`` where neither applies."""
    from . import scaled_mm_cpu  # it imports this module

    xs, ws = _digits_with_sums(x16, "dx", "positions"), scaled_mm_cpu.split_digits(w16, "dw")
    if xs is None or ws is None:
        return None
    (xh, xl, position_sums), (wh, wl) = xs, ws
    K = w16[0].numel()
    ones = torch.ones((1, 1, *w16.shape[2:]), dtype=torch.float64)
    N, _, H, W = x16.shape
    window = F.conv2d(position_sums.view(N, 1, H, W).double(), ones, None, stride, padding, dilation)
    rc = (128 * (window.to(torch.int64) - 128 * K)).reshape(-1)  # exact: |window sum| < 2**53
    cc = 128 * (w16.sum((1, 2, 3), dtype=torch.int64) - 128 * K) + 16384 * K
    y = amx_cpu.conv_forward_digits(xh, xl, wh, wl, stride, padding, dilation, rc, cc, e, bias) if fused else None
    if y is not None:  # combined as the tiles are stored
        return y
    parts = []
    for a, b, pad in ((xh, wh, 0), (xh, wl, 0), (xl, wh, -128), (xl, wl, -128)):
        y = conv(a, b, pad)
        if y is None:
            return None
        parts.append(y)
    return scaled_mm_cpu.combine_digits(*parts, rc, cc, e, bias)


def _digits_with_sums(t: torch.Tensor, tag: str, sums: str):
    """``scaled_mm_cpu.split_digits(t, tag, sums)``; an NCHW-contiguous ``t`` is copied to
    channels-last for the one-pass split (a 64 -> 64 3x3 layer at 16 bits, forward and
    backward: 0.94x -> 1.23x FP32), other layouts get their sums from torch (slower, the same
    integers)."""
    from . import scaled_mm_cpu  # it imports this module

    got = scaled_mm_cpu.split_digits(t, tag, sums)
    if got is not None or t.dim() != 4:
        return got
    if t.is_contiguous() and t.device.type == "cpu":  # a channels-last copy, then the one pass
        got = scaled_mm_cpu.split_digits(t.contiguous(memory_format=torch.channels_last), tag, sums)
        if got is not None:
            return got
    planes = scaled_mm_cpu.split_digits(t, tag)
    if planes is None:
        return None
    total = {"positions": lambda: t.sum(1, dtype=torch.int64).reshape(-1),
             "images": lambda: t.sum(0, dtype=torch.int64).permute(1, 2, 0),
             "channels": lambda: t.sum((0, 2, 3), dtype=torch.int64)}[sums]()
    return (*planes, total)


def conv_grad_weight_digits(g16, x16, weight_shape, stride, padding, dilation):
    """int64 weight gradient of a convolution of int16 mantissas (any width; used above 14 bits)
    from four AMX products of the digit planes (see ``conv_digits_scaled``), or ``None`` where
    the AMX kernel does not apply."""
    from . import scaled_mm_cpu  # it imports this module

    Cout, C, kh, kw = weight_shape
    if not amx_cpu.available() or C % 16 or x16.dim() != 4:
        return None
    gs, xs = _digits_with_sums(g16, "dg", "channels"), _digits_with_sums(x16, "dx", "images")
    if gs is None or xs is None:
        return None
    (gh, gl, channel_sums), (xh, xl, image_sums) = gs, xs
    acc = None
    for a, b, pad, scale in ((gh, xh, 0, 65536), (gh, xl, -128, 256), (gl, xh, 0, 256), (gl, xl, -128, 1)):
        part = amx_cpu.conv_grad_weight(a, b, weight_shape, stride, padding, dilation, pad)
        if part is None:
            return None
        part = part.to(torch.int64) * scale
        acc = part if acc is None else acc.add_(part)
    (sh, sw), (ph, pw), (dh, dw) = (_pair(v, 2) for v in (stride, padding, dilation))
    OH, OW = g16.shape[2:]
    M = g16.shape[0] * OH * OW
    per_image = F.pad(image_sums.permute(2, 0, 1), (pw, pw, ph, ph))  # [C, H + 2 ph, W + 2 pw]
    taps = torch.stack([per_image[:, i * dh:i * dh + sh * (OH - 1) + 1:sh, j * dw:j * dw + sw * (OW - 1) + 1:sw]
                        .sum((1, 2)) for i in range(kh) for j in range(kw)], 1).view(C, kh, kw)
    rows = 128 * (channel_sums - 128 * M)
    cols = 128 * (taps - 128 * M) + 16384 * M
    return acc.add_(rows.view(Cout, 1, 1, 1)).add_(cols.unsqueeze(0))


def conv_forward(x_m, w_m, stride, padding, dilation, mm=None, amx: bool = True) -> torch.Tensor:
    """Exact integer ``conv2d(x_m, w_m)`` (groups 1): int32/int64, channels-last NCHW.

    Operands up to 14 bits are split before im2col, so the patches stay int8. On AMX CPUs
    :func:`amx_cpu.conv_forward` takes what it covers (no im2col; a large int32 result lives in a
    reused buffer, as ``int_matmul``'s does)."""
    if mm is None and not fast_int8():  # AVX2 implicit GEMM: int8, or int16 up to 12 bits in one product
        acc = gemm_avx2.conv2d(x_m, w_m, stride, padding, dilation)
        if acc is not None:
            return acc
    planes = _narrow_planes(x_m, w_m)
    if planes is not None:
        return _karatsuba_bilinear(lambda a, b: conv_forward(a, b, stride, padding, dilation, mm, amx), planes)
    N, _, H, W = x_m.shape
    Cout, _, kh, kw = w_m.shape
    (sh, sw), (ph, pw), (dh, dw) = (_pair(v, 2) for v in (stride, padding, dilation))
    OH, OW = _out_size(H, kh, sh, ph, dh), _out_size(W, kw, sw, pw, dw)
    if mm is None and amx:
        acc = amx_cpu.conv_forward(x_m, w_m, (sh, sw), (ph, pw), (dh, dw))
        if acc is not None:  # AMX tiles loaded straight from the (zero-bordered) input
            return acc
    cols = im2col(x_m, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    return _to_nchw(int_matmul(cols, _taps_last(w_m).t(), mm=mm), N, OH, OW)


def conv_grad_input(g_m, w_m, input_shape, stride, padding, dilation, mm=None, conv=None,
                    place=None) -> torch.Tensor:
    """Exact integer gradient of ``conv2d`` w.r.t. its input, given the output gradient.

    ``conv(x, w, stride, padding, dilation)`` replaces :func:`conv_forward` for the stride-1
    convolution this reduces to (1x1 unpadded kernels stay a GEMM; strided ones, and stride-1
    ones padded wider than the dilated kernel, take one im2col correlation per phase).
    ``place(g, w, padding, dilation, origin, dst) -> bool``: where given, strided convolutions
    try it first: it writes one phase's stride-1 correlation, from ``origin`` of its output grid
    on, scaled to float32, straight into ``dst`` (the phase's positions of the result)."""
    N, C, H, W = input_shape
    Cout, _, kh, kw = w_m.shape
    (sh, sw), (ph, pw), (dh, dw) = (_pair(v, 2) for v in (stride, padding, dilation))
    if place is not None and (sh, sw) != (1, 1):
        gx = _grad_input_in_place(g_m, w_m, input_shape, (sh, sw), (ph, pw), (dh, dw), place)
        if gx is not None:
            return gx
    if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):  # a GEMM scattered onto the strided positions
        OH, OW = g_m.shape[2:]
        g2d = g_m.permute(0, 2, 3, 1).reshape(-1, Cout)
        gx = int_matmul(g2d, w_m.reshape(Cout, C), mm=mm)
        out = gx.new_zeros((N, H, W, C))
        out[:, : (OH - 1) * sh + 1 : sh, : (OW - 1) * sw + 1 : sw] = gx.reshape(N, OH, OW, C)
        return out.permute(0, 3, 1, 2)
    if (sh, sw) != (1, 1) or ph > dh * (kh - 1) or pw > dw * (kw - 1):
        return _grad_input_by_phases(g_m, w_m, input_shape, (sh, sw), (ph, pw), (dh, dw), mm)
    w_t = w_m.flip(2, 3).transpose(0, 1)
    pad = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
    if conv is not None:
        return conv(g_m, w_t, 1, pad, (dh, dw))
    return conv_forward(g_m, w_t, 1, pad, (dh, dw), mm=mm)


def _phase_taps(a: int, s: int, p: int, k: int, d: int = 1):
    """``(taps, d0, step)``: the kernel taps reaching input positions ``i = s*q + a``, in the
    order a stride-1 correlation with the gradient visits them, the gradient offset of the
    first, and the gradient distance between consecutive ones (the correlation's dilation):
    ``gx[s*q + a] = sum_t g[q + d0 + step*t] * w[taps[t]]``, since tap ``k`` reads
    ``g[(i + p - d*k) / s]``."""
    taps = [j for j in range(k - 1, -1, -1) if (a + p - d * j) % s == 0]
    step = d // math.gcd(s, d)
    return taps, (a + p - d * taps[0]) // s if taps else 0, step


def _ascending(taps: list[int], k: int) -> slice:
    """The descending, evenly spaced ``taps`` of a kernel as a slice of the flipped kernel."""
    step = taps[0] - taps[1] if len(taps) > 1 else 1
    return slice(k - 1 - taps[0], k - taps[-1], step)


def _phases(g_m, w_m, input_shape, stride, padding, dilation):
    """Per phase ``(a, b)`` of the input positions that some tap reaches: ``(a, b, qh, qw, sub,
    (Ph, Pw), (eh, ew), (oh, ow))``: the phase's size, its sub-kernel (transposed for the
    correlation), the symmetric padding of the gradient and the correlation's dilation, and where
    in the padded correlation's output grid the phase's first position lies."""
    N, C, H, W = input_shape
    OH, OW = g_m.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = w_m.shape[2:]
    flipped = w_m.flip(2, 3)  # one copy: each phase's taps are then an ascending slice of it (a view)
    out = []
    for a in range(min(sh, H)):
        rows, dh0, eh = _phase_taps(a, sh, ph, kh, dh)
        for b in range(min(sw, W)):
            cols, dw0, ew = _phase_taps(b, sw, pw, kw, dw)
            if not rows or not cols:  # no tap reaches this phase: it stays zero
                continue
            qh, qw = len(range(a, H, sh)), len(range(b, W, sw))
            Ph = max(0, -dh0, qh + dh0 + eh * (len(rows) - 1) - OH)  # symmetric padding >= both sides,
            Pw = max(0, -dw0, qw + dw0 + ew * (len(cols) - 1) - OW)  # the outputs wanted start at P + d0
            sub = flipped[:, :, _ascending(rows, kh)][:, :, :, _ascending(cols, kw)].transpose(0, 1)
            out.append((a, b, qh, qw, sub, (Ph, Pw), (eh, ew), (Ph + dh0, Pw + dw0)))
    return out


def _grad_input_in_place(g_m, w_m, input_shape, stride, padding, dilation, place):
    """float32 channels-last grad-input of a strided convolution, each phase written in place by
    ``place`` (see :func:`conv_grad_input`), positions no tap reaches zeroed; ``None`` where
    ``place`` declines a phase."""
    N, C, H, W = input_shape
    sh, sw = stride
    out = torch.empty((N, C, H, W), dtype=torch.float32, device=g_m.device, memory_format=torch.channels_last)
    nhwc = out.permute(0, 2, 3, 1)
    phases = _phases(g_m, w_m, input_shape, stride, padding, dilation)
    if len(phases) < min(sh, H) * min(sw, W):
        out.zero_()  # one dense pass: 2.3x faster than zeroing 3 of 4 phases through strides
    for a, b, qh, qw, sub, pad, dil, origin in phases:
        if not place(g_m, sub, pad, dil, origin, nhwc[:, a::sh, b::sw]):
            return None  # (phases differ by a row or a column at most: in practice only the first declines)
    return out


def _grad_input_by_phases(g_m, w_m, input_shape, stride, padding, dilation, mm):
    """Grad-input of a strided convolution as ``s_h * s_w`` stride-1 correlations of the
    gradient, one per phase ``(i mod s_h, j mod s_w)`` of the input positions, each with the
    kernel taps that reach that phase (dilated by ``d / gcd(s, d)`` where the kernel is): the
    exact sum, without the zeros that inserting ``s - 1`` gaps between gradient entries would
    multiply (3/4 of the products at stride 2). The correlations take im2col + int8 GEMMs:
    with their 1-2 tap kernels that measured faster than oneDNN (which packs each sub-kernel
    and re-offsets the gradient per call) on every strided layer of ResNet-18/20 at batch 128,
    e.g. 14.9 against 16.8 ms (256 -> 128 channels, 8x8 gradient), where inserting zeros took
    34.3 ms."""
    N, C, H, W = input_shape
    sh, sw = stride
    phases = _phases(g_m, w_m, input_shape, stride, padding, dilation)
    out = None
    for a, b, qh, qw, sub, pad, dil, (oh, ow) in phases:  # each part written at once: its buffers are reused
        y = conv_forward(g_m, sub, 1, pad, dil, mm=mm, amx=False)
        if out is None:
            out = torch.empty((N, C, H, W), dtype=y.dtype, device=g_m.device, memory_format=torch.channels_last)
            if len(phases) < min(sh, H) * min(sw, W):
                out.zero_()
        out[:, :, a::sh, b::sw] = y[:, :, oh: oh + qh, ow: ow + qw]
    return out if out is not None else torch.zeros((N, C, H, W), dtype=torch.int32, device=g_m.device)


def vnni_weight_gradient(C: int, kh: int, kw: int) -> bool:
    """Whether an int8 weight gradient of ``C`` input channels and a ``kh x kw`` kernel takes
    :func:`vnni_cpu.conv_grad_weight` (CPUs with AVX-512 VNNI but no AMX) rather than im2col +
    ``torch._int_mm``: up to ``vnni_cpu.MAX_CHANNELS`` channels, except 1x1 kernels at 64, where
    im2col is the input itself (or a subsample) and one GEMM, 1.4x faster (1.41 against 1.96 ms
    at stride 1, 0.83 against 1.17 at stride 2; at 16 and 32 channels the kernel stays ahead,
    0.31 against 0.34 ms and 0.13 against 0.17 at stride 2)."""
    return C <= vnni_cpu.MAX_CHANNELS and not ((kh, kw) == (1, 1) and C >= 64)


def conv_grad_weight(g_m, x_m, weight_shape, stride, padding, dilation, mm=None, magnitude: int = 128
                     ) -> torch.Tensor:
    """Exact integer gradient of ``conv2d`` w.r.t. its weight: ``G^T @ im2col(x)``, or on AMX
    CPUs for channels-last int8 inputs with 16k channels the implicit GEMM of
    :func:`amx_cpu.conv_grad_weight` (1.0-2.6x faster than im2col and ``torch._int_mm`` on
    ResNet's layers, measured), or on CPUs with AVX-512 VNNI but no AMX, up to
    ``vnni_cpu.MAX_CHANNELS`` input channels, that of :func:`vnni_cpu.conv_grad_weight`.
    ``magnitude``: the largest ``|value|`` of int8 operands, as there (the quantiser's 8-bit
    mantissas and the Karatsuba planes stop at 127)."""
    if mm is None and not fast_int8():  # AVX2: the patches gathered as the reduction is packed
        acc = gemm_avx2.conv2d_grad_weight(g_m, x_m, weight_shape, stride, padding, dilation)
        if acc is not None:
            return acc
    if mm is None and g_m.dtype == torch.int16 and x_m.dtype == torch.int16 and not amx_cpu.available():
        acc = vnni_cpu.conv_grad_weight(g_m, x_m, weight_shape, stride, padding, dilation)
        if acc is not None:  # AVX-512 VNNI: one vpdpwssd product where the split took three or four
            return acc
    planes = _narrow_planes(g_m, x_m)
    if planes is not None:
        return _karatsuba_bilinear(  # |h|, |l| <= 64 and |h + l| <= 127
            lambda a, b: conv_grad_weight(a, b, weight_shape, stride, padding, dilation, mm, 127), planes)
    Cout, C, kh, kw = weight_shape
    if mm is None and g_m.dtype == torch.int8 and x_m.dtype == torch.int8:
        acc = amx_cpu.conv_grad_weight(g_m, x_m, weight_shape, stride, padding, dilation, magnitude=magnitude)
        if acc is not None:  # AMX tiles filled straight from the input, no im2col matrix
            return acc
        if vnni_weight_gradient(C, kh, kw):  # AVX-512 VNNI without AMX: no im2col matrix either
            acc = vnni_cpu.conv_grad_weight(g_m, x_m, weight_shape, stride, padding, dilation)
            if acc is not None:
                return acc
    if mm is None and g_m.dtype == torch.int16 and x_m.dtype == torch.int16:
        acc = conv_grad_weight_digits(g_m, x_m, weight_shape, stride, padding, dilation)
        if acc is not None:  # 15-16 bits: four products of digit planes on the AMX tiles
            return acc
    cols = im2col(x_m, (kh, kw), stride, padding, dilation)
    g2d = g_m.permute(0, 2, 3, 1).reshape(-1, Cout)
    # 127-bounded operands keep one int32 product up to K = 133,144: a 128x16x32x32 map's
    # 131,072 rows in one call, not two plus an int64 sum (1.70 against 2.37 ms, 2 threads)
    chunk = (2**31 - 1) // (magnitude * magnitude)
    return int_matmul(g2d.t(), cols, chunk=chunk, mm=mm).reshape(Cout, kh, kw, C).permute(0, 3, 1, 2)
