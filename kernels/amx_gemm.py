"""Exact integer GEMMs on Intel AMX tiles (``amx_gemm.c``): int32 ``a @ b`` of int8 operands,
or float32 ``(a @ b) * 2**e + bias`` stored straight from the tiles, of int8 operands or of
int16 mantissas of any width up to 16 bits (four digit products summed in the tiles); 2-d or
batches of products.

``torch._int_mm`` (oneDNN) ran at 0.5-1.2 int8 TOP/s on a 2-core AMX machine, where the tiles
reach 2 TOP/s per core on resident data. Packing both operands into tile order first (one pass
over each, any strides, so ``x @ w.T``, ``g @ w`` and ``g.T @ x`` need no transposed copies),
reading a row-major A in place and running blocks in groups that share L2 measured 1.1-1.7x
its rate from 1024^3 up; see ``benchmarks/NOTES.md`` section 24.

Every function returns ``None`` where it does not apply (no AMX, the operating system refusing
the tile state, other dtypes or devices, too little work), so callers keep ``torch._int_mm``.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .amx_cpu import tile_library
from .quantise_cpu import remember_absmax

__all__ = ["available", "matmul", "scaled_matmul", "scaled_matmul_wide", "applies", "worth"]

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "amx_gemm_available": (ctypes.c_int, []),
    "amx_gemm": (ctypes.c_int, [_P, _P] + [_I64] * 3 + [_P, _P] + [_I64] * 7 + [_P, _I64, _I64, ctypes.c_float,
                                                                             _P, _P, _P, _P, ctypes.c_int]),
    "amx_split_digits": (None, [_P, _I64, _P, _P, ctypes.c_int]),
}
# Below this many multiply-adds the packing passes and thread start-up outweigh the product, and
# a single product with fewer than MIN_ROWS rows of A streams both operands from L2
# (``benchmarks/NOTES.md``): ``torch._int_mm`` keeps those (128 x 512 x 512: 0.91x its time;
# 512^3 1.04x; 64 x 8192 x 576 0.71x). Products that would fill less than a quarter of the tiles
# they occupy (a head dimension of 8 padded to 64) stay off them too.
MIN_MACS = 1 << 27
MIN_ROWS = 128
MIN_FILL = 0.25


@functools.cache
def _library():
    return tile_library("amx_gemm.c", _SIGNATURES, "amx_gemm_available")


def available() -> bool:
    """Whether this CPU, compiler and operating system run the AMX GEMM."""
    return _library() is not None


def _up(v: int, m: int) -> int:
    return -(-v // m) * m


def _operands_fit(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """``dtype`` CPU operands, 2-d or 3-d with one batch size, inner dimensions agreeing."""
    return (a.dim() == b.dim() and a.dim() in (2, 3) and a.dtype == dtype and b.dtype == dtype
            and a.device.type == "cpu" and b.device.type == "cpu" and a.shape[-1] == b.shape[-2]
            and a.shape[:-2] == b.shape[:-2] and available())


def _batch(a: torch.Tensor) -> int:
    return a.shape[0] if a.dim() == 3 else 1


def applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`matmul` takes ``a @ b``: int8 CPU operands, 2-d, or 3-d with one batch
    size (a batch stride of 0 shares an operand), a reduction short enough for exact int32 sums
    (``K * 128**2 < 2**31``) and enough work to repay the packing (``MIN_MACS``, ``MIN_ROWS``,
    ``MIN_FILL``)."""
    return _operands_fit(a, b, torch.int8) and worth(_batch(a), *a.shape[-2:], b.shape[-1])


DIGITS_K = 32768  # longest reduction whose digit sums stay in int32: |HU + UH| <= 2 * 128 * 255 per term


def worth(batch: int, M: int, K: int, N: int, digits: bool = False) -> bool:
    """Whether ``batch`` products ``[M, K] @ [K, N]`` suit the tiles (see :func:`applies`);
    ``digits``: as the fused digit products of :func:`scaled_matmul_wide`, whose exact int32
    sums allow reductions up to ``DIGITS_K``."""
    macs = batch * M * N * K
    longest = DIGITS_K if digits else (2**31 - 1) // 128**2
    return (0 < K <= longest and macs >= MIN_MACS and (M >= MIN_ROWS or batch > 1)
            and macs >= MIN_FILL * batch * _up(M, 32) * _up(N, 32) * _up(K, 64))


def _run(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, scale: float, bias: torch.Tensor | None,
         a_u: torch.Tensor | None = None, b_u: torch.Tensor | None = None) -> None:
    """The kernel on int8 ``a``, ``b``, or with ``a_u``, ``b_u`` on the digit planes (``a`` and
    ``b`` then hold the high digits). A float32 ``out`` gets its absmax recorded, gathered as the
    tiles were stored, so that the output quantiser reading it next skips that pass."""
    from .gemm_cpu import workspace  # gemm_cpu imports this module

    a3, b3, o3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (a, b, out))
    (batch, M, K), N = a3.shape, b3.shape[2]
    sa, sb, so = a3.stride(), b3.stride(), o3.stride()
    sa0, sb0 = (sa[0] if batch > 1 else 0), (sb[0] if batch > 1 else 0)
    kb = _up(K, 64)
    rows = (lambda n: 2 * _up(n, 16)) if a_u is not None else (lambda n: _up(n, 32))  # packed tile rows
    ap = workspace((batch if sa0 else 1) * rows(M) * kb, torch.int8, "amx_gemm_a")
    bp = workspace((batch if sb0 else 1) * rows(N) * kb, torch.int8, "amx_gemm_b")
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    top = ctypes.c_uint32(0)
    rc = _library().amx_gemm(a3.data_ptr(), ptr(a_u), sa0, sa[1], sa[2], b3.data_ptr(), ptr(b_u), sb0, sb[1], sb[2],
                             batch, M, N, K, o3.data_ptr(), so[0], so[1], scale, ptr(bias), ap.data_ptr(),
                             bp.data_ptr(), ctypes.byref(top), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"amx_gemm failed ({rc}) on {tuple(a.shape)} @ {tuple(b.shape)}")
    if out.dtype == torch.float32:
        remember_absmax(out, top.value)


def _output(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if tuple(out.shape) != shape or out.dtype != dtype or out.stride(-1) != 1 or out.device.type != "cpu":
        return None
    return out


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Exact int32 ``a @ b`` of int8 ``a [(B,) M, K]``, ``b [(B,) K, N]`` (any strides) into
    ``out`` (rows and batches at any stride, columns contiguous) or a new tensor; ``None`` where
    :func:`applies` is false or ``out`` does not fit."""
    if not applies(a, b):
        return None
    out = _output(out, (*a.shape[:-1], b.shape[-1]), torch.int32)
    if out is not None:
        _run(a, b, out, 0.0, None)
    return out


def _scaled(a: torch.Tensor, b: torch.Tensor, e: int, bias: torch.Tensor | None, out: torch.Tensor | None,
            run) -> torch.Tensor | None:
    """The float32 output of a scaled product, ``run(out, scale, bias)`` filling it; ``None``
    for a scale outside float32's normal range, a bias of the wrong length or an unfit ``out``."""
    if not isinstance(e, int) or not -126 <= e <= 126:
        return None
    N = b.shape[-1]
    if bias is not None:
        bias = bias.detach().float().contiguous()
        if bias.shape != (N,):
            return None
    out = _output(out, (*a.shape[:-1], N), torch.float32)
    if out is not None:
        run(out, 2.0**e, bias)
    return out


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, e: int, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor | None:
    """float32 ``(a @ b) * 2**e (+ bias)``: the exact int32 sum rounded once to float32, scaled
    by the power of two (exact within float32's normal range, ``-126 <= e <= 126``) and the bias
    added, as :func:`scaled_mm_cpu.scaled_int_matmul` computes it; ``None`` where not applicable."""
    if not applies(a, b):
        return None
    return _scaled(a, b, e, bias, out, lambda o, scale, bias: _run(a, b, o, scale, bias))


def _digits(t: torch.Tensor, tag: str):
    """``(h, u)`` planes of int16 ``t`` (``t = 256 h + u``, ``h`` int8, ``u = t & 255`` as
    uint8 bits in an int8 tensor), laid out like ``t``, in reused buffers named by ``tag``."""
    from .gemm_cpu import workspace
    from .scaled_mm_cpu import _dense_any_order  # it imports this module

    t = t if _dense_any_order(t) else t.contiguous()
    h, u = (workspace(t.numel(), torch.int8, f"amx_digits_{tag}{p}").as_strided(t.shape, t.stride()) for p in "hu")
    _library().amx_split_digits(t.data_ptr(), t.numel(), h.data_ptr(), u.data_ptr(), torch.get_num_threads())
    return h, u


def scaled_matmul_wide(a: torch.Tensor, b: torch.Tensor, e: int, bias: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor | None:
    """float32 ``(a @ b) * 2**e (+ bias)`` for int16 mantissas of any width up to 16 bits
    (``[(B,) M, K] @ [(B,) K, N]``, any strides): each operand split once into a signed high
    byte and an unsigned low byte, ``m = 256 h + u``, and the four digit products summed in the
    tiles of each 16 x 16 block (signed and unsigned tile instructions, so no offset terms), the
    exact value formed in int64 as the block is stored and rounded once. No int32 product is
    written to memory. ``None`` where not applicable (as :func:`applies`, reductions above
    ``DIGITS_K``)."""
    if not (_operands_fit(a, b, torch.int16) and worth(_batch(a), *a.shape[-2:], b.shape[-1], digits=True)):
        return None

    def run(out, scale, bias):
        (ah, au), (bh, bu) = _digits(a, "a"), _digits(b, "b")
        _run(ah, bh, out, scale, bias, au, bu)
    return _scaled(a, b, e, bias, out, run)
