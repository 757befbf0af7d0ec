"""Triton GEMMs on dynamic fixed-point mantissas: INT8 (int32 accumulation) and FP16 (fp32
accumulation), with the dequantisation fused into the epilogue.

``C = (A @ B) * 2**-(s_a + s_b) (+ bias)`` for ``A [M, K]``, ``B [K, N]`` mantissa tensors of any
strides, so ``X W^T``, ``dY W`` and ``dY^T X`` all run without materialised transposes.
- int8 x int8: ``tl.dot`` with int32 accumulation; exact.
- 9-16 bits (int16 mantissas): FP16 ``tl.dot`` with fp32 accumulation; mantissas up to 12 bits
  are exact in FP16, wider ones round to FP16 on load (the paper's hardware mapping). With
  ``exact=True`` the int16 operands are split into int8 halves and multiplied exactly.
Optionally the output is quantised to the level's word length (SPEC section 2): the epilogue
reduces max |C| by atomic maxima, so the quantiser needs only its rounding pass, not its reduction.
``*_reference`` functions compute the same with plain torch.
"""
from __future__ import annotations

import os

import torch

from .quantise import HAS_TRITON, autotune, pow2_factors, quantise_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quantise import reduce_amax, times_pow2

__all__ = ["scaled_mm", "int_mm", "scaled_mm_reference"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _INTERPRET:  # the interpreter is slow: one small configuration
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=st, num_warps=nw)
            for bm, bn, bk, st, nw in [(128, 128, 64, 4, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                       (64, 64, 64, 4, 4), (128, 256, 64, 3, 8), (32, 64, 128, 4, 4),
                                       (128, 256, 128, 3, 8), (128, 128, 128, 4, 8)]]


def prune_configs(configs, named_args, **kwargs):
    """The two 128 x 128-byte int8 configurations (rows of 128 bytes fill the widest shared-memory
    swizzle, as Hopper's int8 MMA reads it) are int8-only: in FP16 their buffers would need twice
    the shared memory, more than any GPU has per block."""
    if not kwargs.get("USE_FP16"):
        return configs
    return [c for c in configs if not (c.kwargs["BLOCK_K"] == 128 and c.kwargs["BLOCK_M"] == 128)]


if HAS_TRITON:

    @autotune(_configs(), ["M", "N", "K", "USE_FP16", "WRITE_AMAX"], prune=prune_configs)
    @triton.jit
    def _scaled_mm_kernel(
        a_ptr, b_ptr, c_ptr, bias_ptr, sa_ptr, sb_ptr, amax_ptr,  # pointers; sa, sb: int exponents
        M, N, K,  # sizes
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,  # strides
        HAS_BIAS: tl.constexpr, PER_COL: tl.constexpr, RAW_INT: tl.constexpr,
        USE_FP16: tl.constexpr, WRITE_AMAX: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # C[m, n] = sum_k A[m, k] B[k, n] * 2**-(sa + sb[n]) (+ bias[n]); RAW_INT stores the int32
        # sum. The scale is applied as two exact factors (times_pow2), as pow2_factors splits it.
        # WRITE_AMAX: the bits of this tile's max |C| over finite entries go to amax[0] by atomic
        # max, and amax[1] = 1 if it holds a NaN or inf: the output quantiser's reduction, done
        # without a second read of C
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n  # grouped ordering keeps B tiles in L2
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn
        if USE_FP16:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0)
            b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0)
            if USE_FP16:
                acc += tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
            else:
                acc += tl.dot(a, b, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
        if RAW_INT:
            tl.store(c_ptrs, acc, mask=mask)
        else:
            if PER_COL:
                e = -(tl.load(sa_ptr).to(tl.int64) + tl.load(sb_ptr + rn, mask=rn < N, other=0).to(tl.int64))[None, :]
            else:
                e = -(tl.load(sa_ptr).to(tl.int64) + tl.load(sb_ptr).to(tl.int64))
            c = times_pow2(acc, e)
            if HAS_BIAS:
                c += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(c_ptrs, c, mask=mask)
            if WRITE_AMAX:
                reduce_amax(c, mask, amax_ptr)


def _k_major(a, b):
    """Hopper's int8 MMA reads both operands K-major from shared memory; Triton transposes an
    operand in another order on the way, and its 4-warp configurations lose pipeline stages for
    it (``triton_aot`` on sm_90: 37888 against 50176 bytes of buffers for 128 x 64 x 64). An
    int8 operand that is not K-major and no larger than the other (a weight, most often) is
    copied into that order; the larger one is left as it comes."""
    if a.dtype != torch.int8:  # the FP16 MMA reads either order
        return a, b
    if a.stride(1) != 1 and a.numel() <= b.numel():
        a = a.contiguous()
    if b.stride(0) != 1 and b.numel() <= a.numel():
        b = b.t().contiguous().t()
    return a, b


def _launch(a, b, out, exponents, bias, per_col, raw, fp16, amax=None):
    a, b = _k_major(a, b)
    M, K = a.shape
    N = b.shape[1]
    s_a, s_b = exponents if exponents is not None else (out, out)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _scaled_mm_kernel[grid](
        a, b, out, bias if bias is not None else out, s_a, s_b, amax if amax is not None else out,
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, PER_COL=per_col, RAW_INT=raw, USE_FP16=fp16, WRITE_AMAX=amax is not None)
    return out


def _check(a, b):
    if not HAS_TRITON:
        raise NotImplementedError("the triton route needs the triton package, which is not installed")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"scaled_mm needs A [M, K] and B [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in (torch.int8, torch.int16) or b.dtype != a.dtype:
        raise TypeError(f"scaled_mm takes int8 or int16 mantissas of one dtype, got {a.dtype} and {b.dtype}")


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 ``a @ b`` as int32 (K up to 133143 without overflow)."""
    _check(a, b)
    out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.int32, device=a.device)
    return _launch(a, b, out, None, None, False, True, False)


def _exponents(s_a, s_b, per_col):
    """The exponents as the kernel reads them: one for ``a``, one (or one per column) for ``b``."""
    return s_a.reshape(1).contiguous(), (s_b.reshape(-1) if per_col else s_b.reshape(1)).contiguous()


def scaled_mm(a_m, a_s, b_m, b_s, bias=None, b_axis=None, exact: bool = False,
              quantise_output: tuple[int, str, int] | None = None) -> torch.Tensor:
    """float32 ``(a_m @ b_m) * 2**-(a_s + b_s) (+ bias)``; ``b_axis=0`` means ``b_s`` holds one
    exponent per column of ``b_m`` (per output channel of a weight passed as ``w.t()``).

    ``quantise_output=(bits, rounding, seed)`` returns the output fake-quantised to ``bits``
    (per-tensor exponent, NaN/inf passed through): the epilogue reduces max |C| into one slot
    by atomic maxima, so the quantiser skips its own reduction pass over C. Same values as
    ``quantise_triton(C, bits, rounding, seed=seed, want_values=True)``."""
    _check(a_m, b_m)
    if quantise_output is not None:
        bits, rounding, seed = quantise_output
        if exact and a_m.dtype == torch.int16:
            y = scaled_mm(a_m, a_s, b_m, b_s, bias, b_axis, exact=True)
            return quantise_triton(y, bits, rounding, seed=seed, want_mantissa=False, want_values=True)[2]
        out = torch.empty((a_m.shape[0], b_m.shape[1]), dtype=torch.float32, device=a_m.device)
        amax = torch.zeros((1, 2), dtype=torch.int32, device=out.device)
        _launch(a_m, b_m, out, _exponents(a_s, b_s, b_axis is not None), bias, b_axis is not None, False,
                a_m.dtype == torch.int16, amax)
        return quantise_triton(out, bits, rounding, seed=seed, want_mantissa=False, want_values=True,
                               amax_slot=amax, out=out)[2]
    per_col = b_axis is not None
    if a_m.dtype == torch.int16 and exact:
        from .gemm_cpu import int_matmul  # the split-int16 algebra, with the Triton int8 kernel

        acc = int_matmul(a_m, b_m, mm=int_mm)
        scale = pow2_factors(-(a_s.long() + b_s.long()))
        y = acc.double() * scale[..., 0].double() * scale[..., 1].double()
        y = y.float()
        return y if bias is None else y + bias.float()
    fp16 = a_m.dtype == torch.int16
    out = torch.empty((a_m.shape[0], b_m.shape[1]), dtype=torch.float32, device=a_m.device)
    return _launch(a_m, b_m, out, _exponents(a_s, b_s, per_col), bias, per_col, False, fp16)


def scaled_mm_reference(a_m, a_s, b_m, b_s, bias=None, b_axis=None, fp16: bool = False):
    """Plain-torch twin: exact int64 product (or FP16-rounded operands, FP32 products)."""
    if fp16:
        acc = a_m.to(torch.float16).double() @ b_m.to(torch.float16).double()
    else:  # float64 sums of the integer products are exact below 2**53 (CUDA has no int64 matmul)
        acc = a_m.double() @ b_m.double()
    e = -(a_s.long() + b_s.long())
    y = (acc.double() * torch.pow(2.0, e.double())).float()
    return y if bias is None else y + bias.float()
