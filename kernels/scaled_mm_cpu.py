"""Scaled exact integer GEMM on the CPU: ``float32(a @ b) * 2**e + bias`` from int8/int16 mantissas.

The same integers as :func:`gemm_cpu.int_matmul`, with the passes around the int8 products fused
in C (``scaled_mm_cpu.c``): one pass splits an int16 operand into its int8 digits, one pass
combines the int32 accumulators into the exact integer, converts it to float32 once, scales it
and adds the bias. Done with torch ops, these passes (shifts, casts, int64 sums) cost more than
the three int8 products themselves, which kept the 9-14 bit levels slower than FP32.

Reductions longer than one int32-safe chunk run chunk by chunk, their exact values summed in
int64. Returns ``None`` where it does not apply (a scale outside float32's normal range, no C
compiler, other dtypes); callers then take :func:`gemm_cpu.int_matmul`.
"""
from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch

from . import amx_gemm
from .cbuild import bound_library
from .gemm_cpu import CHUNK, gemm_layout, int8_mm, workspace
from .quantise_cpu import _ptr

__all__ = ["scaled_int_matmul", "split_karatsuba", "combine_karatsuba", "split_digits", "combine_digits"]

_P = ctypes.c_void_p
_SIGNATURES = {
    "split128_i16": (ctypes.c_int, [_P, ctypes.c_int64, _P, _P, _P, ctypes.c_int]),
    "split256_i16": (None, [_P, ctypes.c_int64, _P, _P, ctypes.c_int]),
    "split256_sums_i16": (None, [_P] + [ctypes.c_int64] * 3 + [_P] * 5 + [ctypes.c_int]),
    "combine_i32": (None, [ctypes.c_int] + [_P] * 6 + [ctypes.c_int64] * 2
                    + [_P, ctypes.c_int, ctypes.c_float, _P, _P, ctypes.c_int]),
}


@functools.cache  # a Path and a dict lookup per call cost 7 us, as much as a small kernel
def _library():
    return bound_library(Path(__file__).with_name("scaled_mm_cpu.c"), _SIGNATURES)


def _planes(t: torch.Tensor, names) -> list[torch.Tensor]:
    """int8 buffers laid out like ``t`` (same strides), reused across calls. ``t`` is dense in
    some order of its dimensions with positive strides (a row- or column-major GEMM operand,
    :func:`gemm_layout`; a channels-last map, :func:`_dense_any_order`), so its storage from
    ``t.data_ptr()`` on is exactly its elements and the C passes run flat over ``numel``."""
    return [workspace(t.numel(), torch.int8, name).as_strided(t.shape, t.stride()) for name in names]


def _split(lib, t: torch.Tensor, tag: str, karatsuba: bool):
    threads = torch.get_num_threads()
    if karatsuba:
        h, l, s = _planes(t, (f"{tag}h", f"{tag}l", f"{tag}s"))
        bad = lib.split128_i16(t.data_ptr(), t.numel(), h.data_ptr(), l.data_ptr(), s.data_ptr(), threads)
        return None if bad else (h, l, s)
    h, l = _planes(t, (f"{tag}h", f"{tag}l"))
    lib.split256_i16(t.data_ptr(), t.numel(), h.data_ptr(), l.data_ptr(), threads)
    return h, l


def _mm(a: torch.Tensor, b: torch.Tensor, slot: int) -> torch.Tensor:
    out = workspace(a.shape[0] * b.shape[1], torch.int32, f"acc{slot}").view(a.shape[0], b.shape[1])
    return int8_mm(a, b, out=out)


def _products(lib, a: torch.Tensor, b: torch.Tensor):
    """``(parts, accumulators)`` for one reduction chunk (``K <= CHUNK``), or ``None`` where an
    int16 operand exceeds 14 bits (the caller then takes the four-product split)."""
    if a.dtype == torch.int8 and b.dtype == torch.int8:
        return 1, [_mm(a, b, 0), None, None, None]
    pa, pb = _split(lib, a, "a", True), _split(lib, b, "b", True)
    if pa is None or pb is None:
        return None
    return 3, [_mm(pa[0], pb[0], 0), _mm(pa[2], pb[2], 1), _mm(pa[1], pb[1], 2), None]


def _products256(lib, a: torch.Tensor, b: torch.Tensor):
    (ah, al), (bh, bl) = _split(lib, a, "a", False), _split(lib, b, "b", False)
    return 4, [_mm(ah, bh, 0), _mm(ah, bl, 1), _mm(al, bh, 2), _mm(al, bl, 3)]


def scaled_int_matmul(a: torch.Tensor, b: torch.Tensor, e: int, bias: torch.Tensor | None = None,
                      chunk: int = CHUNK):
    """float32 ``(a @ b) * 2**e (+ bias)`` for 2-d int8/int16 mantissas ``a [M, K]``, ``b [K, N]``
    (any strides), the exact product rounded once to float32; ``None`` where not applicable.
    Reductions longer than ``chunk`` run in chunks whose exact values add up in int64."""
    lib = _library()
    M, K = a.shape
    N = b.shape[1]
    if (lib is None or a.device.type != "cpu" or not isinstance(e, int) or not -126 <= e <= 126
            or min(M, N, K) == 0 or not 0 < chunk <= CHUNK or a.dtype not in (torch.int8, torch.int16)
            or b.dtype not in (torch.int8, torch.int16)):
        return None
    if bias is not None:
        bias = bias.detach().float().contiguous()
        if bias.shape != (N,):
            return None
    if a.dtype != b.dtype:
        a, b = a.to(torch.int16), b.to(torch.int16)
    if K <= chunk:  # on AMX tiles: one product, or the four digit products fused, floats stored by the kernel
        y = (amx_gemm.scaled_matmul if a.dtype == torch.int8 else amx_gemm.scaled_matmul_wide)(a, b, e, bias)
        if y is not None:
            return y
    a, b = gemm_layout(a), gemm_layout(b)
    out = torch.empty(M, N, dtype=torch.float32)
    step = -(-K // -(-K // chunk))  # equal chunks: no short tail product
    chunks = [(k, min(k + step, K)) for k in range(0, K, step)]
    carry = torch.empty(M, N, dtype=torch.int64) if len(chunks) > 1 else None
    if not _run(lib, _products, a, b, chunks, None, None, carry, e, bias, out):
        # A@B = 65536 HH + 256 (HL + LH) + LL + 128 rowsum(A') + 128 colsum(B') + 16384 K
        rc = (128 * (a.sum(1, dtype=torch.int64) - 128 * K)).contiguous()
        cc = (128 * (b.sum(0, dtype=torch.int64) - 128 * K) + 16384 * K).contiguous()
        _run(lib, _products256, a, b, chunks, rc, cc, carry, e, bias, out)
    return out


def _run(lib, products, a, b, chunks, rc, cc, carry, e, bias, out) -> bool:
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    for n, (i, j) in enumerate(chunks):
        got = products(lib, gemm_layout(a[:, i:j]), gemm_layout(b[i:j]))
        if got is None:
            return False
        stage = 0 if carry is None else (1 if n == 0 else (3 if n == len(chunks) - 1 else 2))
        lib.combine_i32(got[0], *(ptr(t) for t in got[1]), ptr(rc), ptr(cc), *out.shape, ptr(carry),
                        stage, math.ldexp(1.0, e), ptr(bias), out.data_ptr(), torch.get_num_threads())
    return True


def split_karatsuba(t: torch.Tensor, tag: str):
    """``(h, l, h + l)`` int8 planes of int16 mantissas with ``t = 128 h + l`` (laid out like
    ``t``, in reused buffers named by ``tag``), written by one C pass; ``False`` where some
    ``|t| > 8191`` (more than 14 bits: four products needed), ``None`` where the pass does not
    apply (no C compiler, not a dense CPU int16 tensor)."""
    lib = _library()
    if lib is None or t.dtype != torch.int16 or t.device.type != "cpu" or not _dense_any_order(t) or t.numel() == 0:
        return None
    planes = _split(lib, t, tag, karatsuba=True)
    return False if planes is None else planes


def split_digits(t: torch.Tensor, tag: str, sums: str | None = None):
    """``(h, l)`` int8 planes of int16 mantissas with ``t = 256 h + l + 128`` (every int16 value;
    laid out like ``t``, in reused buffers named by ``tag``), written by one C pass; ``None``
    where the pass does not apply (no C compiler, not a dense CPU int16 tensor). ``sums`` (a
    channels-last map ``[N, C, H, W]`` only) adds, from the same pass, the exact int64 sums the
    offset terms of the digit products need: ``"positions"``, over the channels at each position
    (``[N * H * W]``); ``"images"``, over the batch (``[H, W, C]``); ``"channels"``, over all
    positions (``[C]``)."""
    lib = _library()
    if lib is None or t.dtype != torch.int16 or t.device.type != "cpu" or not _dense_any_order(t) or t.numel() == 0:
        return None
    if sums is None:
        return _split(lib, t, tag, karatsuba=False)
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last) or t.shape[1] >= 65536:
        return None
    N, C, H, W = t.shape
    h, l = _planes(t, (f"{tag}h", f"{tag}l"))
    rows = N * H * W
    period = {"positions": 1, "images": H * W, "channels": 1}[sums]
    threads = torch.get_num_threads()
    rowsum = torch.empty(rows, dtype=torch.int64) if sums == "positions" else None
    fold = torch.empty(period * C, dtype=torch.int64) if sums != "positions" else None
    scratch = workspace(threads * period * C, torch.int64, "digit_sums") if fold is not None else None
    lib.split256_sums_i16(t.data_ptr(), rows, C, period, h.data_ptr(), l.data_ptr(), _ptr(rowsum), _ptr(fold),
                          _ptr(scratch), threads)
    return h, l, (rowsum if fold is None else fold.view(H, W, C) if sums == "images" else fold)


def combine_digits(hh, hl, lh, ll, rc: torch.Tensor, cc: torch.Tensor, e: int, bias: torch.Tensor | None = None):
    """float32 ``(65536 hh + 256 (hl + lh) + ll + rc[row] + cc[col]) * 2**e (+ bias[col])`` for
    four int32 accumulators laid out alike (dense, channels fastest: ``[rows, cols]`` in memory)
    and int64 corrections, formed exactly in int64 and rounded once; ``None`` where it does
    not apply."""
    lib = _library()
    if (lib is None or not -126 <= e <= 126 or hh.dim() != 4 or hh.stride(1) != 1
            or any(t.dtype != torch.int32 or t.stride() != hh.stride() for t in (hh, hl, lh, ll))):
        return None
    cols = hh.shape[1]
    rows = hh.numel() // cols
    rc, cc = rc.to(torch.int64).contiguous(), cc.to(torch.int64).contiguous()
    if rc.numel() != rows or cc.numel() != cols:
        return None
    if bias is not None:
        bias = bias.detach().float().contiguous()
    out = torch.empty_like(hh, dtype=torch.float32)
    lib.combine_i32(4, hh.data_ptr(), hl.data_ptr(), lh.data_ptr(), ll.data_ptr(), rc.data_ptr(), cc.data_ptr(),
                    rows, cols, None, 0, math.ldexp(1.0, e), _ptr(bias), out.data_ptr(), torch.get_num_threads())
    return out


def _dense_any_order(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory from ``t.data_ptr()`` on, in some order
    of its dimensions (contiguous, channels-last, a transposed weight, ...)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def combine_karatsuba(hh: torch.Tensor, mid: torch.Tensor, ll: torch.Tensor, e: int, bias: torch.Tensor | None = None):
    """float32 ``(16384 hh + 128 (mid - hh - ll) + ll) * 2**e (+ bias along the last memory
    dimension)`` for three int32 accumulators laid out alike (dense, channels fastest in
    memory), formed exactly in int64 and rounded once; ``None`` where it does not apply."""
    lib = _library()
    if (lib is None or not -126 <= e <= 126 or any(t.dtype != torch.int32 or t.stride() != hh.stride() for t in (mid, ll))
            or hh.dim() != 4 or hh.stride(1) != 1):
        return None
    cols = hh.shape[1]
    rows = hh.numel() // cols
    if bias is not None:
        bias = bias.detach().float().contiguous()
    out = torch.empty_like(hh, dtype=torch.float32)
    lib.combine_i32(3, hh.data_ptr(), mid.data_ptr(), ll.data_ptr(), None, None, None, rows, cols, None, 0,
                    math.ldexp(1.0, e), None if bias is None else bias.data_ptr(), out.data_ptr(),
                    torch.get_num_threads())
    return out
