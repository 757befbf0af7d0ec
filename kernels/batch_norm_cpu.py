"""Training-mode batch norm straight from the input's mantissas (``batch_norm_cpu.c``).

Forward (:func:`batch_norm_forward`): exact integer channel sums, then ``y`` in one pass over
the one- or two-byte mantissas (ATen reads the float32 input three times).

Backward (:func:`batch_norm_backward`): the compact batch norm (``muppet_fx.compact``) keeps
its input for backward as ``b``-bit mantissas. Dequantising them and running ATen's backward
costs a float32 write and two float32 reads of the input; this kernel reads the one- or two-byte mantissas directly, in two passes
(channel sums, then the input gradient). On a 128x64x32x32 channels-last activation it took
3.7 ms against 8.6 ms for dequantisation plus ATen (2 threads). Sums run in float over short
runs and in double across them: against float64 their error is of the order of ATen's float32
reductions (on 128x16x32x32, bias gradient 7.4e-5 against ATen's 2.5e-4, weight gradient
7.9e-5 against 2.2e-5); the input gradient differs from ATen's in the last bits only.
"""
from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch

from .cbuild import bound_library
from .quantise_cpu import _ptr, remember_absmax

__all__ = ["batch_norm_backward", "batch_norm_forward", "channel_sums"]

_P = ctypes.c_void_p
_ARGS = [_P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, _P, _P, _P, _P, _P, _P, _P,
         ctypes.c_int]
_FN = {torch.int8: "bn_backward_i8", torch.int16: "bn_backward_i16"}
_FORWARD = {torch.int8: "bn_forward_i8", torch.int16: "bn_forward_i16"}
_D = ctypes.c_double
_I64 = ctypes.c_int64
_FORWARD_ARGS = [_P, _I64, _I64, _I64, _D, _P, _P, _D, _D, _P, _P, _P, _P, _P, _P, ctypes.c_int]
_SIGNATURES = {**{n: (ctypes.c_uint32, _ARGS) for n in _FN.values()},
               **{n: (ctypes.c_uint32, _FORWARD_ARGS) for n in _FORWARD.values()},
               **{f"{n}_channel_sums": (None, [_P, _I64, _I64, _I64, _P, ctypes.c_int]) for n in _FORWARD.values()}}


@functools.cache
def _library():
    return bound_library(Path(__file__).with_name("batch_norm_cpu.c"), _SIGNATURES)


# Contiguous inputs with short channel runs (``inner``, e.g. H*W = 64) stay with ATen: its
# backward was faster there (0.36 vs 0.45 ms on 128x64x8x8); at 1024 the kernel is 1.6x faster.
MIN_INNER = 256


def _geometry(m: torch.Tensor):
    """``(outer, C, inner)`` of the flat walk over ``m``, or ``None`` for other memory orders
    and for short channel runs (``MIN_INNER``)."""
    if m.dim() < 2:
        return None
    C = m.shape[1]
    if m.is_contiguous():
        inner = m[0, 0].numel()
        return (m.shape[0], C, inner) if inner == 1 or inner >= MIN_INNER else None
    if m.dim() >= 3 and m.movedim(1, -1).is_contiguous():  # channels-last, 1-d to 3-d maps
        return m.numel() // max(C, 1), C, 1
    return None


def channel_sums(m: torch.Tensor) -> torch.Tensor | None:
    """Exact int64 sums of int8/int16 mantissas over every dimension but 1 (a bias gradient's),
    from the forward's integer sums (int32 blocks, int64 across): 1-2 ms where torch's int64
    reduction of a 128x64x32x32 int16 map took 33 ms; ``None`` where the kernel does not apply
    (other layouts, short channel runs, no C compiler)."""
    lib = _library()
    geometry = _geometry(m) if m.numel() > 0 and m.device.type == "cpu" else None
    if lib is None or geometry is None or m.dtype not in _FORWARD:
        return None
    outer, C, inner = geometry
    sums = torch.empty(2 * C, dtype=torch.int64)
    getattr(lib, f"{_FORWARD[m.dtype]}_channel_sums")(m.data_ptr(), outer, C, inner, sums.data_ptr(),
                                                        torch.get_num_threads())
    return sums[:C]


def batch_norm_backward(grad: torch.Tensor, m: torch.Tensor, e: int, mean: torch.Tensor,
                        invstd: torch.Tensor, weight: torch.Tensor | None, need: tuple[bool, bool, bool],
                        relu_mask: torch.Tensor | None = None):
    """``native_batch_norm_backward`` (training mode) for the input ``x = m * 2**e``: returns
    ``(grad_input, grad_weight, grad_bias)``, each ``None`` where ``need`` says so, or ``None``
    altogether where the kernel does not apply (no C compiler, not on the CPU, float32 gradient
    and int8/int16 mantissas in one dense memory order, float32 statistics, ``e`` within
    float32's normal range). ``grad`` in another dense order than ``m`` is copied into ``m``'s.
    ``relu_mask``: the byte mask of a ReLU fused after the batch norm (:func:`batch_norm_forward`),
    laid out like ``m``; ``grad`` is then the ReLU output's gradient."""
    lib = _library()
    geometry = _geometry(m) if m.numel() > 0 else None
    if (lib is None or geometry is None or m.dtype not in _FN or grad.dtype != torch.float32
            or grad.device.type != "cpu" or m.device.type != "cpu" or grad.shape != m.shape
            or not -126 <= e <= 126
            or any(t is not None and (t.dtype != torch.float32 or not t.is_contiguous())
                   for t in (mean, invstd, weight))
            or relu_mask is not None and (relu_mask.dtype != torch.uint8 or relu_mask.stride() != m.stride())):
        return None
    if grad.stride() != m.stride():
        grad = torch.empty_like(m, dtype=torch.float32).copy_(grad)
    outer, C, inner = geometry
    gx = torch.empty_like(grad) if need[0] else None
    sum_g = torch.empty(C, dtype=torch.float64)
    sum_gxc = torch.empty(C, dtype=torch.float64)
    top = getattr(lib, _FN[m.dtype])(grad.data_ptr(), m.data_ptr(), outer, C, inner, math.ldexp(1.0, e),
                                     mean.data_ptr(), invstd.data_ptr(), _ptr(weight), _ptr(gx),
                                     sum_g.data_ptr(), sum_gxc.data_ptr(), _ptr(relu_mask), torch.get_num_threads())
    if gx is not None:
        remember_absmax(gx, top)  # the layer below quantises gx next
    gw = (sum_gxc * invstd).float() if need[1] else None
    gb = sum_g.float() if need[2] else None
    return gx, gw, gb


def _float32_cpu(*ts) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()) for t in ts)


def batch_norm_forward(m: torch.Tensor, e: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
                       eps: float, relu: bool = False):
    """``native_batch_norm`` (training mode) of ``x = m * 2**e``: returns ``(y, mean, invstd)``
    and updates the running statistics in place like ATen (unbiased variance), or ``None`` where
    the kernel does not apply (as :func:`batch_norm_backward`, and one value per channel).

    Two passes over the one- or two-byte mantissas instead of ATen's three over float32 values.
    The channel sums of ``m`` and ``m**2`` are exact integers, so the mean and the variance are
    the float64 roundings of their exact values (ATen's channels-last float32 accumulation was
    5.5e-5 off in ``invstd`` on 128x16x32x32, this 4.2e-8); ``y`` is ATen's ``x * alpha + beta``
    with those statistics. With ``relu``, a ReLU fused after it: returns ``(relu(y), mean, invstd,
    mask)`` with ``relu_cpu``'s byte mask ``relu(y) != 0``, in the same pass."""
    lib = _library()
    geometry = _geometry(m) if m.numel() > 0 else None
    if (lib is None or geometry is None or m.dtype not in _FORWARD or m.device.type != "cpu" or not -126 <= e <= 126
            or not _float32_cpu(weight, bias, running_mean, running_var)):
        return None
    outer, C, inner = geometry
    if outer * inner < 2:
        return None  # one value per channel: the stock module raises its own error
    y = torch.empty_like(m, dtype=torch.float32)
    mask = torch.empty_like(m, dtype=torch.uint8) if relu else None
    stats = torch.empty(2, C, dtype=torch.float32)
    top = getattr(lib, _FORWARD[m.dtype])(m.data_ptr(), outer, C, inner, math.ldexp(1.0, e), _ptr(weight),
                                          _ptr(bias), eps, momentum, _ptr(running_mean), _ptr(running_var),
                                          y.data_ptr(), _ptr(mask), stats[0].data_ptr(), stats[1].data_ptr(),
                                          torch.get_num_threads())
    remember_absmax(y, top)
    return (y, stats[0], stats[1]) + ((mask,) if relu else ())
