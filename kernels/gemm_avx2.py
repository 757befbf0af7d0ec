"""Exact integer GEMM and convolutions for CPUs with AVX2 but no int8 dot products (``gemm_avx2.c``).

On such CPUs (AMD Zen 1-3, Intel before Cascade Lake) ``torch._int_mm`` ran 50x slower than
FP32 (AMD EPYC Zen 3, 2 threads: 1166 against 23 ms at 1024^3). This kernel widens the
operands to int16 and sums pairs of products with ``vpmaddwd``, exact in int32, and measured
1.6-1.7x FP32 ``torch.matmul`` at 1024^3 and 2048^3 there; see the C source for the layout.
It takes int8 mantissas (int32 results) and int16 mantissas of up to 12 bits (``|m| <= 2048``,
int64 results: each block of the reduction is summed exactly in int32, the blocks in int64),
and convolutions as implicit GEMMs that gather the patches from the input as they are packed.

Every entry returns ``None`` where it does not apply (no AVX2, no C compiler, other dtypes or
devices, an int16 element beyond 12 bits), so callers keep their other routes.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .cbuild import bound_library

__all__ = ["available", "int8_mm", "narrow_mm", "conv2d", "conv2d_grad_weight", "MAX_K", "NARROW_LIMIT"]

# Longest int8 reduction whose int32 sums cannot overflow: |a b| <= 128 * 128.
MAX_K = (2**31 - 1) // (128 * 128)
# Largest |m| of the int16 operands: 12-bit mantissas. A block of the reduction then sums at
# most 255 pairs of 2 * 2048**2 exactly in int32.
NARROW_LIMIT = 2048
_KC, _NC = 512, 192  # KC, NC in the C source: the shared B block holds NC * KC int16
_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class _Patches(ctypes.Structure):
    """``patches`` in the C source: the im2col matrix of a channels-last input, gathered."""
    _fields_ = [(name, ctypes.c_int64) for name in
                ("xn", "xh", "xw", "C", "H", "W", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW")]


class _Operand(ctypes.Structure):
    """``operand`` in the C source: a strided matrix, or the patches of a convolution input."""
    _fields_ = [("p", _P), ("s0", _I64), ("s1", _I64), ("g", ctypes.POINTER(_Patches)), ("wide", _I64)]


_SIGNATURES = {
    "gemm_avx2_available": (ctypes.c_int, []),
    "gemm_avx2": (ctypes.c_int, [ctypes.POINTER(_Operand)] * 2 + [_P, _I64, ctypes.c_int] + [_I64] * 5
                  + [_P, _P, ctypes.c_int, ctypes.c_int]),
}
# Below this many multiply-adds a second thread costs more (fork and join) than it saves.
_PARALLEL_MACS = 1 << 18
_SPLIT_K_OUTPUTS = 1 << 16


@functools.cache
def _library():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if " avx2" not in flags:  # the build uses -march=native: no AVX2 means the stub
        return None
    lib = bound_library(Path(__file__).with_name("gemm_avx2.c"), _SIGNATURES)
    return lib if lib is not None and lib.gemm_avx2_available() == 1 else None


def available() -> bool:
    """Whether the AVX2 kernel builds and runs on this CPU."""
    return _library() is not None


def _matrices(a: torch.Tensor, b: torch.Tensor, dtypes) -> bool:
    return (_library() is not None and a.dtype in dtypes and b.dtype in dtypes and a.dim() == 2 and b.dim() == 2
            and a.device.type == "cpu" and b.device.type == "cpu" and a.shape[1] == b.shape[0])


def int8_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Exact int32 ``a @ b`` for int8 CPU tensors ``a [M, K]`` and ``b [K, N]`` with any strides
    (``K <= MAX_K``), written into ``out`` (int32, row-major ``[M, N]``) where given; ``None``
    where the kernel does not apply."""
    if not _matrices(a, b, (torch.int8,)) or a.shape[1] > MAX_K:
        return None
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty(M, N, dtype=torch.int32)
    elif out.dtype != torch.int32 or out.shape != (M, N) or out.stride(1) != 1 and N > 1:
        return None
    return _run(_operand(a), _operand(b), out, K)


def narrow_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Exact int64 ``a @ b`` for int8/int16 mantissas of at most 12 bits (``|m| <= NARROW_LIMIT``)
    with any strides; ``None`` where the kernel does not apply or an element is wider."""
    if not _matrices(a, b, (torch.int8, torch.int16)):
        return None
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.int64)
    return _run(_operand(a), _operand(b), out, a.shape[1])


def _operand(t: torch.Tensor, patches: _Patches | None = None) -> _Operand:
    s = (0, 0) if patches is not None else t.stride()
    return _Operand(t.data_ptr(), s[0], s[1], None if patches is None else ctypes.pointer(patches),
                    int(t.dtype == torch.int16))


def _block(a: _Operand, b: _Operand) -> int:
    """Reduction steps per block whose int32 sums stay exact (even: pairs)."""
    if not a.wide and not b.wide:
        return _KC
    limits = [NARROW_LIMIT if o.wide else 128 for o in (a, b)]
    return min(_KC, 2 * ((2**31 - 1) // (2 * limits[0] * limits[1])))


def _run(a: _Operand, b: _Operand, out: torch.Tensor, K: int) -> torch.Tensor | None:
    """``out = A @ B`` (int32 for int8 operands, else int64), or ``None`` where an int16 element
    exceeds ``NARROW_LIMIT``."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    from .gemm_cpu import workspace  # gemm_cpu imports this module

    wide = out.dtype == torch.int64
    threads = torch.get_num_threads() if M * N * K >= _PARALLEL_MACS else 1
    # Few row blocks and a long reduction (a weight gradient's G^T @ cols): one range of K per
    # thread, each with its own B blocks and sum, rather than a barrier per block of K.
    splits = threads if threads > 1 and M * N <= _SPLIT_K_OUTPUTS and K >= 4 * _KC * threads else 1
    # 32 bytes of slack: the packed panels are read with aligned loads
    bpack = workspace(splits * _NC * _KC + 16, torch.int16, "avx2_bpack")
    offset = (-bpack.data_ptr() // 2) % 16
    partials = workspace((splits - 1) * M * N, out.dtype, "avx2_partials") if splits > 1 else None
    bad = _library().gemm_avx2(ctypes.byref(a), ctypes.byref(b), out.data_ptr(), out.stride(0), int(wide), M, N, K,
                               _block(a, b), NARROW_LIMIT, bpack.data_ptr() + 2 * offset,
                               None if partials is None else partials.data_ptr(), splits, threads)
    return None if bad else out


def _geometry(x: torch.Tensor, kernel, stride, padding, dilation):
    """``(channels-last x, _Patches, OH, OW)``; ``None`` for an empty output."""
    from .gemm_cpu import _out_size, _pair  # gemm_cpu imports this module

    x = x.contiguous(memory_format=torch.channels_last)  # a copy only for other layouts
    N, C, H, W = x.shape
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = (_pair(v, 2) for v in (kernel, stride, padding, dilation))
    OH, OW = _out_size(H, KH, SH, PH, DH), _out_size(W, KW, SW, PW, DW)
    if OH <= 0 or OW <= 0:
        return None
    g = _Patches(x.stride(0), x.stride(2), x.stride(3), C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW)
    return x, g, OH, OW


def _conv_applies(x_m: torch.Tensor, weight_shape) -> bool:
    Cout, C, kh, kw = weight_shape
    return (_library() is not None and x_m.dtype in (torch.int8, torch.int16) and x_m.dim() == 4
            and x_m.device.type == "cpu" and x_m.shape[1] == C and min(x_m.shape) > 0 and Cout > 0)


def conv2d(x_m: torch.Tensor, w_m: torch.Tensor, stride, padding, dilation) -> torch.Tensor | None:
    """Exact ``conv2d(x_m, w_m)`` (``groups == 1``) of int8 mantissas (int32) or of int8/int16
    mantissas up to 12 bits (int64) as an implicit GEMM: each block of output positions
    gathers its patches from the (channels-last) input as it is packed, so no im2col matrix is
    written. ``[N, Cout, OH, OW]`` in channels-last memory; an int32 result of 65536 or more
    elements lives in a reused buffer (as :func:`gemm_cpu.int_matmul`'s: consume it before the
    next call). ``None`` where the kernel does not apply."""
    if (w_m.dtype not in (torch.int8, torch.int16) or w_m.dim() != 4 or w_m.device.type != "cpu"
            or not _conv_applies(x_m, w_m.shape)):
        return None
    narrow = x_m.dtype == w_m.dtype == torch.int8
    K = w_m[0].numel()
    geometry = _geometry(x_m, w_m.shape[2:], stride, padding, dilation)
    if geometry is None or narrow and K > MAX_K:
        return None
    x, g, OH, OW = geometry
    N, Cout = x.shape[0], w_m.shape[0]
    b = w_m.permute(0, 2, 3, 1).reshape(Cout, K).t()  # [(i, j, c), Cout], the patches' column order
    from .gemm_cpu import workspace

    rows = N * OH * OW
    if narrow and rows * Cout >= 1 << 16:
        out = workspace(rows * Cout, torch.int32, "acc").view(rows, Cout)
    else:
        out = torch.empty(rows, Cout, dtype=torch.int32 if narrow else torch.int64)
    if _run(_operand(x, g), _operand(b), out, K) is None:
        return None
    return out.view(N, OH, OW, Cout).permute(0, 3, 1, 2)


def conv2d_grad_weight(g_m: torch.Tensor, x_m: torch.Tensor, weight_shape, stride, padding, dilation
                       ) -> torch.Tensor | None:
    """Exact weight gradient ``[Cout, C, kh, kw]`` (``groups == 1``) from output-gradient and
    input mantissas (int8, or int8/int16 up to 12 bits): ``G^T @ patches(x)`` with the patches
    gathered as the reduction over output positions is packed (no im2col matrix). int32 for
    int8 operands (int64 where more than ``MAX_K`` positions are summed in parts), else int64;
    ``None`` where the kernel does not apply."""
    Cout, C, kh, kw = weight_shape
    if (not _conv_applies(x_m, weight_shape) or g_m.dtype not in (torch.int8, torch.int16) or g_m.dim() != 4
            or g_m.shape[1] != Cout or g_m.shape[0] != x_m.shape[0]):
        return None
    geometry = _geometry(x_m, (kh, kw), stride, padding, dilation)
    if geometry is None or tuple(g_m.shape[2:]) != geometry[2:]:
        return None
    x, g, OH, OW = geometry
    N, per_image = x.shape[0], OH * OW
    narrow = x_m.dtype == g_m.dtype == torch.int8
    images = MAX_K // per_image
    if narrow and images == 0:
        return None
    if narrow and N > images:  # int32 sums stay exact over this many images: the rest in parts, added in int64
        from .gemm_cpu import sum_in_image_parts  # gemm_cpu imports this module

        return sum_in_image_parts(lambda g, x: conv2d_grad_weight(g, x, weight_shape, stride, padding, dilation),
                                  g_m, x_m, images)
    a = g_m.permute(0, 2, 3, 1).reshape(N * per_image, Cout).t()  # G^T, a view for channels-last G
    out = torch.empty(Cout, kh * kw * C, dtype=torch.int32 if narrow else torch.int64)
    if _run(_operand(a), _operand(x, g), out, N * per_image) is None:
        return None
    return out.view(Cout, kh, kw, C).permute(0, 3, 1, 2)
