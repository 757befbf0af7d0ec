"""Training-mode batch norm from the input's mantissas on the Triton route (CUDA).

The same contract as :mod:`batch_norm_cpu`, for an input ``x = m * 2**-s`` whose exponent ``s``
stays on the device (read by the kernels, never by the host), so a captured step replays it:

- forward (:func:`batch_norm_forward`): exact integer sums of ``m`` and ``m**2`` per channel
  (int64 across tiles), the statistics and the running-average update in float64 in one small
  kernel, then ``y = m * a + b`` (with a fused ReLU and its byte mask) in one pass. It reads one
  or two bytes per value where ATen's batch norm reads the float32 input twice and the ReLU
  after it reads and writes float32 twice more;
- backward (:func:`batch_norm_backward`): the channel sums of ``g`` and ``g * (x - mean)``
  (float32 over a tile's rows, float64 across tiles), then the input gradient in one pass,
  the ReLU's mask applied on the way in; no dequantised copy of the input and no separate ReLU
  backward.

Both output passes reduce max |value| into a slot the output carries
(``quantise.remember_amax_slot``), so the quantiser of the layer that reads it next (the next
convolution's input, or the output gradient of the layer below) skips its reduction pass.

Layouts: channels fastest in memory (channels-last maps of any rank, ``[N, C]`` rows), walked
as ``[R, C]``. Other layouts, dtypes or devices return ``None`` (the caller runs ATen).
"""
from __future__ import annotations

import struct

import torch

from .quantise import HAS_TRITON, remember_amax_slot

__all__ = ["batch_norm_forward", "batch_norm_backward"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quantise import pow2_f32, reduce_amax

    @triton.jit
    def _float64(hi, lo, BLOCK_C: tl.constexpr):
        # a float64 scalar passed as two float32 parts (hi + lo holds 48 significant bits), or an
        # integer scalar with lo = 0, as a [BLOCK_C] vector (scalar arguments have no .to() in the
        # interpreter)
        return tl.zeros([BLOCK_C], dtype=tl.float64) + hi + lo

    @triton.jit
    def _tile(r0, R, C, pid_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # offsets and bounds of the [BLOCK_R, BLOCK_C] tile at row r0 of an [R, C] walk
        rows = r0 + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        return rows.to(tl.int64)[:, None] * C + cols[None, :], mask, cols, cols < C

    @triton.jit
    def _sums_kernel(m_ptr, part_ptr, R, C, TILES, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     WIDE: tl.constexpr):
        # this program's TILES tiles of rows: exact sums of m and m*m per channel (int32 within a
        # tile of int8 values, int64 across; squares of int16 values in int64 from the start)
        pid, pid_c = tl.program_id(0), tl.program_id(1)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (a loop's own names do not outlive it)
        s1 = tl.zeros([BLOCK_C], dtype=tl.int64)
        s2 = tl.zeros([BLOCK_C], dtype=tl.int64)
        for t in range(TILES):
            offs, mask, _, _ = _tile((pid * TILES + t) * BLOCK_R, R, C, pid_c, BLOCK_R, BLOCK_C)
            v = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.int32)
            s1 += tl.sum(v, axis=0).to(tl.int64)
            if WIDE:
                w = v.to(tl.int64)
                s2 += tl.sum(w * w, axis=0)
            else:
                s2 += tl.sum(v * v, axis=0).to(tl.int64)
        out = part_ptr + pid * 2 * C + cols
        tl.store(out, s1, mask=cols < C)
        tl.store(out + C, s2, mask=cols < C)

    @triton.jit
    def _clear_slot(amax_ptr):
        # the next kernel's absmax slot, zeroed here rather than by a fill launch of its own
        if tl.program_id(0) == 0:
            tl.store(amax_ptr + tl.arange(0, 2), tl.zeros([2], dtype=tl.int32))

    @triton.jit
    def _totals(part_ptr, P, C, cols, cmask, DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
        # the sums kernels' [P, 2, C] partials added over P for the channels cols, 32 rows of
        # partials per load: one row per iteration would wait out a load's latency P times
        t1 = tl.zeros([BLOCK_C], dtype=DTYPE)
        t2 = tl.zeros([BLOCK_C], dtype=DTYPE)
        for p0 in range(0, P, 32):
            ps = p0 + tl.arange(0, 32)
            offs = ps[:, None] * 2 * C + cols[None, :]
            inside = (ps < P)[:, None] & cmask[None, :]
            t1 += tl.sum(tl.load(part_ptr + offs, mask=inside, other=0), axis=0)
            t2 += tl.sum(tl.load(part_ptr + offs + C, mask=inside, other=0), axis=0)
        return t1, t2

    @triton.jit
    def _stats_kernel(part_ptr, P, C, R, s_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, stats_ptr, ab_ptr, amax_ptr,
                      eps_hi, eps_lo, mom_hi, mom_lo, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      RUNNING: tl.constexpr, BLOCK_C: tl.constexpr):
        # batch_norm_cpu.c's statistics: mean and variance of the mantissas from exact sums in
        # float64, scaled by 2**-s; y = m * a + b with a = alpha * 2**-s, b = bias - mean * alpha
        _clear_slot(amax_ptr)
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        s1, s2 = _totals(part_ptr, P, C, cols, cmask, tl.int64, BLOCK_C)
        scale = pow2_f32(-tl.load(s_ptr).to(tl.int32)).to(tl.float64)
        n = _float64(R, 0, BLOCK_C)
        t1 = s1.to(tl.float64)
        mean_m = t1 / n
        var_m = (s2.to(tl.float64) - t1 * mean_m) / n
        mean = mean_m * scale
        var = tl.maximum(var_m, 0.0) * scale * scale
        invstd = (1.0 / tl.sqrt(var + _float64(eps_hi, eps_lo, BLOCK_C))).to(tl.float32)
        alpha = invstd
        if HAS_W:
            alpha = invstd * tl.load(w_ptr + cols, mask=cmask, other=1.0)
        beta = -(mean.to(tl.float32) * alpha)
        if HAS_B:
            beta = tl.load(b_ptr + cols, mask=cmask, other=0.0) - mean.to(tl.float32) * alpha
        tl.store(ab_ptr + cols, (alpha.to(tl.float64) * scale).to(tl.float32), mask=cmask)
        tl.store(ab_ptr + C + cols, beta, mask=cmask)
        tl.store(stats_ptr + cols, mean.to(tl.float32), mask=cmask)
        tl.store(stats_ptr + C + cols, invstd, mask=cmask)
        if RUNNING:
            mom = _float64(mom_hi, mom_lo, BLOCK_C)
            rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
            rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
            tl.store(rm_ptr + cols, ((1.0 - mom) * rm + mom * mean).to(tl.float32), mask=cmask)
            tl.store(rv_ptr + cols, ((1.0 - mom) * rv + mom * var * n / (n - 1.0)).to(tl.float32), mask=cmask)

    @triton.jit
    def _apply_kernel(m_ptr, ab_ptr, y_ptr, mask_ptr, amax_ptr, R, C, RELU: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
        # y = m * a + b; with RELU, torch.relu's value (NaN and -0.0 pass) and the mask y != 0;
        # max |y| into amax for the quantiser of the layer reading y (it skips its reduction)
        offs, mask, cols, cmask = _tile(tl.program_id(0) * BLOCK_R, R, C, tl.program_id(1), BLOCK_R, BLOCK_C)
        a = tl.load(ab_ptr + cols, mask=cmask, other=0.0)
        b = tl.load(ab_ptr + C + cols, mask=cmask, other=0.0)
        y = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.float32) * a[None, :] + b[None, :]
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)
            tl.store(mask_ptr + offs, (y != 0.0).to(tl.uint8), mask=mask)
        tl.store(y_ptr + offs, y, mask=mask)
        reduce_amax(y, mask, amax_ptr)

    @triton.jit
    def _masked_grad(g_ptr, mask_ptr, offs, mask, MASKED: tl.constexpr):
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if MASKED:  # the fused ReLU's backward: mask ? g : +0
            g = tl.where(tl.load(mask_ptr + offs, mask=mask, other=0) != 0, g, 0.0)
        return g

    @triton.jit
    def _grad_sums_kernel(g_ptr, m_ptr, mask_ptr, s_ptr, mean_ptr, part_ptr, R, C, TILES,
                          MASKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # sums of g and g * (x - mean) per channel: float32 over a tile's rows, float64 across
        pid, pid_c = tl.program_id(0), tl.program_id(1)
        scale = pow2_f32(-tl.load(s_ptr).to(tl.int32))
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mean = tl.load(mean_ptr + cols, mask=cols < C, other=0.0)
        sg = tl.zeros([BLOCK_C], dtype=tl.float64)
        sx = tl.zeros([BLOCK_C], dtype=tl.float64)
        for t in range(TILES):
            offs, mask, _, _ = _tile((pid * TILES + t) * BLOCK_R, R, C, pid_c, BLOCK_R, BLOCK_C)
            g = _masked_grad(g_ptr, mask_ptr, offs, mask, MASKED)
            xc = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.float32) * scale - mean[None, :]
            sg += tl.sum(g, axis=0).to(tl.float64)
            sx += tl.sum(tl.where(mask, g * xc, 0.0), axis=0).to(tl.float64)
        out = part_ptr + pid * 2 * C + cols
        tl.store(out, sg, mask=cols < C)
        tl.store(out + C, sx, mask=cols < C)

    @triton.jit
    def _factors_kernel(part_ptr, P, C, R, invstd_ptr, w_ptr, k_ptr, gw_ptr, gb_ptr, amax_ptr,
                        HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
        # gx = k * (g - k_g - (x - mean) * k_x) as batch_norm_cpu.c's factors(); the weight
        # gradient sum_gxc * invstd and the bias gradient sum_g
        _clear_slot(amax_ptr)
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        sg, sx = _totals(part_ptr, P, C, cols, cmask, tl.float64, BLOCK_C)
        n = _float64(R, 0, BLOCK_C)
        inv = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
        w = tl.full([BLOCK_C], 1.0, tl.float64)
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
        tl.store(k_ptr + cols, (w * inv).to(tl.float32), mask=cmask)
        tl.store(k_ptr + C + cols, (sg / n).to(tl.float32), mask=cmask)
        tl.store(k_ptr + 2 * C + cols, (sx / n * inv * inv).to(tl.float32), mask=cmask)
        tl.store(gw_ptr + cols, (sx * inv).to(tl.float32), mask=cmask)
        tl.store(gb_ptr + cols, sg.to(tl.float32), mask=cmask)

    @triton.jit
    def _grad_apply_kernel(g_ptr, m_ptr, mask_ptr, s_ptr, mean_ptr, k_ptr, gx_ptr, amax_ptr, R, C,
                           MASKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # gx, and max |gx| into amax for the gradient quantiser of the layer below
        offs, mask, cols, cmask = _tile(tl.program_id(0) * BLOCK_R, R, C, tl.program_id(1), BLOCK_R, BLOCK_C)
        scale = pow2_f32(-tl.load(s_ptr).to(tl.int32))
        g = _masked_grad(g_ptr, mask_ptr, offs, mask, MASKED)
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
        k = tl.load(k_ptr + cols, mask=cmask, other=0.0)
        k_g = tl.load(k_ptr + C + cols, mask=cmask, other=0.0)
        k_x = tl.load(k_ptr + 2 * C + cols, mask=cmask, other=0.0)
        xc = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.float32) * scale - mean[None, :]
        gx = k[None, :] * (g - k_g[None, :] - xc * k_x[None, :])
        tl.store(gx_ptr + offs, gx, mask=mask)
        reduce_amax(gx, mask, amax_ptr)


TILE = 4096  # values per tile
PROGRAMS = 512  # row programs of the sums kernels at most (a few per SM)


def _rows_layout(t: torch.Tensor) -> bool:
    """Channels (dim 1) fastest in memory and the rest dense: a channels-last map of any rank,
    or ``[N, C]`` rows, walked as ``[numel / C, C]``."""
    return t.dim() >= 2 and t.movedim(1, -1).is_contiguous()


def _blocks(R: int, C: int) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_C, programs, tiles per program)`` of the sums kernels."""
    block_c = min(triton.next_power_of_2(C), 64)
    block_r = min(max(TILE // block_c, 16), 256)
    tiles = triton.cdiv(R, block_r)
    per = triton.cdiv(tiles, PROGRAMS)
    return block_r, block_c, triton.cdiv(tiles, per), per


def _float32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _slot(device: torch.device) -> torch.Tensor:
    """An absmax slot for an output pass; the statistics kernel before that pass zeroes it."""
    return torch.empty((1, 2), dtype=torch.int32, device=device)


def _parts(v: float) -> tuple[float, float]:
    """A float64 ``v`` as float32 ``(hi, lo)`` with ``hi + lo`` within 2**-48 of ``v``: Triton
    passes Python floats to kernels as float32."""
    hi = _float32(v)
    return hi, _float32(v - hi)


def _applies(m: torch.Tensor, s: torch.Tensor, *params) -> bool:
    return (HAS_TRITON and m.dtype in (torch.int8, torch.int16) and m.numel() > 0 and _rows_layout(m)
            and s.numel() == 1 and s.device == m.device and m.numel() // m.shape[1] >= 2
            and all(p is None or (p.dtype == torch.float32 and p.is_contiguous() and p.device == m.device)
                    for p in params))


def batch_norm_forward(m: torch.Tensor, s: torch.Tensor, weight, bias, running_mean, running_var,
                       momentum: float, eps: float, relu: bool = False):
    """``native_batch_norm`` (training mode) of ``x = m * 2**-s``: ``(y, mean, invstd)``, with
    ``relu`` ``(relu(y), mean, invstd, mask)``; the running statistics updated in place like
    ATen's (unbiased variance). ``None`` where the kernels do not apply (see the module notes;
    one value per channel is left to the stock module's error)."""
    if not _applies(m, s, weight, bias, running_mean, running_var):
        return None
    C = m.shape[1]
    R = m.numel() // C
    block_r, block_c, programs, per = _blocks(R, C)
    part = torch.empty((programs, 2, C), dtype=torch.int64, device=m.device)
    _sums_kernel[(programs, triton.cdiv(C, block_c))](m, part, R, C, per, BLOCK_R=block_r, BLOCK_C=block_c,
                                                      WIDE=m.dtype == torch.int16)
    stats = torch.empty((2, C), dtype=torch.float32, device=m.device)
    ab = torch.empty((2, C), dtype=torch.float32, device=m.device)
    running = running_mean is not None and running_var is not None
    amax = _slot(m.device)
    _stats_kernel[(triton.cdiv(C, 64),)](
        part, programs, C, R, s, *(stats if t is None else t for t in (weight, bias, running_mean, running_var)),
        stats, ab, amax, *_parts(eps), *_parts(momentum),
        HAS_W=weight is not None, HAS_B=bias is not None, RUNNING=running, BLOCK_C=64)
    y = torch.empty_like(m, dtype=torch.float32)
    mask = torch.empty_like(m, dtype=torch.uint8) if relu else y
    _apply_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](m, ab, y, mask, amax, R, C, RELU=relu,
                                                                       BLOCK_R=block_r, BLOCK_C=block_c)
    return (remember_amax_slot(y, amax), stats[0], stats[1]) + ((mask,) if relu else ())


def batch_norm_backward(grad: torch.Tensor, m: torch.Tensor, s: torch.Tensor, mean: torch.Tensor,
                        invstd: torch.Tensor, weight, need: tuple[bool, bool, bool], relu_mask=None):
    """``native_batch_norm_backward`` (training mode) for ``x = m * 2**-s``: ``(grad_input,
    grad_weight, grad_bias)``, each ``None`` where ``need`` says so; ``None`` altogether where
    the kernels do not apply. ``relu_mask``: the byte mask of the ReLU fused after the batch
    norm (:func:`batch_norm_forward`); ``grad`` is then the ReLU output's gradient. ``grad``
    in another memory order than ``m`` is copied into ``m``'s."""
    if (not _applies(m, s, mean, invstd, weight) or grad.dtype != torch.float32 or grad.shape != m.shape
            or grad.device != m.device
            or relu_mask is not None and (relu_mask.dtype != torch.uint8 or relu_mask.stride() != m.stride())):
        return None
    if grad.stride() != m.stride():
        grad = torch.empty_like(m, dtype=torch.float32).copy_(grad)
    C = m.shape[1]
    R = m.numel() // C
    block_r, block_c, programs, per = _blocks(R, C)
    masked = relu_mask is not None
    mask = relu_mask if masked else grad
    part = torch.empty((programs, 2, C), dtype=torch.float64, device=m.device)
    _grad_sums_kernel[(programs, triton.cdiv(C, block_c))](grad, m, mask, s, mean, part, R, C, per, MASKED=masked,
                                                           BLOCK_R=block_r, BLOCK_C=block_c)
    k = torch.empty((3, C), dtype=torch.float32, device=m.device)
    wb = torch.empty((2, C), dtype=torch.float32, device=m.device)
    amax = _slot(m.device)
    _factors_kernel[(triton.cdiv(C, 64),)](part, programs, C, R, invstd, k if weight is None else weight, k, wb[0],
                                           wb[1], amax, HAS_W=weight is not None, BLOCK_C=64)
    gx = None
    if need[0]:
        gx = torch.empty_like(grad)
        _grad_apply_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
            grad, m, mask, s, mean, k, gx, amax, R, C, MASKED=masked, BLOCK_R=block_r, BLOCK_C=block_c)
        remember_amax_slot(gx, amax)
    return gx, (wb[0] if need[1] else None), (wb[1] if need[2] else None)
