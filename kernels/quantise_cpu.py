"""Fast CPU quantiser: one fused C pass (``quantise_cpu.c``) instead of a dozen torch ops.

The reference spends most of its time in ``torch.rand`` and in the dozen elementwise passes of
its arithmetic. Here a float32 tensor costs two passes: an integer max over the magnitude bits
(which also detects NaN/inf) and one fused scale-round-store pass; one pass where a kernel
recorded the absmax, or where a guess of it (``forget_absmax(t, hint=True)``) holds, which
the pass itself checks. The exponent is computed on
the host, which costs no synchronisation for a CPU tensor. Stochastic rounding draws its
uniforms from generators seeded per block by a hash of ``(seed, block)``; results depend on the
seed only.

Inputs the C kernel does not cover (non-float32 dtypes, per-channel exponents, NaN/inf
present) and machines without a C compiler take the reference route; the results follow the
same rules, and for the same ``noise`` they are identical.
"""
from __future__ import annotations

import ctypes
import math
import struct
from pathlib import Path

import torch

from .cbuild import WIDE_VECTORS, load_c_library
from .quantise import MAX_EXPONENT, dequantise_reference, is_dense, mantissa_dtype, quantise_reference

__all__ = ["quantise_cpu", "dequantise_cpu", "requantise_accumulator", "host_exponent", "c_kernel_available",
           "remember_absmax", "carry_absmax", "forget_absmax", "absmax", "quantise_many_in_place"]

_SOURCE = Path(__file__).with_name("quantise_cpu.c")
_DEQ = {torch.int8: "dequantise_i8", torch.int16: "dequantise_i16", torch.int32: "dequantise_i32",
        torch.int64: "dequantise_i64"}
_FN = {torch.int8: "quantise_i8", torch.int16: "quantise_i16", torch.int32: "quantise_i32"}
_lib = None
_FMAX = torch.finfo(torch.float32).max


def _library():
    global _lib
    if _lib is None:
        lib = load_c_library(_SOURCE, WIDE_VECTORS)
        if lib is not None:
            lib.absmax_bits.restype = ctypes.c_uint32
            lib.absmax_bits.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            lib.absmax_i32.restype = ctypes.c_int64
            lib.absmax_i32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            lib.quantise_values_many.restype = None
            lib.quantise_values_many.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5 + [ctypes.c_void_p]
            lib.requantise_i32.restype = None
            lib.requantise_i32.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_float] * 5
                                           + [ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_int, ctypes.c_int])
            for name in _DEQ.values():
                getattr(lib, name).restype = None
                getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                                               ctypes.c_void_p, ctypes.c_int]
            for name in _FN.values():
                fn = getattr(lib, name)
                fn.restype = None
                fn.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_float] * 5
                               + [ctypes.c_int, ctypes.c_uint64] + [ctypes.c_void_p] * 3
                               + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_float])
        _lib = lib if lib is not None else False
    return _lib or None


def c_kernel_available() -> bool:
    return _library() is not None


def remember_absmax(t: torch.Tensor, top: int) -> None:
    """Record ``absmax_bits`` of ``t`` (``max(bits & 0x7fffffff)`` over its float32 values) as a
    kernel that wrote ``t`` gathered it, so that quantising ``t`` skips that pass. Tied to
    ``t``'s version counter, as autograd's saved tensors are: an in-place op afterwards voids
    it (a write the counter does not see, such as one through ``.data``, would not)."""
    try:
        t._muppet_absmax = (t._version, int(top))
    except RuntimeError:  # inference tensors keep no version counter
        pass


def absmax(t: torch.Tensor) -> float | None:
    """The largest ``|value|`` of a dense float32 CPU tensor: the one a kernel recorded
    (:func:`remember_absmax`), else one threaded C pass; ``None`` for other tensors or without
    the C library (NaN/inf read as ``inf``/NaN bits, larger than any finite value)."""
    lib = _library()
    if lib is None or t.dtype != torch.float32 or t.device.type != "cpu" or not is_dense(t):
        return None
    top = _absmax_bits(lib, t, torch.get_num_threads()) if t.numel() else 0
    return struct.unpack("<f", struct.pack("<I", top))[0]


def _hinted_absmax(t: torch.Tensor) -> int | None:
    return getattr(t, "_muppet_absmax_hint", None)


def _recorded_absmax(t: torch.Tensor) -> int | None:
    """``t``'s recorded absmax (:func:`remember_absmax`) while it still holds, else ``None``."""
    known = getattr(t, "_muppet_absmax", None)
    return known[1] if known is not None and known[0] == t._version else None


def carry_absmax(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``dst``, holding ``src``'s values (a reshaped view), with ``src``'s recorded absmax where
    it still holds (:func:`remember_absmax`)."""
    top = _recorded_absmax(src)
    if dst is not src and top is not None:
        remember_absmax(dst, top)
    return dst


def forget_absmax(t: torch.Tensor, hint: bool = False) -> torch.Tensor:
    """Drop ``t``'s recorded absmax (:func:`remember_absmax`) and return ``t``. For tensors handed
    to code that may write them without bumping the version counter: Inductor reuses a dead
    buffer's tensor for a later kernel's output and writes it through its pointer. With
    ``hint``, the record becomes a guess instead: quantising ``t`` then runs on the exponent it
    implies and gathers the true absmax in the same pass, keeping the result only where the
    two exponents agree (the result is the same as after a scan either way)."""
    known = getattr(t, "_muppet_absmax", None) if hint else None
    t._muppet_absmax = t._muppet_amax_slot = None  # the Triton route's record (quantise.remember_amax_slot) too
    t._muppet_absmax_hint = None if known is None or known[0] != t._version else known[1]
    return t


def _absmax_bits(lib, x: torch.Tensor, threads: int) -> int:
    top = _recorded_absmax(x)
    return lib.absmax_bits(x.data_ptr(), x.numel(), threads) if top is None else top


def host_exponent(amax: float, bits: int, max_exponent: int) -> int:
    """``exponent_from_amax`` for one Python float, exact in float64."""
    if amax == 0.0:
        return 0
    qmax = 2 ** (bits - 1) - 1
    s = math.floor(math.log2(qmax / amax))
    while math.ldexp(amax, s) > qmax:
        s -= 1
    while math.ldexp(amax, s + 1) <= qmax:
        s += 1
    return min(s, max_exponent)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def quantise_cpu(x: torch.Tensor, bits: int, rounding: str, *, axis: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 noise: torch.Tensor | None = None, want_mantissa: bool = True,
                 want_values: bool = False, out: torch.Tensor | None = None,
                 sums: torch.Tensor | None = None):
    """Returns ``(m or None, s, q or None, nonfinite)`` like :func:`quantise_triton`
    (``nonfinite`` is a Python bool here, or a tensor where the reference route ran).

    Dense tensors in any memory order (channels-last included) are processed in place in that
    order and the outputs keep it. ``out`` (a float32 tensor laid out like ``x``, which may be
    ``x`` itself) receives the values. ``sums`` (int64, ``cols`` values, for a dense ``x``
    whose memory holds rows of ``cols``) receives the exact column sums of the mantissas from
    the same pass (a bias gradient); it is written only where ``nonfinite`` is ``False``."""
    lib = _library()
    if (lib is None or axis is not None or x.dtype != torch.float32 or x.numel() == 0
            or x.device.type != "cpu"):
        return _via_reference(x, bits, rounding, axis, _seeded(generator, seed), noise, want_mantissa, want_values)
    xc = x if is_dense(x) else x.contiguous()
    n = xc.numel()
    threads = torch.get_num_threads()
    in_place = want_values and out is xc
    guess = _hinted_absmax(xc) if xc is x and not in_place and _recorded_absmax(xc) is None else None
    top = _absmax_bits(lib, xc, threads) if guess is None else guess
    if top >= 0x7F800000:  # NaN or inf present: the masked reference handles them
        return _via_reference(x, bits, rounding, axis, _seeded(generator, seed), noise, want_mantissa, want_values)
    s = _exponent_of(top, bits)
    if rounding == "stochastic" and noise is None and seed is None:
        seed = int(torch.randint(0, 2**62, (), generator=generator))
    noise = None if noise is None or rounding == "nearest" else noise.float().contiguous()
    m = torch.empty_like(xc, dtype=mantissa_dtype(bits)) if want_mantissa else None
    q = (out if out is not None and out.stride() == xc.stride() else torch.empty_like(xc)) if want_values else None
    cols = 0 if sums is None else sums.numel()
    if sums is not None and (xc is not x or sums.dtype != torch.int64 or not sums.is_contiguous()
                             or n % max(cols, 1) != 0 or bits > 16):
        raise ValueError(f"column sums need a dense x holding rows of {cols} values, an int64 output "
                         f"and at most 16 bits (got {bits})")
    scratch = None if sums is None else torch.empty(threads * cols * 3 // 2 + 1, dtype=torch.int64)

    def run(s, gather):
        h, l = s // 2, s - s // 2
        getattr(lib, _FN[mantissa_dtype(bits)])(
            xc.data_ptr(), n, math.ldexp(1.0, h), math.ldexp(1.0, l), math.ldexp(1.0, -h),
            math.ldexp(1.0, -l), _FMAX, int(rounding == "stochastic"), (seed or 0) & (2**64 - 1),
            _ptr(noise), _ptr(m), _ptr(q), cols, _ptr(sums), _ptr(scratch), threads,
            ctypes.addressof(gather) if gather is not None else None, float(2 ** (bits - 1) - 1))

    if guess is None:
        run(s, None)
    else:  # one pass on the guessed exponent, gathering the true absmax; again where it differs
        found = ctypes.c_uint32(0)
        run(s, found)
        if found.value >= 0x7F800000:
            return _via_reference(x, bits, rounding, axis, _seeded(generator, seed), noise, want_mantissa, want_values)
        true_s = _exponent_of(found.value, bits)
        if true_s != s:
            s = true_s
            run(s, None)
    if q is xc:  # overwritten in place by the kernel (no version bump): a recorded absmax no longer holds
        forget_absmax(xc)
    return m, torch.scalar_tensor(s, dtype=torch.int32), q, False  # (3x faster than torch.tensor)


def quantise_many_in_place(tensors: list, bits: int, rounding: str, seeds: list) -> list[int]:
    """Quantises float32 CPU tensors in place to ``bits`` (values only), each with its own
    exponent and its own ``seeds[i]``, in one C call: each ends up holding what
    ``quantise_cpu(t, bits, rounding, seed=seeds[i], want_mantissa=False, want_values=True,
    out=t)`` writes, without a Python round trip per tensor (an optimiser's gradients: 65 on
    ResNet-20, hundreds on a transformer). Returns the indices it left untouched, for the
    per-tensor route: tensors that are not dense float32 CPU ones or that hold a NaN or inf."""
    lib = _library()
    if lib is None or rounding not in ("nearest", "stochastic") or not 2 <= bits <= 24:
        return list(range(len(tensors)))
    picked = [i for i, t in enumerate(tensors) if t.dtype == torch.float32 and t.device.type == "cpu"
              and t.numel() and is_dense(t)]
    chosen = set(picked)
    left = [i for i in range(len(tensors)) if i not in chosen]
    if not picked:
        return left
    count = len(picked)
    ptrs = (ctypes.c_int64 * count)(*(tensors[i].data_ptr() for i in picked))
    sizes = (ctypes.c_int64 * count)(*(tensors[i].numel() for i in picked))
    draws = (ctypes.c_uint64 * count)(*((seeds[i] or 0) & (2**64 - 1) for i in picked))
    exps = (ctypes.c_int32 * count)()
    lib.quantise_values_many(ptrs, sizes, draws, count, bits, MAX_EXPONENT[torch.float32],
                             int(rounding == "stochastic"), torch.get_num_threads(), exps)
    for k, i in enumerate(picked):
        t = tensors[i]
        if exps[k] == -(2**31):  # NaN or inf present: untouched
            left.append(i)
        else:
            forget_absmax(t)  # written through its pointer, no version bump
    return sorted(left)


def _exponent_of(top: int, bits: int) -> int:
    """The exponent (SPEC section 1) for a tensor whose ``absmax_bits`` are ``top``."""
    return host_exponent(struct.unpack("<f", struct.pack("<I", top))[0], bits, MAX_EXPONENT[torch.float32])


def dequantise_cpu(m: torch.Tensor, e: int) -> torch.Tensor | None:
    """float32 ``m * 2**e`` in one pass for a dense int8/int16/int32/int64 CPU tensor (layout
    kept; int32 and int64 values round to float32 as torch's conversion rounds them); ``None`` where the C
    kernel does not apply. Casting and scaling with torch ops costs several times more on
    these dtypes (3-4x on a 2M-value int32 accumulator)."""
    lib = _library()
    if (lib is None or m.dtype not in _DEQ or m.device.type != "cpu" or not -126 <= e <= 126
            or not is_dense(m)):
        return None
    out = torch.empty_like(m, dtype=torch.float32)
    getattr(lib, _DEQ[m.dtype])(m.data_ptr(), m.numel(), math.ldexp(1.0, e), out.data_ptr(),
                                torch.get_num_threads())
    return out


def _seeded(generator, seed):
    """The reference route draws from a generator: one seeded with ``seed`` when given."""
    return generator if seed is None else torch.Generator().manual_seed(seed & (2**63 - 1))


def _via_reference(x, bits, rounding, axis, generator, noise, want_mantissa, want_values):
    m, s, finite = quantise_reference(x, bits, rounding, axis=axis, generator=generator, noise=noise)
    q = None
    if want_values:
        q = torch.where(finite, dequantise_reference(m, s, x.dtype, axis), x)
    dims = [d for d in range(x.dim()) if d != axis] if axis is not None else None
    nonfinite = ~finite.all() if axis is None else ~finite.all(dim=dims) if dims else ~finite
    return (m.to(mantissa_dtype(bits)) if want_mantissa else None), s, q, nonfinite


def requantise_accumulator(acc: torch.Tensor, e: int, bits: int, rounding: str, want_mantissa: bool = False,
                           in_place: bool = False, absmax: int | None = None):
    """``fake_quantise(acc.float() * 2**e)`` in one fused pass over an int32 GEMM accumulator
    (dense, any memory order); the same values and draws as converting, scaling and quantising
    separately. Returns ``(q, m, s)``: the values, with ``want_mantissa`` the mantissas written
    by the same pass (else ``None``), and the exponent; ``None`` where the C kernel does not
    apply (then take the separate passes). ``in_place``: ``q`` overwrites ``acc``'s memory
    (each block is read before it is written), which spares writing a fresh 4-byte tensor.
    ``absmax``: ``max |acc|`` where the producer gathered it (the scan is then skipped)."""
    lib = _library()
    if lib is None or acc.dtype != torch.int32 or not is_dense(acc) or not -126 <= e <= 126 or acc.numel() == 0:
        return None
    n, threads = acc.numel(), torch.get_num_threads()
    top = lib.absmax_i32(acc.data_ptr(), n, threads) if absmax is None else absmax
    top = ctypes.c_float(top).value  # |acc| as the float32 conversion rounds it
    s = host_exponent(math.ldexp(top, e), bits, MAX_EXPONENT[torch.float32])
    if not -126 <= e + s <= 126 or (want_mantissa and bits > 16):
        return None
    seed = int(torch.randint(0, 2**62, ())) if rounding == "stochastic" else 0
    h = s // 2
    q = acc.view(torch.float32) if in_place else torch.empty_like(acc, dtype=torch.float32)
    m = torch.empty_like(acc, dtype=mantissa_dtype(bits)) if want_mantissa else None
    lib.requantise_i32(acc.data_ptr(), n, math.ldexp(1.0, e + s), 1.0, math.ldexp(1.0, -h),
                       math.ldexp(1.0, h - s), _FMAX, int(rounding == "stochastic"), seed,
                       q.data_ptr(), _ptr(m), 0 if m is None else m.element_size(), threads)
    return q, m, torch.scalar_tensor(s, dtype=torch.int32)
