"""Kernel routes: how a quantised product of mantissas ``(m_a, s_a) x (m_b, s_b)`` is computed.

- ``emulate``: dequantise both operands and run the FP32 op (the paper's set-up; FP32
  accumulation, exact while partial sums stay below 2**24).
- ``aten`` (CPU): up to 8 bits, exact int8 products through ``torch._int_mm`` (see
  ``kernels/gemm_cpu``), scaled once by ``2**-(s_a + s_b)``; 2-d convolutions forward and
  grad-input through oneDNN's int8 convolution (``kernels/conv_onednn``, no im2col buffer) on
  CPUs where it is exact (VNNI or AMX; it saturates on AVX2-only ones); on AVX-512 VNNI CPUs
  without AMX, our ``vpdpbusd`` kernels (``kernels/vnni_cpu``: forward, grad-input and, up to 64
  channels, weight gradients) take layers below 64 channels, and wider ones where
  :func:`_vnni_cpu_kernel`'s measured rule picks them over oneDNN and im2col. On CPUs without int8
  dot products the 8-bit products run on our AVX2 kernel instead (``kernels/gemm_avx2``:
  ``vpmaddwd`` GEMM, implicit-GEMM convolutions), every level above 8 bits is ``aten_wide``,
  and ``exact=True`` takes the kernel's int16 products up to 12 bits.
  GEMMs at 9-14 bits take three int8 products (Karatsuba) with the passes around them fused
  (``kernels/scaled_mm_cpu``), exact and faster than FP32. Above 14 bits (four int8 products)
  and for 9-16 bit convolutions (three im2col GEMMs) the integer routes lose to FP32 on these
  CPUs, so ``aten`` (as ``aten_wide`` from :func:`for_level`) runs the FP32 op on the
  dequantised operands (rounded accumulation: the values of ``emulate``, as the FP16 route
  rounds on CUDA; scaling by a power of two commutes with FP32 rounding, so this equals the
  scaled FP32 product of the mantissas), except on AMX CPUs, whose tiles take 9-14 bit
  convolutions of 64+ channels as three int8 products (:func:`_amx_narrow`) and 15-16 bit ones
  of 64+ channels on maps large enough as four digit products (:func:`_amx_digits`), and on
  AVX-512 VNNI CPUs without AMX, which take 9-14 bit convolutions of 16k channels as one
  ``vpdpwssd`` product of the int16 mantissas (:func:`_vnni_wide`);
  ``exact=True`` (``aten_exact``) keeps them all on the integer kernels. Products without an
  integer kernel (grouped or 1-d/3-d convolutions, batched matmuls) run on the mantissas as
  floats, float32 where every partial sum is an integer below 2**24 and float64 otherwise, so
  they are exact too.
- ``triton`` (CUDA): Triton INT8 kernels up to 8 bits, FP16 kernels above (exact up to 12 bits,
  as in the paper); ``triton_exact`` keeps 9-16 bit products on integer kernels. 2-d
  convolutions run on implicit-GEMM kernels (``kernels/conv_triton``: int8, or FP16 at 9-16 bits);
  the exact 9-16 bit ones go through im2col and the split-int8 GEMMs.

Every function returns float32 values ``(a @ b) * 2**-(s_a + s_b)`` (or the op's equivalent).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from muppet_fx.kernels import (amx_cpu, amx_gemm, batch_norm_cpu, conv_onednn, gemm_avx2, gemm_cpu, scaled_mm_cpu,
                                vnni_cpu)
from muppet_fx.kernels.quantise import is_dense, scale_pow2, scale_triton, triton_path
from muppet_fx.kernels.quantise_cpu import carry_absmax, dequantise_cpu, requantise_accumulator
from muppet_fx import depth_taps
from muppet_fx.numerics import _triton_seed

__all__ = ["ROUTE_NAMES", "resolve_route", "for_level", "sum_dequantised", "dequantise", "linear_forward",
           "linear_grad_input", "linear_grad_weight", "linear_grads_on_values", "conv_forward", "conv_grad_input",
           "conv_grad_weight", "conv_grads_on_values", "conv_out_size", "on_values", "matmul_forward"]

ROUTE_NAMES = ("emulate", "aten", "aten_exact", "triton", "triton_exact")
TRITON = ("triton", "triton_exact")


def resolve_route(backend: str, device: torch.device, exact: bool = False) -> str:
    """``auto`` -> ``triton`` on CUDA, ``aten`` on CPU, ``emulate`` elsewhere; with ``exact``
    the 15-16 bit products stay on integer kernels too (``aten_exact``, ``triton_exact``)."""
    route = backend if backend != "auto" else {"cuda": "triton", "cpu": "aten"}.get(device.type, "emulate")
    if route == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got device {device}; use backend='auto' "
                         "(or 'aten' on the CPU), or set TRITON_INTERPRET=1 before triton is imported "
                         "to run the Triton kernels in its interpreter (slow)")
    return f"{route}_exact" if exact and route in ("triton", "aten") else route


def for_level(route: str, bits: int) -> str:
    """The route for one product at ``bits``: ``aten`` above 14 bits is ``aten_wide``
    (FP32 on the dequantised operands, see the module notes), and so at the levels where this
    CPU's integer products lose to FP32 (:func:`gemm_cpu.integer_products_fast`: above 8 bits on
    CPUs without int8 dot products, where the 8-bit products run on the AVX2 kernel). There
    ``aten_exact`` above 12 bits is ``aten_exact_wide``: the mantissas summed as exact floats,
    faster than split integer products; up to 12 bits the AVX2 kernel's single product is exact."""
    if route == "aten_exact" and bits > 12 and _avx2_narrow():
        return "aten_exact_wide"
    return "aten_wide" if route == "aten" and (bits > 14 or not gemm_cpu.integer_products_fast(bits)) else route


def on_values(route: str, bits: int, conv: bool, x: Tensor | None = None, w: Tensor | None = None) -> bool:
    """Whether a layer at ``bits`` computes its products in FP32 on the dequantised operands
    (``emulate``; on ``aten``, 9-16 bit convolutions and 15-16 bit GEMMs, except 9-14 bit
    convolutions of an input ``x`` the AMX or VNNI kernels take, see :func:`_amx_narrow` and
    :func:`_vnni_wide`, 15-16 bit ones
    (:func:`_amx_digits`), and linear layers of a 2-d input ``x`` and weight ``w`` whose GEMM
    the AMX or VNNI digit products take, :func:`_wide_on_tiles`, :func:`_wide_on_vnni`): its
    quantisers can then write those values in the pass that writes the mantissas. ``route`` as
    :func:`for_level` returns it."""
    if conv and x is not None and (route == "aten" and 8 < bits <= 14 and (_amx_narrow(x) or _vnni_wide(x))
                                   or route == "aten_wide" and 14 < bits <= 16 and _amx_digits(x)):
        return False
    if not conv and route == "aten_wide" and 14 < bits <= 16 and x is not None and w is not None \
            and (_wide_on_tiles(x, w) or _wide_on_vnni(x, w)):
        return False
    return route == "emulate" or route == "aten_wide" and bits <= 16 or 8 < bits <= 16 and conv and route == "aten"


def _amx_narrow(a: Tensor) -> bool:
    """Whether a 9-14 bit convolution whose activation operand (input, or output gradient) is
    ``a`` runs as three exact int8 products rather than in FP32: on AMX CPUs, for 2-d maps of
    at least ``AMX_NARROW_CHANNELS`` channels, a multiple of 16 (channels-last ones run on the
    AMX kernels, others through im2col). ResNet-18's 12-bit step took 0.75x the time of FP32
    products there; ResNet-20's 16-32 channel layers lost (the splits, the combination and
    three weight gradients cost more than FP32's products on them). The layout is left out of
    the test on purpose, so that forward and backward decide alike."""
    return (a.dim() == 4 and a.device.type == "cpu" and a.shape[1] % 16 == 0 and a.shape[1] >= AMX_NARROW_CHANNELS
            and amx_cpu.available())


AMX_NARROW_CHANNELS = 64


def _vnni_wide(a: Tensor) -> bool:
    """Whether a 9-14 bit convolution whose activation operand is ``a`` runs as exact int16
    products on the VNNI kernels (``kernels/vnni_cpu``: one ``vpdpwssd`` product each for the
    forward, grad-input and weight gradient) rather than in FP32 on the values: on AVX-512 VNNI
    CPUs without AMX, for 2-d maps with a multiple of 16 channels (the weight gradient's
    lanes). Training steps with every such convolution on them, against FP32 products of the
    values (AMD EPYC Zen 5, batch 128, same run): ResNet-20 at 12 bits 1.17x FP32 against
    1.04x, at 14 bits 1.11x against 1.03x; ResNet-18 1.46x against 1.27x and 1.18x against
    1.11x. The kernels decline what they do not cover (output channels not 16k, 14-bit rows
    too wide for one int32 run), and the split int8 products take it, exactly."""
    return (a.dim() == 4 and a.device.type == "cpu" and a.shape[1] % 16 == 0 and vnni_cpu.available()
            and not amx_cpu.available())


def _amx_digits(a: Tensor) -> bool:
    """Whether a 15-16 bit convolution whose activation operand is ``a`` runs as four exact int8
    products of digit planes (``gemm_cpu.conv_digits_scaled``) rather than in FP32: as
    :func:`_amx_narrow`, on maps at least ``amx_cpu.MIN_WIDTH`` wide with channels x width of
    at least ``AMX_DIGITS_SIZE``. Per layer at batch 128 (forward and backward with the
    quantisers, against FP32 products): 64 channels on 32x32 0.87x FP32 against 0.78-0.85x,
    128 on 16x16 1.04-1.11x against 0.89-0.94x, 256 on 8x8 1.10x against 1.00x; 64 on 8x8
    lost (0.69x against 0.75x), the split and sums costing more than its small products save;
    at 4x4 the AMX forward does not apply. Each product decides from its own activation
    operand (a strided layer's grad-input, or one whose output rows are too short for the
    tiles, runs in FP32 on the dequantised operands)."""
    return (_amx_narrow(a) and a.shape[-1] >= amx_cpu.MIN_WIDTH
            and a.shape[1] * a.shape[-1] >= AMX_DIGITS_SIZE)


AMX_DIGITS_SIZE = 1024


def _avx2_narrow() -> bool:
    """Whether exact 9-12 bit products run on the AVX2 kernel (CPUs without int8 dot products):
    one ``vpmaddwd`` product of the int16 mantissas (``kernels/gemm_avx2``). :func:`for_level`
    sends only ``exact=True`` products up to 12 bits there; wider mantissas make the kernel
    decline, and the split-int8 products take them."""
    return not gemm_cpu.fast_int8() and gemm_avx2.available()


def dequantise(m: Tensor, s: Tensor, axis: int | None = None) -> Tensor:
    """float32 ``m * 2**-s``; one pass (conversion and scale together) for a per-tensor
    exponent: a C pass on the CPU, a Triton kernel reading the exponent on CUDA."""
    if axis is None and s.numel() == 1 and triton_path(m) and is_dense(m):
        return scale_triton(m, s)  # one kernel reading the exponent, no device ops for the scale
    if axis is None and s.numel() == 1 and s.device.type == "cpu" and m.device.type == "cpu":
        e = -int(s)
        y = dequantise_cpu(m, e)
        if y is not None:
            return y
        if -126 <= e <= 126:
            return torch.mul(m, math.ldexp(1.0, e))
    return scale_pow2(m.float(), -s, axis)


def sum_dequantised(m: Tensor, s: Tensor, dims: list[int]) -> Tensor:
    """``sum(m * 2**-s)`` over ``dims`` as an exact integer sum, scaled once (bias gradients).

    On the CPU sums over every dimension but 1 take the batch norm's integer channel sums
    (``batch_norm_cpu.channel_sums``: 2.1 against torch's 31 ms on a 128x64x32x32 int16
    gradient, 0.26 against 0.62 ms on an int8 one); other int8 sums over all dimensions but one
    run as ``ones @ m`` on the int8 GEMM (torch's int64 reduction took 24 ms on a 131072 x 64
    gradient, the GEMM 1.2 ms)."""
    keep = [d for d in range(m.dim()) if d not in dims]
    total = batch_norm_cpu.channel_sums(m) if keep == [1] else None
    if (total is None and m.device.type == "cpu" and m.dtype == torch.int8 and len(keep) == 1 and m.numel() > 0
            and gemm_cpu.fast_int8()):
        rows = m.movedim(keep[0], -1).reshape(-1, m.shape[keep[0]])  # a view for channels-last gradients
        total = gemm_cpu.int_matmul(torch.ones(1, rows.shape[0], dtype=torch.int8), rows)[0]
    if total is None:
        narrow = m.dtype in (torch.int8, torch.int16) and m.numel() * 32767 < 2**31  # int32 cannot overflow
        total = m.sum(dims, dtype=torch.int32 if narrow else torch.int64)
    return scale_sums(total, s)


def scale_sums(total: Tensor, s: Tensor) -> Tensor:
    """float32 ``total * 2**-s`` of exact integer sums, rounded once."""
    return scale_pow2(total.double(), -s).float()


# ------------------------------------------------------------------------------ helpers
def _exponent(s_a: Tensor, s_b: Tensor, axis: int | None = None):
    """``-(s_a + s_b)``: a Python int for per-tensor exponents on the CPU (reading it costs no
    device sync), else an int64 tensor."""
    if axis is None and s_a.numel() == 1 and s_b.numel() == 1 and s_a.device.type == "cpu":
        return -(int(s_a) + int(s_b))
    return -(s_a.long() + s_b.long())


def _apply(acc: Tensor, e, bias: Tensor | None = None, axis: int | None = None) -> Tensor:
    """float32 ``acc * 2**e (+ bias)``, in one pass where ``2**e`` is a normal float32.
    ``bias`` (and a tensor ``e`` with ``axis``) runs along dimension 1."""
    if isinstance(e, int) and -126 <= e <= 126:
        scale = math.ldexp(1.0, e)
        y = dequantise_cpu(acc, e) if bias is None and acc.dtype in (torch.int32, torch.int64) \
            and acc.device.type == "cpu" else None
        if y is not None:  # one C pass
            return y
        if bias is None:
            y = torch.mul(acc, scale)
        elif acc.dim() == 2:
            y = torch.add(bias.float(), acc, alpha=scale)
        else:
            y = torch.mul(acc, scale).add_(_along1(bias, acc))
        return y if y.dtype == torch.float32 else y.float()
    acc = acc if acc.dtype in (torch.float32, torch.float64) else acc.float()
    y = scale_pow2(acc, torch.as_tensor(e, device=acc.device), axis).float()
    return y if bias is None else y + _along1(bias, y)


def _along1(v: Tensor, like: Tensor) -> Tensor:
    return v.float().view([-1 if d == 1 else 1 for d in range(like.dim())])


def _wide_on_tiles(a: Tensor, b: Tensor) -> bool:
    """Whether a 15-16 bit 2-d GEMM of ``a`` (``[M, K]``) with ``b`` (``[K, N]``, or ``[N, K]``
    for a linear layer's weight) runs as the AMX tiles' fused digit products, exact: 1.6-1.7x
    FP32's GEMM at 1024^3-2048^3, where the four separate int8 products and their combination
    took 0.72-0.78x (``benchmarks/NOTES.md``). Smaller GEMMs stay FP32 on the values."""
    if a.dim() != 2 or b.dim() != 2 or not amx_gemm.available():
        return False
    K = a.shape[-1]
    return amx_gemm.worth(1, a.numel() // max(K, 1), K, b.numel() // max(K, 1), digits=True)


def _wide_on_vnni(a: Tensor, b: Tensor) -> bool:
    """Whether a 15-16 bit 2-d GEMM (shapes as :func:`_wide_on_tiles`) runs as four exact int8
    digit products (``scaled_mm_cpu``) on AVX-512 VNNI CPUs without AMX: where every side is at
    least ``VNNI_WIDE_GEMM``. Against FP32's GEMM there (AMD EPYC Zen 5, 2 threads): 1.25-1.68x
    from 256x512x512 to 2048x512x2048, 1.6x at 1024^3 and 1.9x at 2048^3; 1.05x at
    8192x128x128 and 0.78x at 512x4096x64, which stay FP32 on the values."""
    if a.dim() != 2 or b.dim() != 2 or amx_gemm.available() or not vnni_cpu.available():
        return False  # measured on AVX-512 VNNI; AVX-VNNI-only (256-bit) CPUs keep the values
    K = a.shape[-1]
    return min(a.numel() // max(K, 1), K, b.numel() // max(K, 1)) >= VNNI_WIDE_GEMM


VNNI_WIDE_GEMM = 256


def _mode(route: str, a: Tensor, b: Tensor) -> str:
    """``emulate``, ``int`` (integer kernels), ``float`` (mantissas as exact floats),
    ``fp32`` (mantissas as FP32, rounded accumulation) or a Triton route."""
    if route == "emulate" or route in TRITON:
        return route
    ints = a.dtype in (torch.int8, torch.int16) and b.dtype in (torch.int8, torch.int16)
    if route == "aten_wide" and ints:
        return "int" if _wide_on_tiles(a, b) or _wide_on_vnni(a, b) else "fp32"
    if route == "aten_exact_wide" or route == "aten_exact" and not gemm_cpu.fast_int8() and not _avx2_narrow():
        return "float"  # exact float sums beat slow integer products
    return "int" if ints else "float"


def _conv_mode(route: str, a: Tensor, b: Tensor) -> str:
    """As :func:`_mode`; ``aten`` and ``aten_wide`` convolutions of int16 operands run in FP32
    (see the notes) unless the AMX or VNNI kernels take them (:func:`_amx_narrow` or
    :func:`_vnni_wide`, above 14 bits :func:`_amx_digits`, of the activation operand ``a``)."""
    if route in ("aten", "aten_wide") and (a.dtype == torch.int16 or b.dtype == torch.int16):
        take = (lambda t: _amx_narrow(t) or _vnni_wide(t)) if route == "aten" else _amx_digits
        return "int" if a.dtype == b.dtype == torch.int16 and take(a) else "fp32"
    return _mode(route, a, b)


def _exact_floats(route: str, mode: str) -> bool:
    """Whether the gradients of a convolution the integer kernels do not take (grouped, 1-d,
    3-d) run on the mantissas as floats wide enough to sum them exactly: on the exact routes
    (elsewhere FP32 products of the values; a depthwise grad-weight sums N*H*W products, which
    would mean float64 kernels) and for mantissas wider than int16."""
    return mode == "float" or route in ("aten_exact", "aten_exact_wide", "triton_exact")


def _scaled_int(a: Tensor, b: Tensor, e, bias: Tensor | None = None) -> Tensor:
    """float32 ``(a @ b) * 2**e (+ bias)`` on the integer kernels: the fused CPU kernel where it
    applies, else :func:`gemm_cpu.int_matmul` and a scaling pass."""
    if (a.dtype == torch.int16 or b.dtype == torch.int16) and _avx2_narrow():
        return _apply(gemm_cpu.int_matmul(a, b), e, bias)  # the AVX2 kernel's one product up to 12 bits
    y = scaled_mm_cpu.scaled_int_matmul(a, b, e, bias) if isinstance(e, int) else None
    return y if y is not None else _apply(gemm_cpu.int_matmul(a, b), e, bias)


def _float_dtype(mode: str, a: Tensor, b: Tensor, k: int) -> torch.dtype:
    bound = k
    for m in (a, b):
        bound *= {torch.int8: 127, torch.int16: 32767}.get(m.dtype, 2**23)
    return torch.float32 if bound < 2**24 else torch.float64


def _triton():
    from muppet_fx.kernels import gemm_triton

    return gemm_triton


# -------------------------------------------------------------------------------- linear
def linear_forward(route, x_m, x_s, w_m, w_s, w_axis, bias,
                   quantise_output: tuple[int, str] | None = None, x_v=None, w_v=None):
    """``x @ w.T + bias`` for 2-d ``x_m [M, K]``, ``w_m [N, K]`` (per-tensor or per-row ``w_s``).
    Returns ``(y, quantised)`` like :func:`conv_forward`: the Triton GEMM quantises the output
    in its epilogue when asked. ``x_v``, ``w_v`` as in :func:`conv_forward`."""
    mode = _mode(route, x_m, w_m)
    if mode in ("emulate", "fp32"):  # fp32: the same values, scaled before the product
        x_v = dequantise(x_m, x_s) if x_v is None else x_v
        return F.linear(x_v, dequantise(w_m, w_s, w_axis) if w_v is None else w_v, bias), False
    if mode in TRITON:  # values only: a batch norm after it quantises them again for its mantissas
        q = _with_seed(quantise_output and quantise_output[:2], x_m.device)
        return _triton().scaled_mm(x_m, x_s, w_m.t(), w_s, bias, b_axis=w_axis,
                                   exact=mode == "triton_exact", quantise_output=q), q is not None
    if mode == "int" and w_axis is None:
        return _scaled_int(x_m, w_m.t(), _exponent(x_s, w_s), bias), False
    if mode == "int":
        acc = gemm_cpu.int_matmul(x_m, w_m.t())
    else:
        dt = _float_dtype(mode, x_m, w_m, x_m.shape[1])
        acc = x_m.to(dt) @ w_m.to(dt).t()
    if w_axis is None:
        return _apply(acc, _exponent(x_s, w_s), bias), False
    return _apply(acc, _exponent(x_s, w_s, axis=1), bias, axis=1), False


def _with_seed(quantise_output, device: torch.device):
    """``(bits, rounding[, parts])`` -> ``(bits, rounding, seed[, parts])``, the seed drawn on ``device``
    by torch's generator as the separate output quantiser draws it (same stream, same draws)."""
    if quantise_output is None:
        return None
    bits, rounding, *parts = quantise_output
    return bits, rounding, _triton_seed(None, None, rounding, device), *parts


def linear_grad_input(route, g_m, g_s, w_m, w_s, w_axis):
    """``g @ w`` for ``g_m [M, N]``, ``w_m [N, K]``."""
    mode = _mode(route, g_m, w_m)
    if w_axis is not None or mode in ("emulate", "fp32"):  # a per-row weight scale does not factor out
        return dequantise(g_m, g_s) @ dequantise(w_m, w_s, w_axis)
    if mode in TRITON:
        return _triton().scaled_mm(g_m, g_s, w_m, w_s, exact=mode == "triton_exact")
    return matmul_forward(route, g_m, g_s, w_m, w_s)


def linear_grad_weight(route, g_m, g_s, x_m, x_s):
    """``g.T @ x`` for ``g_m [M, N]``, ``x_m [M, K]``."""
    return matmul_forward(route, g_m.t(), g_s, x_m, x_s)


def linear_grads_on_values(g, x_m, x_s, w_m, w_s, w_axis, need_x: bool, need_w: bool):
    """``(g @ w, g.T @ x)`` of a linear layer whose products run in FP32 (``on_values``), from
    the dequantised gradient ``g [M, N]``; ``None`` where not asked for."""
    gx = g @ dequantise(w_m, w_s, w_axis) if need_x else None
    return gx, (g.t() @ dequantise(x_m, x_s) if need_w else None)


# --------------------------------------------------------------------------- convolution
def _int_conv(mode, x_m, groups, w_axis) -> bool:
    return mode in ("int", *TRITON) and x_m.dim() == 4 and groups == 1 and w_axis is None


def _both_int8(a: Tensor, b: Tensor) -> bool:
    return a.dtype == torch.int8 and b.dtype == torch.int8


def _triton_conv(mode: str, a: Tensor, b: Tensor) -> bool:
    """The implicit-GEMM kernels take int8 operands (exact), and int16 ones in their FP16 mode on
    ``triton`` (``triton_exact`` keeps those on the split-int8 GEMMs)."""
    fp16 = mode == "triton" and a.dtype == torch.int16 and b.dtype == torch.int16
    return mode in TRITON and (_both_int8(a, b) or fp16)


def _conv_triton():
    from muppet_fx.kernels import conv_triton  # implicit GEMM: no im2col buffer

    return conv_triton


def _int8_kernel(mode):
    """The int8 GEMM under the integer convolutions: ``torch._int_mm`` (None) or Triton's."""
    return _triton().int_mm if mode in TRITON else None


def conv_forward(route, x_m, x_s, w_m, w_s, w_axis, bias, stride, padding, dilation, groups,
                 quantise_output: tuple[int, str] | None = None, x_v=None, w_v=None):
    """Returns ``(y, quantised)``: with ``quantise_output=(bits, rounding)`` the integer route
    may quantise the output straight from its accumulator (``quantised`` is then True; with
    ``(bits, rounding, True)`` the output's ``(mantissas, exponent)`` from the same pass, and with
    ``(bits, rounding, 2)`` the Triton route may leave the values unquantised, as
    ``ops._fq_parts`` describes).
    ``x_v``, ``w_v``: the operands' dequantised values where the quantiser wrote them."""
    mode = _conv_mode(route, x_m, w_m)
    short = route == "aten_wide" and conv_out_size(x_m, w_m, stride, padding, dilation)[-1] < amx_cpu.MIN_WIDTH
    if mode == "int" and short:  # rows too short for the digit products' tiles: not the generic split GEMMs
        mode = "fp32"
    if mode in ("emulate", "fp32") or (mode == "triton" and not _int_conv(mode, x_m, groups, w_axis)):
        x_v = dequantise(x_m, x_s) if x_v is None else x_v
        w_v = dequantise(w_m, w_s, w_axis) if w_v is None else w_v
        return torch.convolution(x_v, w_v, bias,
                                 stride, padding, dilation, False, [0] * len(stride), groups), False
    if mode == "int" and depth_taps.applies(x_m, w_m, groups, w_axis) and isinstance(e := _exponent(x_s, w_s), int):
        y = depth_taps.forward(
            lambda x, xs, w, ws, s, p, d: conv_forward(route, x, xs, w, ws, None, None, s, p, d, 1)[0],
            x_m, x_s, w_m, w_s, e, bias, stride, padding, dilation)
        if y is not None:
            return y, False
    if _int_conv(mode, x_m, groups, w_axis) and _triton_conv(mode, x_m, w_m):
        b = None if bias is None else bias.detach().float().contiguous()  # dequantised and biased in the epilogue
        q = _with_seed(quantise_output, x_m.device)
        y = _conv_triton().conv2d_int(x_m, w_m, stride, padding, dilation, (x_s, w_s), b, q)
        return (y[0], y[1:]) if isinstance(y, tuple) else (y, q is not None)
    if _int_conv(mode, x_m, groups, w_axis):
        e = _exponent(x_s, w_s)
        out_size = conv_out_size(x_m, w_m, stride, padding, dilation)
        positions = math.prod(out_size)
        kernel = _vnni_cpu_kernel(x_m, w_m, positions, any(s != 1 for s in stride), grad_input=False)
        if kernel in ("vnni", None) and _use_vnni(mode, x_m, w_m, groups, e):
            y = vnni_cpu.conv2d(x_m, w_m, e, stride, padding, dilation)
            if y is not None:
                return (y if bias is None else y.add_(_along1(bias, y))), False
        if kernel in ("onednn", None) and _use_onednn(mode, x_m, w_m, groups, e, x_m.shape[0] * positions,
                                                      out_size[-1]):
            y = conv_onednn.conv2d(x_m, w_m, e, stride, padding, dilation)
            return (y if bias is None else y.add_(_along1(bias, y))), False
        if x_m.dtype == torch.int16 and isinstance(e, int) and not _avx2_narrow():  # three or four int8 products
            y = _int16_conv_scaled(x_m, w_m, stride, padding, dilation, e, bias, wide=route == "aten_wide")
            if y is not None:
                return y, False
        fuse = quantise_output is not None and bias is None and isinstance(e, int) and x_m.device.type == "cpu"
        amx = amx_cpu.conv_forward(x_m, w_m, stride, padding, dilation, reuse=False, with_absmax=True,
                                   scale_exp=None if fuse or not isinstance(e, int) else e) if mode == "int" else None
        if amx is not None and amx[0].is_floating_point():  # scaled as the tiles were stored
            return (amx[0] if bias is None else amx[0].add_(_along1(bias, amx[0]))), False
        acc, top = amx if amx is not None else (None, None)  # an AMX result is a tensor of its own
        if acc is None:
            acc = gemm_cpu.conv_forward(x_m, w_m, stride, padding, dilation, mm=_int8_kernel(mode))
        if fuse:
            bits, rounding, *parts = quantise_output
            got = requantise_accumulator(acc, e, bits, rounding, want_mantissa=bool(parts and parts[0]),
                                         in_place=top is not None, absmax=top)
            if got is not None:
                return got[0], (got[1:] if got[1] is not None else True)
    else:
        dt = _float_dtype(mode, x_m, w_m, w_m[0].numel())
        if dt == torch.float64 and not _exact_floats(route, mode):
            # as the gradients: FP32 products of the values where float32 sums of the mantissas
            # could round (ATen's float64 convolution of a 3-d map took 7x FP32's time)
            x_v = dequantise(x_m, x_s) if x_v is None else x_v
            w_v = dequantise(w_m, w_s, w_axis) if w_v is None else w_v
            return torch.convolution(x_v, w_v, bias, stride, padding, dilation, False, [0] * len(stride),
                                     groups), False
        acc = torch.convolution(x_m.to(dt), w_m.to(dt), None, stride, padding, dilation, False,
                                [0] * len(stride), groups)
    if w_axis is None:
        return _apply(acc, _exponent(x_s, w_s), bias), False
    return _apply(acc, _exponent(x_s, w_s, axis=1), bias, axis=1), False


def _use_onednn(mode: str, a: Tensor, w_m: Tensor, groups: int, e, rows: int, width: int) -> bool:
    """Whether an integer convolution with ``rows`` output positions, ``width`` to a row,
    takes oneDNN's int8 kernel: where it applies and pays off (``conv_onednn.pays_off``), and
    the AMX kernel (1.0-1.9x faster than oneDNN's on ResNet's layers) does not take it."""
    return (mode == "int" and conv_onednn.supports(a, w_m, groups, e) and conv_onednn.pays_off(rows)
            and not amx_cpu.conv_applies(a, w_m, width))


def _vnni_cpu_kernel(a: Tensor, w: Tensor, positions: int, strided: bool, grad_input: bool) -> str | None:
    """Which kernel an int8 convolution of ``a`` (64+ channels) by ``w`` with ``positions``
    output positions per image takes on AVX-512 VNNI CPUs without AMX: ``"vnni"``
    (``kernels/vnni_cpu``), ``"onednn"`` or ``"gemm"`` (im2col + ``torch._int_mm``); ``None``
    where this choice does not apply (other CPUs and dtypes, fewer channels: the VNNI kernel
    where it applies). For a grad-input, ``positions`` are the input's and ``strided`` the
    forward's stride (its phases are written in place by the VNNI kernel).

    From the route functions on ResNet-18's layers (``benchmarks/routes.py``; AMD EPYC Zen 5, 2
    threads, batch 128, ms for vnni / oneDNN / gemm, two runs): maps of at most 64 positions
    on the GEMM from 128 channels (forward: 4.1-4.3 / 4.6-5.2 / 3.5-3.9 at 128->256 3x3/2, 9.1-9.7
    / 6.4-12.1 / 6.2-7.0 at 512 channels on 4x4) and grad-inputs from 256 (6.3-7.3 / 6.1-6.5 /
    5.8-6.0 for 256->512 3x3/2, 10.1-10.3 / 7.4-13.2 / 7.3-7.6 on 4x4); other strided layers on
    the VNNI kernel, grad-input 5.2-5.6 / 8.7-12.6 / 9.3-11.9 (64->128, 3x3/2 on 32x32), except
    1x1/2 forwards, a subsample and one GEMM (1.5 / 1.8-1.9 / 1.4-1.6); stride-1 3x3 maps over
    256 positions on oneDNN: 7.3-7.6 / 6.4-7.1 / 12.3-16.4."""
    if (a.dtype != torch.int8 or a.dim() != 4 or a.shape[1] < 64 or w.dim() != 4 or amx_cpu.available()
            or not vnni_cpu.available()):
        return None
    pointwise = tuple(w.shape[2:]) == (1, 1)
    if positions <= 64 and a.shape[1] >= (256 if grad_input else 128):
        return "gemm"
    if strided:
        return "gemm" if pointwise and not grad_input else "vnni"
    return "onednn" if positions > 256 and not pointwise else "vnni"


def _use_vnni(mode: str, a: Tensor, w: Tensor, groups: int, e) -> bool:
    """Whether an integer convolution of ``a`` by ``w`` can take the AVX-512 VNNI kernel (CPUs
    with int8 dot products but no AMX): int8 ones of fewer than 64 channels (1.1-1.3x oneDNN's
    int8 convolution on ResNet-20's layers; :func:`_vnni_cpu_kernel` picks for wider ones) and
    int16 ones (9-14 bit convolutions, see :func:`_vnni_wide`, and the exact routes' 15-16 bit
    ones), in one product where the split int8 ones took three or four."""
    return (mode == "int" and groups == 1 and isinstance(e, int) and vnni_cpu.conv_applies(a, w)
            and not amx_cpu.available())


def conv_out_size(x: Tensor, w: Tensor, stride, padding, dilation) -> list[int]:
    """Spatial size of ``conv(x, w)``."""
    return [gemm_cpu._out_size(n, k, s, p, d) for n, k, s, p, d in
            zip(x.shape[2:], w.shape[2:], stride, padding, dilation)]


def _placeholder(g: Tensor, shape) -> Tensor:
    """The input stand-in of ``convolution_backward``: its layout picks grad-input's, which
    should be channels-last like every activation between these layers."""
    if len(shape) == 4:  # allocated channels-last (not copied to it: that copy cost 2-12 ms a layer)
        return torch.empty(shape, dtype=g.dtype, device=g.device, memory_format=torch.channels_last)
    return g.new_empty(shape)


def conv_grads_on_values(g, x_m, x_s, w_m, w_s, w_axis, stride, padding, dilation, groups,
                         need_x: bool, need_w: bool, output_padding=None):
    """Grad-input and grad-weight of a convolution (transposed where ``output_padding`` is
    given) whose products run in FP32 (``on_values``), from the dequantised gradient ``g``, in
    one ``convolution_backward`` call: each operand dequantised once, and only where its
    product is asked for."""
    x = dequantise(x_m, x_s) if need_w else _placeholder(g, x_m.shape)
    w = dequantise(w_m, w_s, w_axis) if need_x else g.new_empty(w_m.shape)
    transposed = output_padding is not None
    gx, gw, _ = torch.ops.aten.convolution_backward(
        g, x, w, None, stride, padding, dilation, transposed, output_padding if transposed else [0] * len(stride),
        groups, [need_x, need_w, False])
    return gx, gw


def _fresh_int_conv(stride, padding, dilation):
    """``conv(a8, b8, pad=0)``: the exact int32 convolution of int8 mantissas in a channels-last
    tensor of its own (AMX, else im2col and a copy), or ``None`` (an int64 result); ``pad``, the
    value ``a`` takes outside the image, only on AMX."""
    def conv(a, b, pad=0):
        y = amx_cpu.conv_forward(a, b, stride, padding, dilation, reuse=False, pad=pad)
        if y is None and pad == 0:
            y = gemm_cpu.conv_forward(a, b, stride, padding, dilation, amx=False)
            y = y.clone(memory_format=torch.channels_last) if y.dtype == torch.int32 else None
        return y
    return conv


def _int16_conv_scaled(x16: Tensor, w16: Tensor, stride, padding, dilation, e: int, bias=None, wide=False):
    """float32 ``conv(x16, w16) * 2**e (+ bias)`` on int8 products: three up to 14 bits
    (Karatsuba), else four digit products (15-16 bits, AMX only); ``None`` where neither applies.
    ``wide``: the level is above 14 bits, so the three-product split is not tried."""
    conv = _fresh_int_conv(stride, padding, dilation)
    y = None if wide else gemm_cpu.conv_karatsuba_scaled(conv, x16, w16, e, bias, (stride, padding, dilation))
    return y if y is not None else gemm_cpu.conv_digits_scaled(conv, x16, w16, stride, padding, dilation, e, bias)


def _scaled_conv(e: int, wide: bool = False):
    """The stride-1 convolution of grad-input, scaled by ``2**e``, as a tensor of its own (it
    leaves as the input gradient): int8 on the AMX kernel, scaled as its tiles are stored;
    int16 as three (up to 14 bits) or four int8 products combined as the tiles are stored."""
    def conv(x, w, s, p, d):
        if x.dtype == torch.int16:
            y = _int16_conv_scaled(x, w, s, p, d, e, wide=wide)
        else:
            y = amx_cpu.conv_forward(x, w, s, p, d, reuse=False, scale_exp=e)
        return y if y is not None else _apply(gemm_cpu.conv_forward(x, w, s, p, d, amx=False), e)
    return conv


def _placed_conv(e: int):
    """``place`` of ``gemm_cpu.conv_grad_input``: one phase of a strided grad-input, scaled by
    ``2**e`` and stored in place by the AMX kernels (int8; int16 up to 14 bits as three products,
    the gradient split into its planes once for all phases)."""
    split = {}

    def place(g, w, p, d, origin, dst):
        if g.dtype != torch.int16 or w.dtype != torch.int16:
            return amx_cpu.conv_forward(g, w, 1, p, d, scale_exp=e, out=dst, origin=origin) is not None
        if "g" not in split:
            split["g"] = gemm_cpu.karatsuba_planes(g, "kg")
        planes = split["g"], gemm_cpu.karatsuba_planes(w, "kw")
        return None not in planes and amx_cpu.conv_forward_karatsuba(*planes, 1, p, d, e, out=dst,
                                                                     origin=origin) is not None
    return place


def _vnni_conv(e: int, mode: str):
    """``conv`` of ``gemm_cpu.conv_grad_input`` on the VNNI kernel, scaled by ``2**e``; where it
    declines, the integer convolution (whose int32 result the caller scales)."""
    def conv(x, w, s, p, d):
        y = vnni_cpu.conv2d(x, w, e, s, p, d)
        return y if y is not None else gemm_cpu.conv_forward(x, w, s, p, d, mm=_int8_kernel(mode))
    return conv


def _vnni_placed(e: int):
    """``place`` of ``gemm_cpu.conv_grad_input``: one phase of a strided grad-input, scaled by
    ``2**e`` and stored in place by the VNNI kernel (False where it declines)."""
    return lambda g, w, p, d, origin, dst: vnni_cpu.conv2d(g, w, e, 1, p, d, out=dst, origin=origin) is not None


def conv_grad_input(route, g_m, g_s, w_m, w_s, w_axis, x_shape, stride, padding, dilation, groups):
    mode = _conv_mode(route, g_m, w_m)
    strided, positions = any(s != 1 for s in stride), math.prod(x_shape[2:])
    if mode == "int" and route == "aten_wide" and (strided or x_shape[-1] < amx_cpu.MIN_WIDTH):
        mode = "fp32"  # strided phases, or rows too short for the tiles: not the generic split GEMMs
    if mode == "int" and depth_taps.applies(g_m, w_m, groups, w_axis) and isinstance(e := _exponent(g_s, w_s), int):
        gx = depth_taps.grad_input(
            lambda g, gs, w, ws, shape, s, p, d: conv_grad_input(route, g, gs, w, ws, None, shape, s, p, d, 1),
            g_m, g_s, w_m, w_s, e, x_shape, stride, padding, dilation)
        if gx is not None:
            return gx
    if _int_conv(mode, g_m, groups, w_axis) and _triton_conv(mode, g_m, w_m):
        return _conv_triton().conv2d_grad_input_int(g_m, w_m, x_shape, stride, padding, dilation, (g_s, w_s))
    if _int_conv(mode, g_m, groups, w_axis):
        e = _exponent(g_s, w_s)
        conv = place = None
        w_t = w_m.transpose(0, 1)  # the stride-1 convolution's weight, as far as amx_cpu's test goes
        kernel = _vnni_cpu_kernel(g_m, w_t, positions, strided, grad_input=True)
        if isinstance(e, int) and -126 <= e <= 126 and (amx_cpu.conv_applies(g_m, w_t, x_shape[-1])
                                                          or g_m.dtype == torch.int16 and _amx_narrow(g_m)):
            conv = _scaled_conv(e, wide=route == "aten_wide")
            place = _placed_conv(e) if route != "aten_wide" else None
        elif kernel in ("vnni", None) and _use_vnni(mode, g_m, w_t, groups, e):
            conv, place = _vnni_conv(e, mode), _vnni_placed(e)
        elif kernel in ("onednn", None) and _use_onednn(mode, g_m, w_t, groups, e, x_shape[0] * positions,
                                                        x_shape[-1]):
            conv = lambda x, w, s, p, d: conv_onednn.conv2d(x, w, e, s, p, d)  # noqa: E731
        gx = gemm_cpu.conv_grad_input(g_m, w_m, x_shape, stride, padding, dilation, mm=_int8_kernel(mode),
                                      conv=conv, place=place)
        return gx if gx.is_floating_point() else _apply(gx, e)
    on_mantissas = _exact_floats(route, mode) and w_axis is None  # exact float sums of the integers
    if on_mantissas:
        dt = _float_dtype(mode, g_m, w_m, w_m.shape[0] * w_m[0, 0].numel())
        g, w = g_m.to(dt), w_m.to(dt)
    else:
        g, w = dequantise(g_m, g_s), dequantise(w_m, w_s, w_axis)
    gx = torch.ops.aten.convolution_backward(g, _placeholder(g, x_shape), w, None, stride, padding,
                                             dilation, False, [0] * len(stride), groups,
                                             [True, False, False])[0]
    return _apply(gx, _exponent(g_s, w_s)) if on_mantissas else gx.float()


def conv_grad_weight(route, g_m, g_s, x_m, x_s, w_shape, stride, padding, dilation, groups):
    mode = _conv_mode(route, g_m, x_m)
    if mode == "int" and depth_taps.applies(x_m, g_m, groups, None):
        return depth_taps.grad_weight(
            lambda g, gs, x, xs, shape, s, p, d: conv_grad_weight(route, g, gs, x, xs, shape, s, p, d, 1),
            g_m, g_s, x_m, x_s, w_shape, stride, padding, dilation)
    if _int_conv(mode, x_m, groups, None) and _triton_conv(mode, g_m, x_m):
        return _conv_triton().conv2d_grad_weight_int(g_m, x_m, w_shape, stride, padding, dilation, scale=(g_s, x_s))
    if _int_conv(mode, x_m, groups, None):
        acc = None
        if route == "aten_wide":  # above 14 bits: straight to the digit products
            acc = gemm_cpu.conv_grad_weight_digits(g_m, x_m, w_shape, stride, padding, dilation)
        if acc is None:
            # the quantiser's mantissas stop at 2**(b-1) - 1: 127 at 8 bits
            acc = gemm_cpu.conv_grad_weight(g_m, x_m, w_shape, stride, padding, dilation, mm=_int8_kernel(mode),
                                            magnitude=127)
        return _apply(acc, _exponent(g_s, x_s))
    on_mantissas = _exact_floats(route, mode)
    if on_mantissas:
        dt = _float_dtype(mode, g_m, x_m, g_m.numel() // g_m.shape[1])
        g, x = g_m.to(dt), x_m.to(dt)
    else:
        g, x = dequantise(g_m, g_s), dequantise(x_m, x_s)
    gw = torch.ops.aten.convolution_backward(g, x, x.new_empty(w_shape), None, stride, padding,
                                             dilation, False, [0] * len(stride), groups,
                                             [False, True, False])[1]
    return _apply(gw, _exponent(g_s, x_s)) if on_mantissas else gw.float()


# -------------------------------------------------------------------------------- matmul
def matmul_forward(route, a_m, a_s, b_m, b_s):
    """``torch.matmul`` semantics (1-d promotion, broadcasting)."""
    mode = _mode(route, a_m, b_m)
    if mode in ("emulate", "fp32"):
        return torch.matmul(dequantise(a_m, a_s), dequantise(b_m, b_s))
    two_d = a_m.dim() == 2 and b_m.dim() == 2
    if two_d and mode in TRITON:
        return _triton().scaled_mm(a_m, a_s, b_m, b_s, exact=mode == "triton_exact")
    if two_d and mode == "int":
        return _scaled_int(a_m, b_m, _exponent(a_s, b_s))
    y = matmul_batched_int(route, a_m, a_s, b_m, b_s)
    if y is not None:
        return y
    dt = _float_dtype("float" if mode in TRITON else mode, a_m, b_m, a_m.shape[-1])
    return _apply(torch.matmul(a_m.to(dt), b_m.to(dt)), _exponent(a_s, b_s))


def matmul_batched_int(route, a_m, a_s, b_m, b_s) -> Tensor | None:
    """float32 ``torch.matmul(a, b)`` of int8/int16 mantissas with batch dimensions (broadcast
    as ``torch.matmul`` does), exact and scaled once, on the AMX GEMM (attention's ``Q K^T`` and
    ``P V``): one product at 8 bits, the four digit products fused in the tiles above; ``None``
    where it does not apply (other routes, 1-d operands, per-channel exponents,
    :func:`amx_gemm.applies`)."""
    if (a_m.dim() < 2 or b_m.dim() < 2 or max(a_m.dim(), b_m.dim()) < 3 or _mode(route, a_m, b_m) != "int"
            or a_s.numel() != 1 or b_s.numel() != 1 or not amx_gemm.available()):
        return None
    batch = torch.broadcast_shapes(a_m.shape[:-2], b_m.shape[:-2])
    digits = not a_m.dtype == b_m.dtype == torch.int8
    if not amx_gemm.worth(math.prod(batch), *a_m.shape[-2:], b_m.shape[-1], digits):  # before any broadcast copy
        return None
    a3 = a_m.expand(*batch, *a_m.shape[-2:]).reshape(-1, *a_m.shape[-2:])  # views for merged batch strides
    b3 = b_m.expand(*batch, *b_m.shape[-2:]).reshape(-1, *b_m.shape[-2:])
    e = _exponent(a_s, b_s)
    if not digits:
        y = amx_gemm.scaled_matmul(a3, b3, e)
    else:  # attention's 128 x 64 x 128 products: 1.2-1.6x FP32's time on the values, but exact
        y = amx_gemm.scaled_matmul_wide(a3.to(torch.int16), b3.to(torch.int16), e)
    return None if y is None else carry_absmax(y, y.view(*batch, a_m.shape[-2], b_m.shape[-1]))
