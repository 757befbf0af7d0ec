"""Dynamic fixed-point quantisation (SPEC section 1): reference, Triton kernels and launcher.

A tensor ``x`` quantised to ``b`` bits is an integer tensor ``m`` and an exponent ``s``
(per tensor, or one per slice along ``axis``) with ``x ~= m * 2**-s``. ``s`` is the largest
integer with ``amax * 2**s <= 2**(b-1) - 1`` over the finite entries, capped so that the grid
step ``2**-s`` stays representable in the input dtype.

Every backend computes the mantissa the same way, in float32 arithmetic that is exact:
``v = x * 2**s`` (a power-of-two scaling done in two steps so the factor never overflows),
``f = floor(v)``; nearest rounding is half to even; stochastic rounding is
``f + (u < v - f)`` with ``u ~ U[0, 1)``, which equals ``floor(v + u')`` for ``u' = 1 - u`` and
is therefore unbiased: ``P(m = f + 1) = v - f``.
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with the CUDA builds of torch on Linux; the CPU route does not need it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

__all__ = [
    "MAX_EXPONENT",
    "MAX_BITS",
    "mantissa_dtype",
    "is_dense",
    "NONFINITE_EXPONENT",
    "exponent_from_amax",
    "pow2_factors",
    "scale_pow2",
    "quantise_reference",
    "dequantise_reference",
    "quantise_triton",
    "scale_triton",
    "HAS_TRITON",
    "autotune_bench",
    "autotune",
    "triton_path",
    "remember_amax_slot",
    "recorded_amax_slot",
]

# Largest exponent whose grid step 2**-s is still representable (down to the smallest subnormal).
MAX_EXPONENT = {torch.float32: 149, torch.bfloat16: 133, torch.float16: 24}
_FMAX = {dt: float(torch.finfo(dt).max) for dt in MAX_EXPONENT}
# Largest word length whose integer grid the dtype holds exactly (sign + significand bits).
MAX_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


# Tests set this (with TRITON_INTERPRET=1) to run the training ops' CUDA code path on CPU tensors.
FORCE_TRITON_PATH = False


def triton_path(t: torch.Tensor) -> bool:
    """Whether the training ops quantise and dequantise ``t`` with the Triton kernels: CUDA
    tensors, or any tensor while ``FORCE_TRITON_PATH`` is set."""
    return HAS_TRITON and (t.device.type == "cuda" or FORCE_TRITON_PATH)


def autotune_bench(fn, quantiles):
    """The autotuners' timer: 5 ms of warm-up and 20 ms of timed runs per configuration.
    Triton's default (25 + 100 ms) makes a network's first training step spend minutes tuning:
    every layer shape is a new key for each of the three products."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _first_of(prune):
    """An ``early_config_prune`` keeping the first configuration ``prune`` (or none) keeps."""
    def first(configs, named_args, **kwargs):
        return list(prune(configs, named_args, **kwargs) if prune is not None else configs)[:1]
    return first


def autotune(configs, key, prune=None):
    """``triton.autotune`` with :func:`autotune_bench` as its timer; Triton releases before the
    ``do_bench`` argument (3.3) take the same times through ``warmup``/``rep``. ``prune`` is
    Triton's ``early_config_prune``: ``prune(configs, named_args, **constexprs)``. Tuning results
    are cached on disk where Triton can (``cache_results``), so only the first process to run a
    layer shape times its configurations.

    ``MUPPET_FX_AUTOTUNE=0`` in the environment (read when the kernels are defined) keeps only
    the first configuration that ``prune`` leaves: one compilation per shape and no timing runs,
    for test runs on a GPU, where every odd test shape would otherwise compile and time them all."""
    import inspect

    timer = ({"do_bench": autotune_bench} if "do_bench" in inspect.signature(triton.autotune).parameters
             else {"warmup": 5, "rep": 20})
    if os.environ.get("MUPPET_FX_AUTOTUNE", "1") == "0":
        prune = _first_of(prune)
    extra = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
    # Tuning results kept on disk (Triton 3.2 and later): a later process skips the timing runs.
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        extra["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **timer, **extra)


# Exponent that marks a tensor holding NaN/inf in training ops: its dequantisation factor
# 2**-NONFINITE_EXPONENT is inf, so the non-finite input shows up in the layer's output.
NONFINITE_EXPONENT = -(2**30)


def is_dense(t: torch.Tensor) -> bool:
    """Contiguous, or channels-last 4-d: the memory orders the kernels walk flat."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def mantissa_dtype(bits: int) -> torch.dtype:
    """Storage dtype of the mantissas: int8 up to 8 bits, int16 up to 16, int32 above."""
    return torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32


def exponent_from_amax(amax: torch.Tensor, bits: int, max_exponent: int) -> torch.Tensor:
    """Largest integer ``s`` with ``amax * 2**s <= 2**(bits-1) - 1`` (int32, same shape as amax).

    Computed in float64, where ``amax * 2**s`` is exact, so the two corrections below make the
    logarithm's rounding irrelevant. ``amax == 0`` (or non-finite) gives ``s = 0``.
    """
    qmax = float(2 ** (bits - 1) - 1)
    a = amax.double()
    valid = (a > 0) & torch.isfinite(a)
    a = torch.where(valid, a, torch.ones_like(a))
    s = torch.floor(torch.log2(qmax / a))
    s = torch.where(torch.ldexp(a, s) > qmax, s - 1, s)
    s = torch.where(torch.ldexp(a, s + 1) <= qmax, s + 1, s)
    s = torch.clamp(s, max=max_exponent)
    return torch.where(valid, s, torch.zeros_like(s)).to(torch.int32)


def pow2_factors(s: torch.Tensor) -> torch.Tensor:
    """Float32 factors ``(2**h, 2**(s-h), 2**-h, 2**(h-s))`` with ``h = floor(s / 2)``, stacked last.

    Scaling by ``2**s`` as two multiplications keeps every factor finite (``|s| <= 149``).
    """
    s = s.to(torch.float64)
    h = torch.floor(s / 2)
    one = torch.ones_like(s)
    parts = [torch.ldexp(one, e) for e in (h, s - h, -h, h - s)]
    return torch.stack(parts, dim=-1).to(torch.float32)


def _reduce_dims(x: torch.Tensor, axis: int | None) -> list[int] | None:
    return None if axis is None else [d for d in range(x.dim()) if d != axis]


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def scale_pow2(t: torch.Tensor, s: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``t * 2**s`` (``s`` per tensor, or per slice along ``axis``), exact for float32 ``t``."""
    f = pow2_factors(s)
    return t * _broadcast(f[..., 0], t, axis) * _broadcast(f[..., 1], t, axis)


def _round(v: torch.Tensor, rounding: str, noise: torch.Tensor | None,
           generator: torch.Generator | None) -> torch.Tensor:
    if rounding == "nearest":
        return torch.round(v)
    if noise is None:
        noise = torch.rand(v.shape, generator=generator, device=v.device, dtype=torch.float32)
    f = torch.floor(v)
    return f + (noise < v - f).to(v.dtype)


def quantise_reference(x: torch.Tensor, bits: int, rounding: str, *, axis: int | None = None,
                       generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None):
    """Plain-torch oracle. Returns ``(m, s, finite)``.

    ``m`` holds the integer mantissas as float32 (0 where ``x`` is not finite), ``s`` the int32
    exponent (0-d, or 1-d along ``axis``), ``finite`` the mask of finite entries. ``noise``
    replaces the uniform draws of stochastic rounding (same shape as ``x``).
    """
    xf = x.float()
    finite = torch.isfinite(xf)
    mag = torch.where(finite, xf.abs(), torch.zeros_like(xf))
    dims = _reduce_dims(x, axis)
    if mag.numel() == 0:  # amax of nothing is 0, so s = 0
        amax = mag.new_zeros(() if axis is None else (x.shape[axis],))
    else:
        amax = mag.amax() if dims is None else mag.amax(dim=dims) if dims else mag
    s = exponent_from_amax(amax, bits, MAX_EXPONENT[x.dtype])
    v = scale_pow2(torch.where(finite, xf, torch.zeros_like(xf)), s, axis)
    return _round(v, rounding, noise, generator), s, finite


def dequantise_reference(m: torch.Tensor, s: torch.Tensor, dtype: torch.dtype,
                         axis: int | None = None) -> torch.Tensor:
    """``m * 2**-s`` in ``dtype``; saturates at the dtype's largest finite value.

    Saturation only acts when ``amax`` lies within a factor of two of the dtype's largest value
    at a word length whose top grid point is not representable (e.g. 2 bits, ``amax > 2**127``).
    """
    fmax = torch.finfo(dtype).max
    return torch.clamp(scale_pow2(m.float(), -s, axis), -fmax, fmax).to(dtype)


# --------------------------------------------------------------------------------------------
# Triton: one kernel reduces |x| into one slot per row with atomic maxima, a second derives the
# exponent from that slot inside the kernel, then scales, rounds and writes mantissas and/or
# dequantised values. The tensor is viewed as (rows, L): one row per tensor, or one per channel.
# Three launches per quantisation (zeroing the slots included), where computing the exponent
# and its factors with torch ops on the device took about forty.
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _exponent_of(a_bits, qmax, log2_qmax, max_exp):
        # The largest s with amax * 2**s <= qmax = 2**(b-1) - 1 (SPEC section 1), from the float32
        # bits of amax (finite, >= 0; 0 gives s = 0), in integers: amax = sig * 2**e exactly, and
        # sig * 2**t lies in [2**log2_qmax, 2**(log2_qmax + 1)) like qmax, so t or t - 1 is the
        # largest t with sig * 2**t <= qmax; then s = t - e, capped at max_exp.
        field = (a_bits >> 23) & 0xFF
        sig = tl.where(field > 0, (a_bits & 0x7FFFFF) | 0x800000, a_bits & 0x7FFFFF)
        e = tl.where(field > 0, field - 150, -149)
        log2_sig = ((sig.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # sig < 2**24: exact
        t = log2_qmax - log2_sig
        fits = (sig.to(tl.int64) << tl.maximum(t, 0)) <= (qmax.to(tl.int64) << tl.maximum(-t, 0))
        s = tl.minimum(tl.where(fits, t, t - 1) - e, max_exp)
        return tl.where(a_bits > 0, s, 0)

    @triton.jit
    def pow2_f32(k):
        # float32 2**k for an integer k, built from its bits, so exact: subnormal down to 2**-149,
        # 0 below, inf above 2**127 (a NONFINITE_EXPONENT shows up as inf, as with torch.ldexp)
        kc = tl.minimum(tl.maximum(k, -150), 128).to(tl.int32)
        sub = 1 << tl.minimum(tl.maximum(kc + 149, 0), 22)
        bits = tl.where(kc >= -126, (kc + 127) << 23, tl.where(kc >= -149, sub, 0))
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def times_pow2(x, e):
        # float32 x * 2**e for an integer exponent tensor e, as two exact factors 2**h * 2**(e-h),
        # h = floor(e / 2), the split pow2_factors makes, so no factor overflows on its own
        h = e >> 1
        return x.to(tl.float32) * pow2_f32(h) * pow2_f32(e - h)

    @triton.jit
    def reduce_amax(c, mask, amax_ptr):
        # A GEMM or convolution epilogue's share of the output quantiser's reduction: the bits of
        # max |c| over this tile's finite entries into amax[0] and a NaN/inf flag into amax[1],
        # by atomic maxima (finite non-negative float32 bit patterns order like the values).
        finite = (c == c) & (tl.abs(c) < float("inf"))
        tile_max = tl.max(tl.max(tl.where(finite & mask, tl.abs(c), 0.0), axis=1), axis=0)
        bad = tl.max(tl.max(tl.where(finite | ~mask, 0, 1), axis=1), axis=0)
        tl.atomic_max(amax_ptr, tile_max.to(tl.int32, bitcast=True))
        tl.atomic_max(amax_ptr + 1, bad.to(tl.int32))

    @triton.jit
    def reduce_into_slot(x, mask, slot_ptr):
        # a block's share of slot = (bits of max |x| over finite entries, non-finite flag), by
        # atomic maxima (masked-off x must read as 0)
        finite = (x == x) & (tl.abs(x) < float("inf"))
        tl.atomic_max(slot_ptr, tl.max(tl.where(finite, tl.abs(x), 0.0), axis=0).to(tl.int32, bitcast=True))
        tl.atomic_max(slot_ptr + 1, tl.max(tl.where(finite | ~mask, 0, 1), axis=0))

    @triton.jit
    def _absmax_kernel(
        x_ptr, slot_ptr,  # pointers; slot[row] = (bits of max |x| over finite entries, non-finite flag)
        L,  # size
        BLOCK: tl.constexpr,
    ):
        # For finite non-negative floats the int32 bit patterns order like the values, so an
        # integer atomic max over blocks is the float max.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < L
        x = tl.load(x_ptr + row * L + offs, mask=mask, other=0.0).to(tl.float32)
        reduce_into_slot(x, mask, slot_ptr + row * 2)

    @triton.jit
    def rounded_mantissas(x, s, u, STOCHASTIC: tl.constexpr):
        # m = round(x * 2**s) (NaN/inf read as 0): floor + (u < fraction) with STOCHASTIC, else
        # half to even. 2**s is applied as two factors 2**h * 2**(s-h), h = floor(s / 2).
        h = s >> 1
        finite = (x == x) & (tl.abs(x) < float("inf"))
        v = tl.where(finite, x, 0.0) * pow2_f32(h) * pow2_f32(s - h)
        f = tl.floor(v)
        d = v - f
        if STOCHASTIC:
            m = f + tl.where(u < d, 1.0, 0.0)
        else:
            half = f * 0.5
            odd = tl.floor(half) != half
            m = f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)
        return m

    @triton.jit
    def dequantised_values(m, s, x, fmax):
        # m * 2**-s clamped to +-fmax; a non-finite x passes through
        h = s >> 1
        q = tl.minimum(tl.maximum(m * pow2_f32(-h) * pow2_f32(h - s), -fmax), fmax)
        return tl.where((x == x) & (tl.abs(x) < float("inf")), q, x)

    # seed and offset change from call to call: specialising on them would compile variants.
    # qmax is 1 at 2 bits, and Triton turns an integer argument equal to 1 into a Python int
    # constant, on which _exponent_of's .to() fails.
    @triton.jit(do_not_specialize=["seed", "offset", "qmax"])
    def _quantise_kernel(
        x_ptr, noise_ptr, seed_ptr, slot_ptr, s_ptr, m_ptr, q_ptr,  # pointers
        L, seed, offset, fmax, qmax, log2_qmax, max_exp,  # sizes and scalars
        STOCHASTIC: tl.constexpr, NOISE_FROM_PTR: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
        MARK_NONFINITE: tl.constexpr, WRITE_M: tl.constexpr, WRITE_Q: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # s[row] from the row's max |x|; m = round(x * 2**s); q = m * 2**-s (non-finite x passes
        # through to q).
        # MARK_NONFINITE: a row holding NaN/inf reports NONFINITE_EXPONENT as its s.
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        s = _exponent_of(tl.load(slot_ptr + row * 2), qmax, log2_qmax, max_exp)
        if blk == 0:
            if MARK_NONFINITE:
                tl.store(s_ptr + row, tl.where(tl.load(slot_ptr + row * 2 + 1) > 0, -(2**30), s))
            else:
                tl.store(s_ptr + row, s)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < L
        idx = row * L + offs
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        u = 0.0
        if STOCHASTIC:
            if NOISE_FROM_PTR:
                u = tl.load(noise_ptr + idx, mask=mask, other=0.0)
            elif SEED_FROM_PTR:  # drawn on the device: a CUDA graph's replay reads a fresh one
                u = tl.rand(tl.load(seed_ptr), (idx + offset).to(tl.int32))
            else:
                u = tl.rand(seed, (idx + offset).to(tl.int32))
        m = rounded_mantissas(x, s, u, STOCHASTIC)
        if WRITE_M:
            tl.store(m_ptr + idx, m.to(m_ptr.dtype.element_ty), mask=mask)
        if WRITE_Q:
            tl.store(q_ptr + idx, dequantised_values(m, s, x, fmax).to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_kernel(acc_ptr, out_ptr, sa_ptr, sb_ptr, n, HAS_SB: tl.constexpr, BLOCK: tl.constexpr):
        # out = float32(acc) * 2**-(sa + sb) (sb = 0 without HAS_SB), as two exact factors
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        e = -tl.load(sa_ptr).to(tl.int64)
        if HAS_SB:
            e -= tl.load(sb_ptr).to(tl.int64)
        acc = tl.load(acc_ptr + offs, mask=offs < n, other=0)
        tl.store(out_ptr + offs, times_pow2(acc, e), mask=offs < n)


def scale_triton(acc: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``acc * 2**-(s_a + s_b)`` for a dense integer (or float) accumulator (mantissas,
    for a dequantisation with ``s_b=None``) and per-tensor exponents on the device, laid out like
    ``acc``: one launch, where torch ops take about twenty."""
    if not is_dense(acc):
        raise ValueError("scale_triton needs a dense accumulator (contiguous or channels-last)")
    out = torch.empty_like(acc, dtype=torch.float32)
    n = acc.numel()
    if n:
        _scale_kernel[(triton.cdiv(n, 1024),)](acc, out, s_a.reshape(1), (s_a if s_b is None else s_b).reshape(1), n,
                                               HAS_SB=s_b is not None, BLOCK=1024)
    return out


def remember_amax_slot(t: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Record that the kernel writing ``t`` reduced its max |value| into ``slot`` (int32
    ``[1, 2]`` as :func:`quantise_triton`'s ``amax_slot``), so that quantising ``t`` per tensor
    skips its reduction pass; tied to ``t``'s version counter, as the CPU kernels' recorded
    absmax (``quantise_cpu.remember_absmax``). Returns ``t``."""
    try:
        t._muppet_amax_slot = (t._version, slot)
    except RuntimeError:  # inference tensors keep no version counter
        pass
    return t


def recorded_amax_slot(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s recorded slot (:func:`remember_amax_slot`) while it still holds, else ``None``."""
    known = getattr(t, "_muppet_amax_slot", None)
    return known[1] if known is not None and known[0] == t._version else None


def quantise_triton(x: torch.Tensor, bits: int, rounding: str, *, axis: int | None = None,
                    seed: int | torch.Tensor = 0, offset: int = 0, noise: torch.Tensor | None = None,
                    want_mantissa: bool = True, want_values: bool = False, block: int = 1024,
                    amax_slot: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    mark_nonfinite: bool = False):
    """Triton launcher. Returns ``(m or None, s, q or None, nonfinite)``.

    ``m`` is the integer mantissa tensor (storage dtype of ``bits``), ``s`` the int32 exponent,
    ``q`` the dequantised values in ``x.dtype``. Stochastic draws come from
    ``tl.rand(seed, offset + flat_index)`` unless ``noise`` (float32, shape of ``x``) is given;
    ``seed`` is an int, or a one-element int64 tensor on ``x``'s device that the kernel reads
    (so a captured CUDA graph draws anew when the graph refreshes that tensor).
    ``nonfinite`` is a bool tensor shaped like ``s``: the row holds a NaN or inf.
    ``amax_slot`` (per tensor only): int32 ``[1, 2]``, the bits of max |x| over finite entries
    and a non-finite flag, already reduced by whoever wrote ``x`` (a GEMM epilogue); the
    reduction pass is then skipped. ``out`` (laid out like ``x``, may be ``x``) receives ``q``.
    ``mark_nonfinite``: a row holding NaN/inf gets ``NONFINITE_EXPONENT`` as its ``s`` (what the
    training ops want), set by the kernel; ``nonfinite`` is then ``None`` (one device op fewer).
    """
    if not HAS_TRITON:
        raise NotImplementedError("backend='triton' needs the triton package, which is not installed")
    moved = x if axis in (None, 0) else x.movedim(axis, 0)
    channels_last = axis is None and x.dim() == 4 and not x.is_contiguous() \
        and x.is_contiguous(memory_format=torch.channels_last)
    xc = moved if channels_last else moved.contiguous()  # per tensor, memory order is free
    rows = 1 if axis is None else xc.shape[0]
    L = xc.numel() // max(rows, 1)
    if L == 0 or rows == 0:
        s = torch.zeros(() if axis is None else (rows,), dtype=torch.int32, device=x.device)
        m = torch.zeros(x.shape, dtype=mantissa_dtype(bits), device=x.device) if want_mantissa else None
        return m, s, (x.clone() if want_values else None), torch.zeros(s.shape, dtype=torch.bool)
    seed_from_ptr = isinstance(seed, torch.Tensor)
    if seed_from_ptr and (seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device):
        raise ValueError(f"a tensor seed must be one int64 value on {x.device}; got {seed.dtype} "
                         f"of {seed.numel()} elements on {seed.device}")
    n_blocks = triton.cdiv(L, block)
    if amax_slot is not None:
        if axis is not None:
            raise NotImplementedError("amax_slot holds one per-tensor reduction; axis must be None")
        slot = amax_slot
    else:
        slot = torch.zeros((rows, 2), dtype=torch.int32, device=x.device)
        _absmax_kernel[(rows, n_blocks)](xc, slot, L, BLOCK=block)
    s = torch.empty(rows, dtype=torch.int32, device=x.device)
    m = torch.empty_like(xc, dtype=mantissa_dtype(bits)) if want_mantissa else None
    in_place = out is not None and out.shape == xc.shape and out.stride() == xc.stride()
    q = (out if in_place else torch.empty_like(xc)) if want_values else None
    if q is not None and getattr(q, "_muppet_amax_slot", None) is not None:
        q._muppet_amax_slot = None  # written below without a version bump
    if noise is not None:
        noise = (noise if axis in (None, 0) else noise.movedim(axis, 0)).float()
        noise = noise.contiguous(memory_format=torch.channels_last) if channels_last else noise.contiguous()
    _quantise_kernel[(rows, n_blocks)](
        xc, noise if noise is not None else xc, seed if seed_from_ptr else slot, slot, s,
        m if m is not None else xc, q if q is not None else xc,
        L, 0 if seed_from_ptr else seed, offset, _FMAX[x.dtype], 2 ** (bits - 1) - 1, bits - 2,
        MAX_EXPONENT[x.dtype], STOCHASTIC=rounding == "stochastic", NOISE_FROM_PTR=noise is not None,
        SEED_FROM_PTR=seed_from_ptr, MARK_NONFINITE=mark_nonfinite,
        WRITE_M=want_mantissa, WRITE_Q=want_values, BLOCK=block,
    )
    nonfinite = None if mark_nonfinite else slot[:, 1] > 0
    if axis is None:
        s, nonfinite = s.reshape(()), (None if nonfinite is None else nonfinite.reshape(()))
    back = (lambda t: t) if axis in (None, 0) else (lambda t: t.movedim(0, axis).contiguous())
    return (back(m) if m is not None else None), s, (back(q) if q is not None else None), nonfinite
