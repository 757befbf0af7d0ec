"""Implicit-GEMM convolutions in Triton (2-d, groups 1): patches are gathered tile by tile inside
the kernels, so no im2col buffer exists in memory.

- ``_conv_kernel``: forward, ``y[n, o, p, q] = sum_{c,i,j} x[n, c, p*s - pad + i*d, ...] w[o, c, i, j]``,
  and grad-input (``TRANSPOSED``), ``dx[n, c, h, w] = sum_{o,i,j} dy[n, o, (h + pad - i*d) / s, ...]
  w[o, c, i, j]`` over the taps where the division is exact and in range (a strided one runs as
  one stride-1 sum per input phase, over that phase's taps only). Rows are output pixels;
  the reduction runs over (tap, channel) with the channel fastest, so channels-last operands are
  read in contiguous runs. int8 mantissas: int32 sums, exact. int16 mantissas (9-16 bits): FP16
  operands with FP32 accumulation, exact up to 12 bits (the paper's hardware mapping).
- ``_conv_grad_weight_kernel``: the weight gradient, reducing over output pixels in splits whose
  int32 partials cannot overflow (int8; with ``FP16_MMA`` on FP16 MMA, exact in runs of 1024
  pixels), or in FP16 with FP32 accumulation (int16); on a GPU the
  splits are also what fills it (:func:`pixel_split`). ``_sum_scale_kernel`` adds the partials
  (int64 for int32 ones), scales them and writes the parameter's layout in one launch.
Out-of-range taps load zeros and any strides work. ``*_reference`` functions compute the same with
plain torch in float64 (exact for these integer sums).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .gemm_cpu import CHUNK, _out_size, _pair
from .quantise import HAS_TRITON, autotune, quantise_triton, scale_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quantise import reduce_amax, times_pow2

__all__ = ["conv2d_int", "conv2d_grad_input_int", "conv2d_grad_weight_int", "conv2d_int_reference",
           "conv2d_grad_input_int_reference", "conv2d_grad_weight_int_reference"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# How the 8-bit weight gradient multiplies: "int8" (int8 MMA, int32 sums) or "fp16" (the int8
# mantissas as FP16, exact sums over runs of 1024 pixels added in int32; see the kernel).
GRAD_WEIGHT_MMA_CHOICES = ("int8", "fp16")
GRAD_WEIGHT_MMA = os.environ.get("MUPPET_FX_GRAD_WEIGHT_MMA", "int8")


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=st, num_warps=nw)
            for bm, bn, bk, st, nw in [(128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 3, 8),
                                       (64, 128, 64, 4, 4), (32, 64, 64, 4, 4)]]


if HAS_TRITON:

    # Spatial sizes and geometry vary from layer to layer; specialising on them (divisible by 16,
    # equal to 1) would compile every autotuning configuration again for most layer shapes.
    # Channel counts and strides stay specialised: their divisibility lets the masked channel
    # runs load as vectors, which the pipeliner's asynchronous copies need. The convolution
    # stride (SH, SW) is a compile-time constant: grad-input divides each row's position by it,
    # which a constant turns into shifts (stride 2) or nothing (stride 1). Networks use one or
    # two strides, and the autotuner keys on SH already, so only strided layers add compilations.
    _GEOMETRY = ["AH", "AW", "OH", "OW", "KW", "PH", "PW", "DH", "DW"]
    UNSPECIALISED = {"conv": ["M", "TAPS", *_GEOMETRY],
                     "conv_grad_weight": ["R", "H", "W", "OHW_MAGIC", "OHW_SHIFT", "OW_MAGIC", "OW_SHIFT",
                                          *_GEOMETRY[2:]]}

    @triton.jit
    def _divide(x, magic, shift):
        # x // d for 0 <= x < 2**29 by a multiply and a shift (see division_magic): an integer
        # division by a value known only at run time costs a dozen or more instructions per element
        return ((x.to(tl.int64) * magic) >> shift).to(tl.int32)

    @autotune(_configs(), ["M", "N", "K", "KW", "SH", "TRANSPOSED", "USE_FP16"])
    @triton.jit(do_not_specialize=UNSPECIALISED["conv"])
    def _conv_kernel(
        a_ptr, w_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, amax_ptr,  # SCALED: c = acc * 2**-(sa + sb) (+ bias)
        M, N, K, C, TAPS,  # GEMM sizes; C = channels summed per tap, TAPS = kh * kw (K = TAPS * C)
        AH, AW, OH, OW, KW,  # source spatial size, output spatial size, kernel width
        SH: tl.constexpr, SW: tl.constexpr, PH, PW, DH, DW,
        s_an, s_ac, s_ah, s_aw,  # source strides (n, channel, h, w)
        s_wk, s_wn, s_wh, s_ww,  # weight strides: summed channel, output channel, tap h, tap w
        s_cn, s_cc, s_ch, s_cw,  # output strides
        TRANSPOSED: tl.constexpr, USE_FP16: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
        WRITE_AMAX: tl.constexpr,  # with SCALED: max |c| for the output quantiser (see reduce_amax)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n = rm // (OH * OW)
        pix = rm % (OH * OW)
        p = pix // OW
        q = pix % OW
        row_ok = rm < M
        a_row = n.to(tl.int64) * s_an
        # Tap (i, j) reads source pixel (h0 + di, w0 + dj): the row part is worked out here, once,
        # and each iteration adds a scalar. Forward: h = p*s - pad + i*d. Grad-input at stride 1:
        # h = p + pad - i*d (a strided one divides by the stride, below).
        UNIT_STEP: tl.constexpr = not TRANSPOSED or (SH == 1 and SW == 1)
        h0 = p + PH if TRANSPOSED else p * SH - PH
        w0 = q + PW if TRANSPOSED else q * SW - PW
        a_base = a_ptr + (a_row + h0 * s_ah + w0 * s_aw)
        w_col = w_ptr + rn[None, :].to(tl.int64) * s_wn
        col_ok = rn[None, :] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if USE_FP16 else tl.int32)
        # The reduction runs tap by tap, BLOCK_K channels at a time: each block lies in one tap, so
        # the source pixel and its bounds are worked out once per row, not once per (row, channel).
        c_blocks = tl.cdiv(C, BLOCK_K)
        # (tap row i, tap column j, channel block cb) advance as counters: dividing kb by the
        # run-time c_blocks and KW cost two integer divisions per iteration
        i = tl.full((), 0, tl.int32)
        j = tl.full((), 0, tl.int32)
        cb = tl.full((), 0, tl.int32)
        for kb in range(0, TAPS * c_blocks):  # no blocks without channels (c_blocks = 0)
            c = cb * BLOCK_K + rk
            c_ok = c < C
            if UNIT_STEP:
                di = -i * DH if TRANSPOSED else i * DH
                dj = -j * DW if TRANSPOSED else j * DW
                ok = (h0 >= -di) & (h0 < AH - di) & (w0 >= -dj) & (w0 < AW - dj) & row_ok
                a_ptrs = a_base[:, None] + (di * s_ah + dj * s_aw) + c[None, :] * s_ac
            else:  # strided grad-input: source pixel (p + pad - i*d) / s, where exact
                hn = h0 - i * DH
                wn = w0 - j * DW
                h = tl.where(hn >= 0, hn, 0) // SH
                w = tl.where(wn >= 0, wn, 0) // SW
                ok = (hn >= 0) & (hn % SH == 0) & (wn >= 0) & (wn % SW == 0) & (h < AH) & (w < AW) & row_ok
                a_ptrs = a_ptr + (a_row + h * s_ah + w * s_aw)[:, None] + c[None, :] * s_ac
            a = tl.load(a_ptrs, mask=ok[:, None] & c_ok[None, :], other=0)
            b = tl.load(w_col + (i * s_wh + j * s_ww) + c[:, None] * s_wk, mask=c_ok[:, None] & col_ok, other=0)
            if USE_FP16:
                acc += tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
            else:
                acc += tl.dot(a, b, out_dtype=tl.int32)
            cb += 1
            next_tap = cb == c_blocks
            cb = tl.where(next_tap, 0, cb)
            j = tl.where(next_tap, j + 1, j)
            next_row = j == KW
            j = tl.where(next_row, 0, j)
            i = tl.where(next_row, i + 1, i)
        c_ptrs = (c_ptr + n[:, None].to(tl.int64) * s_cn + p[:, None] * s_ch + q[:, None] * s_cw
                  + rn[None, :] * s_cc)
        if SCALED:  # the dequantisation in the epilogue: two exact power-of-two factors
            out = times_pow2(acc, -(tl.load(sa_ptr).to(tl.int64) + tl.load(sb_ptr).to(tl.int64)))
            if HAS_BIAS:
                out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(c_ptrs, out, mask=row_ok[:, None] & (rn[None, :] < N))
            if WRITE_AMAX:
                reduce_amax(out, row_ok[:, None] & (rn[None, :] < N), amax_ptr)
        else:
            tl.store(c_ptrs, acc, mask=row_ok[:, None] & (rn[None, :] < N))

    FLUSH_PIXELS = tl.constexpr(1024)  # pixels summed in FP32 before the int32 sum (FP16_MMA)

    @triton.jit
    def _grad_weight_operands(g_rows, x_cols, rm, M, c_ok, r, r_end, OH, OW, H, W, i, j, SH, SW, PH, PW, DH, DW,
                              s_gn, s_gh, s_gw, s_xn, s_xh, s_xw, OHW_MAGIC, OHW_SHIFT, OW_MAGIC, OW_SHIFT):
        # pixels r: the output gradient's tile (Cout x pixels) and the input's patch tile (pixels x
        # channels of tap (i, j)); out-of-range taps and pixels load zeros
        n = _divide(r, OHW_MAGIC, OHW_SHIFT)
        pix = r - n * (OH * OW)
        p = _divide(pix, OW_MAGIC, OW_SHIFT)
        q = pix - p * OW
        r_ok = r < r_end
        a = tl.load(g_rows + (n.to(tl.int64) * s_gn + p * s_gh + q * s_gw)[None, :],
                    mask=(rm[:, None] < M) & r_ok[None, :], other=0)
        h = p * SH - PH + i * DH
        w = q * SW - PW + j * DW
        ok = (h >= 0) & (h < H) & (w >= 0) & (w < W) & r_ok
        b = tl.load(x_cols + (n.to(tl.int64) * s_xn + h * s_xh + w * s_xw)[:, None],
                    mask=ok[:, None] & c_ok[None, :], other=0)
        return a, b

    # s_xc: channels-last (1) and NCHW maps tune apart (their loads differ)
    @autotune(_configs(), ["M", "N", "R", "KW", "SH", "s_xc", "USE_FP16", "FP16_MMA"])
    @triton.jit(do_not_specialize=UNSPECIALISED["conv_grad_weight"])
    def _conv_grad_weight_kernel(
        g_ptr, x_ptr, c_ptr,
        M, N, R, C, R_SPLIT,  # Cout, kh*kw*C, summed pixels, input channels, pixels per split
        H, W, OH, OW, KW, SH: tl.constexpr, SW: tl.constexpr, PH, PW, DH, DW,
        s_gn, s_gc, s_gh, s_gw, s_xn, s_xc, s_xh, s_xw,
        OHW_MAGIC, OHW_SHIFT, OW_MAGIC, OW_SHIFT,  # division_magic(OH * OW), division_magic(OW)
        USE_FP16: tl.constexpr, FP16_MMA: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # partial[split, o, (i, j, c)] = sum over this split's output pixels of g[., o, .] x[patch].
        # A program's columns lie in one tap (i, j), so each pixel's source position and bounds
        # are worked out once per pixel, not once per (pixel, column).
        # FP16_MMA (int8 operands): FP16 products summed in FP32 over FLUSH_PIXELS pixels at a
        # time, then added to the int32 sum. Exact: |m| <= 128, so every partial sum of a run is
        # at most 1024 * 2**14 = 2**24 in magnitude, where every integer is a float32. The int8 MMA needs both operands
        # K-major in shared memory, and channels-last operands are not, so its loads go through
        # registers with no asynchronous copies; converted to FP16 they pipeline.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        c_blocks = tl.cdiv(C, BLOCK_N)
        tap = pid_n // c_blocks
        i = tap // KW
        j = tap - i * KW
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        c = (pid_n - tap * c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = c < C
        g_rows = g_ptr + rm[:, None] * s_gc
        x_cols = x_ptr + c[None, :] * s_xc
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if USE_FP16 else tl.int32)
        r_end = min(R, (split + 1) * R_SPLIT)
        if FP16_MMA:
            for r1 in range(split * R_SPLIT, r_end, FLUSH_PIXELS):
                run = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for r0 in range(r1, min(r_end, r1 + FLUSH_PIXELS), BLOCK_K):
                    a, b = _grad_weight_operands(g_rows, x_cols, rm, M, c_ok, r0 + tl.arange(0, BLOCK_K), r_end,
                                                 OH, OW, H, W, i, j, SH, SW, PH, PW, DH, DW,
                                                 s_gn, s_gh, s_gw, s_xn, s_xh, s_xw,
                                                 OHW_MAGIC, OHW_SHIFT, OW_MAGIC, OW_SHIFT)
                    run += tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
                acc += run.to(tl.int32)
        else:
            for r0 in range(split * R_SPLIT, r_end, BLOCK_K):
                a, b = _grad_weight_operands(g_rows, x_cols, rm, M, c_ok, r0 + tl.arange(0, BLOCK_K), r_end,
                                             OH, OW, H, W, i, j, SH, SW, PH, PW, DH, DW,
                                             s_gn, s_gh, s_gw, s_xn, s_xh, s_xw,
                                             OHW_MAGIC, OHW_SHIFT, OW_MAGIC, OW_SHIFT)
                if USE_FP16:
                    acc += tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
                else:
                    acc += tl.dot(a, b, out_dtype=tl.int32)
        c_ptrs = c_ptr + split.to(tl.int64) * M * N + rm[:, None] * N + (tap * C + c)[None, :]
        tl.store(c_ptrs, acc, mask=(rm[:, None] < M) & c_ok[None, :])

    @triton.jit
    def _sum_scale_kernel(part_ptr, out_ptr, sa_ptr, sb_ptr, SPLITS, MK, K, C, KW, s_oo, s_oc, s_oh, s_ow,
                          INT_SUM: tl.constexpr, BLOCK: tl.constexpr):
        # out[o, c, i, j] = (sum over splits of part[split, o, (i*KW + j)*C + c]) * 2**-(sa + sb):
        # int32 partials summed in int64 (exact) and rounded to float32 once, as the separate sum
        # and scale did; FP16-mode float32 partials summed in float32, split by split
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = e < MK
        acc = tl.zeros((BLOCK,), dtype=tl.int64 if INT_SUM else tl.float32)
        ptrs = part_ptr + e
        for _ in range(0, SPLITS):
            acc += tl.load(ptrs, mask=ok, other=0).to(acc.dtype)
            ptrs += MK
        o = e // K
        col = e - o * K
        tap = col // C
        c = col - tap * C
        i = tap // KW
        j = tap - i * KW
        x = -(tl.load(sa_ptr).to(tl.int64) + tl.load(sb_ptr).to(tl.int64))
        tl.store(out_ptr + o * s_oo + c * s_oc + i * s_oh + j * s_ow, times_pow2(acc, x), mask=ok)


def _check(a, w, what, fp16_ok=False):
    if not HAS_TRITON:
        raise NotImplementedError("the triton route needs the triton package, which is not installed")
    if a.dim() != 4 or w.dim() != 4:
        raise ValueError(f"{what} needs 4-d operands, got {tuple(a.shape)} and {tuple(w.shape)}")
    allowed = (torch.int8, torch.int16) if fp16_ok else (torch.int8,)
    if a.dtype not in allowed or w.dtype != a.dtype:
        raise TypeError(f"{what} takes mantissas of one dtype out of {allowed}, got {a.dtype} and {w.dtype}")


def _run(a, w, out, C, out_hw, w_strides, geometry, transposed, scale=None, bias=None, amax=None):
    (sh, sw), (ph, pw), (dh, dw) = geometry
    N_img, _, AH, AW = a.shape
    OH, OW = out_hw
    Nout = out.shape[1]
    kh, kw = w.shape[2:]
    M, K = N_img * OH * OW, C * kh * kw
    fp16 = a.dtype == torch.int16
    if K > CHUNK and not fp16:  # 128 * 128 * K must fit int32
        raise ValueError(f"the int8 convolution sums K = {K} products per output; at most {CHUNK} fit int32")
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(Nout, meta["BLOCK_N"]))
    s_a, s_b = (t.reshape(1) for t in scale) if scale is not None else (out, out)
    _conv_kernel[grid](a, w, out, s_a, s_b, bias if bias is not None else out, amax if amax is not None else out,
                       M, Nout, K, C, kh * kw, AH, AW, OH, OW, kw, sh, sw, ph, pw, dh, dw,
                       *a.stride(), *w_strides, w.stride(2), w.stride(3), *out.stride(),
                       TRANSPOSED=transposed, USE_FP16=fp16, SCALED=scale is not None, HAS_BIAS=bias is not None,
                       WRITE_AMAX=amax is not None)
    return out


def _empty(shape, like, scaled=False):
    dtype = torch.float32 if like.dtype == torch.int16 or scaled else torch.int32
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=torch.channels_last)


def _check_scale(scale, bias, cout):
    if scale is not None and (len(scale) != 2 or any(t.numel() != 1 for t in scale)):
        raise ValueError("scale must be (s_a, s_b), one per-tensor exponent each")
    if bias is not None and (scale is None or bias.shape != (cout,) or not bias.is_contiguous()):
        raise ValueError(f"bias needs scale and a contiguous shape ({cout},), got {tuple(bias.shape)}")


def conv2d_int(x_m, w_m, stride=1, padding=0, dilation=1, scale=None, bias=None,
               quantise_output: tuple[int, str, int] | None = None) -> torch.Tensor:
    """Exact int32 ``conv2d(x_m, w_m)`` of int8 mantissas (channels-last result); int16
    mantissas run as FP16 with FP32 accumulation and give float32 (exact up to 12 bits).
    ``scale=(s_x, s_w)`` (exponent tensors) dequantises in the epilogue: float32
    ``acc * 2**-(s_x + s_w)``, plus ``bias`` (float32 ``[C_out]``) when given.
    ``quantise_output=(bits, rounding, seed)`` (with ``scale``) returns that output fake-quantised,
    the epilogue reducing max |y| so the quantiser runs its rounding pass only: the values of
    ``quantise_triton(y, bits, rounding, seed=seed, want_values=True)``; ``(bits, rounding, seed,
    True)`` returns ``(values, mantissas, exponent)`` from that pass, the exponent marked
    ``NONFINITE_EXPONENT`` where ``y`` holds NaN/inf (what a batch norm reading them takes);
    with ``2`` for ``True`` the pass writes the mantissas alone, and ``values`` are the
    epilogue's unquantised ones (for a batch norm that reads nothing else)."""
    _check(x_m, w_m, "conv2d_int", fp16_ok=True)
    geometry = tuple(_pair(v, 2) for v in (stride, padding, dilation))
    (sh, sw), (ph, pw), (dh, dw) = geometry
    N, C, H, W = x_m.shape
    Cout, Cw, kh, kw = w_m.shape
    if Cw != C:
        raise ValueError(f"conv2d_int: input has {C} channels, weight expects {Cw} (groups 1 only)")
    OH, OW = _out_size(H, kh, sh, ph, dh), _out_size(W, kw, sw, pw, dw)
    _check_scale(scale, bias, Cout)
    if quantise_output is not None and scale is None:
        raise ValueError("quantise_output needs scale: the output quantiser works on dequantised values")
    out = _empty((N, Cout, OH, OW), x_m, scale is not None)
    amax = None if quantise_output is None else torch.zeros((1, 2), dtype=torch.int32, device=x_m.device)
    _run(x_m, w_m, out, C, (OH, OW), (w_m.stride(1), w_m.stride(0)), geometry, False, scale, bias, amax)
    if quantise_output is None:
        return out
    return _quantise_output(out, quantise_output, amax)


def _quantise_output(y, quantise_output, amax=None):
    """``y`` quantised in place as ``quantise_output=(bits, rounding, seed[, parts])`` asks (see
    :func:`conv2d_int`); ``amax``: the epilogue's reduction of max |y|, if it made one."""
    bits, rounding, seed, *parts = quantise_output
    values = not (parts and parts[0] == 2)  # 2: the mantissas alone
    parts = bool(parts and parts[0])
    m, e, q, _ = quantise_triton(y, bits, rounding, seed=seed, want_mantissa=parts, want_values=values,
                                 amax_slot=amax, out=y if values else None, mark_nonfinite=parts)
    return (q if values else y, m, e) if parts else q


def conv2d_grad_input_int(g_m, w_m, input_shape, stride=1, padding=0, dilation=1, scale=None) -> torch.Tensor:
    """Exact int32 gradient of ``conv2d`` w.r.t. an input of ``input_shape`` (channels-last);
    int16 mantissas and ``scale=(s_g, s_w)`` as in :func:`conv2d_int`."""
    _check(g_m, w_m, "conv2d_grad_input_int", fp16_ok=True)
    geometry = tuple(_pair(v, 2) for v in (stride, padding, dilation))
    N, C, H, W = input_shape
    Cout = w_m.shape[0]
    if g_m.shape[1] != Cout or w_m.shape[1] != C:
        raise ValueError(f"conv2d_grad_input_int: gradient {tuple(g_m.shape)}, weight {tuple(w_m.shape)} "
                         f"and input shape {tuple(input_shape)} do not match")
    _check_scale(scale, None, C)
    out = _empty((N, C, H, W), g_m, scale is not None)
    # The sum runs over output channels: a weight copy with those fastest makes the MMA's second
    # operand K-major (Hopper's int8 wgmma reads only that order; another would be transposed
    # through registers on every tile). Weights are small next to the activations.
    w_k = w_m if w_m.stride(0) == 1 else w_m.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    (sh, sw), (ph, pw), (dh, dw) = geometry
    kh, kw = w_m.shape[2:]
    if (sh, sw) == (1, 1) or (dh, dw) != (1, 1):
        return _run(g_m, w_k, out, Cout, (H, W), (w_k.stride(0), w_k.stride(1)), geometry, True, scale)
    # Strided: an input pixel h takes only the taps i = (h + ph) mod sh, + sh, + 2 sh, ... (the
    # others fall between output pixels). So each phase (a, b) of the input, rows a::sh and
    # columns b::sw, is a stride-1 sum over its own taps, where one pass over all taps would
    # multiply zeros for 3 of every 4 (stride 2).
    phases = [(a, b, (a + ph) % sh, (b + pw) % sw) for a in range(min(sh, H)) for b in range(min(sw, W))]
    if any(i0 >= kh or j0 >= kw for _, _, i0, j0 in phases):  # phases no tap reaches (a 1x1 kernel): zeros
        out.zero_()
    for a, b, i0, j0 in phases:
        if i0 < kh and j0 < kw:
            part, w_part = out[:, :, a::sh, b::sw], w_k[:, :, i0::sh, j0::sw]
            _run(g_m, w_part, part, Cout, part.shape[2:], (w_part.stride(0), w_part.stride(1)),
                 ((1, 1), ((a + ph - i0) // sh, (b + pw - j0) // sw), (1, 1)), True, scale)
    return out


DIVIDEND_LIMIT = 2**29  # division_magic's dividends (pixel indices) stay below this


def division_magic(d: int) -> tuple[int, int]:
    """``(magic, shift)`` with ``(x * magic) >> shift == x // d`` for every ``0 <= x < 2**29``,
    for ``1 <= d < 2**29``: with ``l = ceil(log2 d)``, ``magic = 2**(29 + l) // d + 1``. Then
    ``magic * d`` exceeds ``2**(29 + l)`` by some ``e <= d <= 2**l``, so ``x * magic / 2**(29 + l)``
    exceeds ``x / d`` by ``x * e / (d * 2**(29 + l)) < 1 / d``, too little to reach the next
    integer (Granlund and Montgomery, 1994). ``magic <= 2**30 + 1``: an int32 argument for every
    divisor (one kernel signature), and ``x * magic`` fits in int64."""
    if not 1 <= d < DIVIDEND_LIMIT:
        raise ValueError(f"division_magic: divisor {d} must be in 1..{DIVIDEND_LIMIT - 1}")
    shift = 29 + (d - 1).bit_length()
    return 2**shift // d + 1, shift


def pixel_split(R: int, M: int, K: int, sms: int) -> int:
    """Output pixels per split of the weight gradient's sum over ``R`` pixels, for an ``M x K``
    gradient on a GPU with ``sms`` multiprocessors.

    At most :data:`CHUNK`, so no int32 partial can overflow. Below that the split is what fills
    the GPU: a 64 -> 64 3x3 gradient is only 5 tiles of 128 x 128, so the pixel sum is cut until
    there are at least 4 programs per multiprocessor, keeping at least 1024 pixels (a multiple
    of 128) per split so that summing the partials stays small against the products."""
    tiles = max(1, triton.cdiv(M, 128) * triton.cdiv(K, 128))  # 0 for zero channels: nothing to fill
    splits = max(1, min(triton.cdiv(4 * sms, tiles), R // 1024))
    return CHUNK if splits == 1 else min(CHUNK, triton.cdiv(R, splits) // 128 * 128)


def conv2d_grad_weight_int(g_m, x_m, weight_shape, stride=1, padding=0, dilation=1,
                           r_split: int | None = None, scale=None, mma: str | None = None) -> torch.Tensor:
    """Exact gradient of ``conv2d`` w.r.t. its weight: int32 (int64 when the pixel sum is split
    into int32 partials), shaped ``weight_shape`` with channels-last strides; int16 mantissas
    as in :func:`conv2d_int` (float32 partials). ``scale=(s_g, s_x)`` returns float32
    ``acc * 2**-(s_g + s_x)``, contiguous (a parameter's usual layout): one more launch sums the
    partials, scales and writes it. ``r_split`` (output pixels per split) defaults to
    :func:`pixel_split` on a GPU, :data:`CHUNK` elsewhere. ``mma`` ("int8" or "fp16", default
    :data:`GRAD_WEIGHT_MMA`, from ``MUPPET_FX_GRAD_WEIGHT_MMA``) picks the int8 operands'
    product instructions; both are exact."""
    _check(g_m, x_m, "conv2d_grad_weight_int", fp16_ok=True)
    mma = GRAD_WEIGHT_MMA if mma is None else mma
    if mma not in GRAD_WEIGHT_MMA_CHOICES:
        raise ValueError(f"conv2d_grad_weight_int: mma={mma!r} (MUPPET_FX_GRAD_WEIGHT_MMA); "
                         f"choose one of {GRAD_WEIGHT_MMA_CHOICES}")
    (sh, sw), (ph, pw), (dh, dw) = (_pair(v, 2) for v in (stride, padding, dilation))
    Cout, C, kh, kw = weight_shape
    N_img, Cx, H, W = x_m.shape
    OH, OW = g_m.shape[2:]
    if Cx != C or g_m.shape[:2] != (N_img, Cout):
        raise ValueError(f"conv2d_grad_weight_int: gradient {tuple(g_m.shape)}, input {tuple(x_m.shape)} "
                         f"and weight shape {tuple(weight_shape)} do not match")
    M, K, R = Cout, kh * kw * C, N_img * OH * OW
    if R >= DIVIDEND_LIMIT:  # pixel indices are divided with division_magic
        raise ValueError(f"conv2d_grad_weight_int: {R} output pixels (batch x height x width); at most "
                         f"{DIVIDEND_LIMIT - 1} per call, so split the batch")
    if r_split is None:
        cuda = g_m.device.type == "cuda" and not _INTERPRET
        r_split = pixel_split(R, M, K, torch.cuda.get_device_properties(g_m.device).multi_processor_count) \
            if cuda else CHUNK
    if not 0 < r_split <= CHUNK:  # each split's int32 partial sum cannot overflow
        raise ValueError(f"r_split={r_split}: must be in 1..{CHUNK} so int32 partial sums cannot overflow")
    _check_scale(scale, None, Cout)
    splits = triton.cdiv(R, r_split)
    fp16 = g_m.dtype == torch.int16
    part = torch.empty((splits, M, K), dtype=torch.float32 if fp16 else torch.int32, device=g_m.device)
    # columns in tiles that each lie in one tap (see the kernel)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), kh * kw * triton.cdiv(C, meta["BLOCK_N"]), splits)
    _conv_grad_weight_kernel[grid](g_m, x_m, part, M, K, R, C, r_split, H, W, OH, OW, kw, sh, sw, ph, pw,
                                   dh, dw, *g_m.stride(), *x_m.stride(), *division_magic(max(1, OH * OW)),
                                   *division_magic(max(1, OW)), USE_FP16=fp16,
                                   FP16_MMA=not fp16 and mma == "fp16")
    if scale is not None:  # one launch sums the partials, scales, and writes the weight's usual layout
        out = torch.empty(weight_shape, dtype=torch.float32, device=g_m.device)
        if out.numel():
            _sum_scale_kernel[(triton.cdiv(M * K, 1024),)](part, out, scale[0].reshape(1), scale[1].reshape(1), splits,
                                                           M * K, K, C, kw, *out.stride(), INT_SUM=not fp16,
                                                           BLOCK=1024)
        return out
    acc = part[0] if splits == 1 else part.sum(0, dtype=torch.float32 if fp16 else torch.int64)
    return acc.view(Cout, kh, kw, C).permute(0, 3, 1, 2)


def _epilogue_reference(acc, scale, bias):
    """What the kernels' ``scale``/``bias`` epilogue computes: float32 sum, two exact factors, bias."""
    if scale is None:
        return acc
    y = scale_pow2(acc.float(), -(scale[0].long() + scale[1].long()).reshape(()))
    return y if bias is None else y + bias.float().view(1, -1, 1, 1)


def conv2d_int_reference(x_m, w_m, stride=1, padding=0, dilation=1, scale=None, bias=None,
                         quantise_output=None) -> torch.Tensor:
    """int64 twin (float64 sums of int8 products are exact far beyond int32's range); int16
    mantissas are rounded to FP16 first and the float64 result returned. ``quantise_output``
    runs the separate quantiser on the scaled result (its own reduction pass), with the parts
    as :func:`conv2d_int`."""
    if x_m.dtype == torch.int16:
        acc = F.conv2d(x_m.half().double(), w_m.half().double(), None, stride, padding, dilation)
    else:
        acc = F.conv2d(x_m.double(), w_m.double(), None, stride, padding, dilation).long()
    y = _epilogue_reference(acc, scale, bias)
    if quantise_output is None:
        return y
    return _quantise_output(y.contiguous(memory_format=torch.channels_last), quantise_output)


def conv2d_grad_input_int_reference(g_m, w_m, input_shape, stride=1, padding=0, dilation=1, scale=None):
    fp16 = g_m.dtype == torch.int16
    g, w = (g_m.half().double(), w_m.half().double()) if fp16 else (g_m.double(), w_m.double())
    gx = torch.ops.aten.convolution_backward(
        g, g.new_empty(input_shape), w, None, _pair(stride, 2), _pair(padding, 2), _pair(dilation, 2),
        False, [0, 0], 1, [True, False, False])[0]
    return _epilogue_reference(gx if fp16 else gx.long(), scale, None)


def conv2d_grad_weight_int_reference(g_m, x_m, weight_shape, stride=1, padding=0, dilation=1, scale=None):
    fp16 = g_m.dtype == torch.int16
    g, x = (g_m.half().double(), x_m.half().double()) if fp16 else (g_m.double(), x_m.double())
    gw = torch.ops.aten.convolution_backward(
        g, x, x.new_empty(weight_shape), None, _pair(stride, 2), _pair(padding, 2), _pair(dilation, 2),
        False, [0, 0], 1, [False, True, False])[1]
    return _epilogue_reference(gw if fp16 else gw.long(), scale, None)
