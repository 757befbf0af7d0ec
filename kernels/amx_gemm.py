"""Exact int8 GEMM on Intel AMX tiles (``amx_gemm.c``): int32 ``a @ b``, or float32
``(a @ b) * 2**e + bias`` stored straight from the tiles.

``torch._int_mm`` (oneDNN) ran at about 0.5 int8 TOP/s on a 2-core AMX machine at 1024^3, an
eighth of what the tiles reach on data in L1. Packing both operands into tile order first (one
pass over each, any strides, so ``x @ w.T``, ``g @ w`` and ``g.T @ x`` need no transposed
copies) and keeping one B column panel cached while the A tiles stream measured about twice
its rate; see ``benchmarks/NOTES.md``.

Every function returns ``None`` where it does not apply (no AMX, the operating system refusing
the tile state, other dtypes or devices), so callers keep ``torch._int_mm``.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .cbuild import bound_library

__all__ = ["available", "matmul", "scaled_matmul", "applies"]

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "amx_gemm_available": (ctypes.c_int, []),
    "amx_gemm": (ctypes.c_int, [_P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _I64, _P, _I64, ctypes.c_float,
                                _P, _P, _P, ctypes.c_int]),
}
# Below this many multiply-adds the packing passes and thread start-up outweigh the product, and
# with fewer than MIN_ROWS rows of A both operands stream from L2 (``benchmarks/NOTES.md``):
# ``torch._int_mm`` keeps those (128 x 512 x 512: 0.91x its time; 512^3 1.04x; 64 x 8192 x 576 0.71x).
MIN_MACS = 1 << 27
MIN_ROWS = 128


@functools.cache
def _library():
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # a private helper: may move
    if supported is None or not supported():
        return None
    lib = bound_library(Path(__file__).with_name("amx_gemm.c"), _SIGNATURES)
    return lib if lib is not None and lib.amx_gemm_available() == 1 else None


def available() -> bool:
    """Whether this CPU, compiler and operating system run the AMX GEMM."""
    return _library() is not None


def applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`matmul` takes ``a @ b``: 2-d int8 CPU operands with a reduction short
    enough for exact int32 sums (``K * 128**2 < 2**31``) and enough work to repay the packing
    (``MIN_MACS``, ``MIN_ROWS``)."""
    return (a.dim() == 2 and b.dim() == 2 and a.dtype == torch.int8 and b.dtype == torch.int8
            and a.device.type == "cpu" and b.device.type == "cpu" and a.shape[1] == b.shape[0]
            and 0 < a.shape[1] <= (2**31 - 1) // 128**2 and a.shape[0] * b.shape[1] * a.shape[1] >= MIN_MACS
            and a.shape[0] >= MIN_ROWS
            and available())


def _run(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, scale: float, bias: torch.Tensor | None) -> None:
    from .gemm_cpu import workspace  # gemm_cpu imports this module

    (M, K), N = a.shape, b.shape[1]
    kb = -(-K // 64) * 64
    ap = workspace(-(-M // 32) * 32 * kb, torch.int8, "amx_gemm_a")
    bp = workspace(-(-N // 32) * 32 * kb, torch.int8, "amx_gemm_b")
    rc = _library().amx_gemm(a.data_ptr(), *a.stride(), b.data_ptr(), *b.stride(), M, N, K, out.data_ptr(),
                             out.stride(0), scale, None if bias is None else bias.data_ptr(), ap.data_ptr(),
                             bp.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"amx_gemm failed ({rc}) on {tuple(a.shape)} @ {tuple(b.shape)}")


def _output(out: torch.Tensor | None, M: int, N: int, dtype: torch.dtype) -> torch.Tensor | None:
    if out is None:
        return torch.empty(M, N, dtype=dtype)
    if out.shape != (M, N) or out.dtype != dtype or out.stride(1) != 1 or out.device.type != "cpu":
        return None
    return out


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Exact int32 ``a @ b`` of int8 ``a [M, K]``, ``b [K, N]`` (any strides) into ``out``
    (row stride free, columns contiguous) or a new tensor; ``None`` where :func:`applies` is
    false or ``out`` does not fit."""
    if not applies(a, b):
        return None
    out = _output(out, a.shape[0], b.shape[1], torch.int32)
    if out is not None:
        _run(a, b, out, 0.0, None)
    return out


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, e: int, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor | None:
    """float32 ``(a @ b) * 2**e (+ bias)``: the exact int32 sum rounded once to float32, scaled
    by the power of two (exact within float32's normal range, ``-126 <= e <= 126``) and the bias
    added, as :func:`scaled_mm_cpu.scaled_int_matmul` computes it; ``None`` where not applicable."""
    if not applies(a, b) or not isinstance(e, int) or not -126 <= e <= 126:
        return None
    N = b.shape[1]
    if bias is not None:
        bias = bias.detach().float().contiguous()
        if bias.shape != (N,):
            return None
    out = _output(out, a.shape[0], N, torch.float32)
    if out is not None:
        _run(a, b, out, 2.0**e, bias)
    return out
