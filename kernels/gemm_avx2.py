"""Exact int8 GEMM for CPUs with AVX2 but no int8 dot products (``gemm_avx2.c``).

On such CPUs (AMD Zen 1-3, Intel before Cascade Lake) ``torch._int_mm`` ran 50x slower than
FP32 (AMD EPYC Zen 3, 2 threads: 1166 against 23 ms at 1024^3). This kernel widens the int8
operands to int16 and sums pairs of products with ``vpmaddwd``, exact in int32, and measured
1.5-1.6x FP32 ``torch.matmul`` at 1024^3 and 2048^3 there; see the C source for the layout.

:func:`int8_mm` returns ``None`` where it does not apply (no AVX2, no C compiler, other
dtypes or devices), so callers keep ``torch._int_mm``.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .cbuild import bound_library

__all__ = ["available", "int8_mm", "MAX_K"]

# Longest reduction whose int32 sums cannot overflow: |a b| <= 128 * 128.
MAX_K = (2**31 - 1) // (128 * 128)
_KC, _NC = 512, 192  # KC, NC in the C source: the shared B block holds NC * KC int16
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "gemm_avx2_available": (ctypes.c_int, []),
    "gemm_avx2_i8": (None, [_P, _I64, _I64, _P, _I64, _I64, _P] + [_I64] * 4 + [_P, _P, ctypes.c_int, ctypes.c_int]),
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


def int8_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Exact int32 ``a @ b`` for int8 CPU tensors ``a [M, K]`` and ``b [K, N]`` with any strides
    (``K <= MAX_K``), written into ``out`` (int32, row-major ``[M, N]``) where given; ``None``
    where the kernel does not apply."""
    lib = _library()
    if (lib is None or a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2
            or a.device.type != "cpu" or b.device.type != "cpu" or a.shape[1] != b.shape[0]):
        return None
    M, K = a.shape
    N = b.shape[1]
    if K > MAX_K:
        return None
    if out is None:
        out = torch.empty(M, N, dtype=torch.int32)
    elif out.dtype != torch.int32 or out.shape != (M, N) or out.stride(1) != 1 and N > 1:
        return None
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    from .gemm_cpu import workspace  # gemm_cpu imports this module

    threads = torch.get_num_threads() if M * N * K >= _PARALLEL_MACS else 1
    # Few row blocks and a long reduction (a weight gradient's G^T @ cols): one range of K per
    # thread, each with its own B blocks and sum, rather than a barrier per block of K.
    splits = threads if threads > 1 and M * N <= _SPLIT_K_OUTPUTS and K >= 4 * _KC * threads else 1
    # 32 bytes of slack: the packed panels are read with aligned loads
    bpack = workspace(splits * _NC * _KC + 16, torch.int16, "avx2_bpack")
    offset = (-bpack.data_ptr() // 2) % 16
    partials = workspace((splits - 1) * M * N, torch.int32, "avx2_partials") if splits > 1 else None
    lib.gemm_avx2_i8(a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0), b.stride(1),
                     out.data_ptr(), out.stride(0), M, N, K, bpack.data_ptr() + 2 * offset,
                     None if partials is None else partials.data_ptr(), splits, threads)
    return out
