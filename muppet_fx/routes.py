"""Kernel routes: how a quantised product of mantissas ``(m_a, s_a) x (m_b, s_b)`` is computed.

- ``emulate``: dequantise both operands and run the FP32 op (the paper's set-up; FP32
  accumulation, exact while partial sums stay below 2**24).
- ``aten`` (CPU): exact integer products through ``torch._int_mm`` (see ``kernels/gemm_cpu``),
  scaled once by ``2**-(s_a + s_b)``. Products it has no integer kernel for (grouped or 1-d/3-d
  convolutions, batched matmuls) run on the mantissas as floats, in float32 where every partial
  sum is an integer below 2**24 and in float64 otherwise, so they are exact too.
- ``triton`` (CUDA): Triton INT8 kernels for up to 8 bits, FP16 kernels above (exact up to 12
  bits, as in the paper); ``exact=True`` keeps 9-16 bit products on integer kernels.

Every function returns float32 values ``(a @ b) * 2**-(s_a + s_b)`` (or the op's equivalent).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from muppet_fx.kernels import gemm_cpu
from muppet_fx.kernels.quantise import scale_pow2

__all__ = ["ROUTE_NAMES", "resolve_route", "linear_forward", "linear_grad_input",
           "linear_grad_weight", "conv_forward", "conv_grad_input", "conv_grad_weight",
           "matmul_forward", "dequantise"]

ROUTE_NAMES = ("emulate", "aten", "triton", "triton_exact")
TRITON = ("triton", "triton_exact")


def resolve_route(backend: str, device: torch.device, exact: bool = False) -> str:
    """``auto`` -> ``triton`` on CUDA, ``aten`` on CPU, ``emulate`` elsewhere; with ``exact``
    the Triton route keeps 9-16 bit products on integer kernels (``triton_exact``)."""
    route = backend if backend != "auto" else {"cuda": "triton", "cpu": "aten"}.get(device.type, "emulate")
    return "triton_exact" if exact and route == "triton" else route


def dequantise(m: Tensor, s: Tensor, axis: int | None = None) -> Tensor:
    return scale_pow2(m.float(), -s, axis)


def _qmax(m: Tensor) -> int:
    return {torch.int8: 127, torch.int16: 32767}.get(m.dtype, 2**23)


def _exponent(s_a: Tensor, s_b: Tensor):
    """``-(s_a + s_b)``: a Python int for per-tensor exponents on the CPU (reading it costs no
    device sync), else an int64 tensor."""
    if s_a.numel() == 1 and s_b.numel() == 1 and s_a.device.type == "cpu":
        return -(int(s_a) + int(s_b))
    return -(s_a.long() + s_b.long())


def _apply(acc: Tensor, e, bias: Tensor | None = None, axis: int | None = None) -> Tensor:
    """float32 ``acc * 2**e (+ bias)`` in one pass where ``2**e`` is a normal float32."""
    if isinstance(e, int) and -126 <= e <= 126:
        scale = math.ldexp(1.0, e)
        y = torch.mul(acc, scale) if bias is None else torch.add(bias.float(), acc, alpha=scale)
        return y if y.dtype == torch.float32 else y.float()
    acc = acc if acc.dtype in (torch.float32, torch.float64) else acc.float()
    y = scale_pow2(acc, torch.as_tensor(e, device=acc.device), axis).float()
    if bias is not None:
        y = y + bias.float().view([-1 if d == 1 else 1 for d in range(y.dim())])
    return y


def _exact_float(*ms: Tensor, k: int) -> torch.dtype:
    """float32 when every partial sum of a length-k product is an integer below 2**24."""
    bound = k
    for m in ms:
        bound *= _qmax(m)
    return torch.float32 if bound < 2**24 else torch.float64


# ------------------------------------------------------------------------------- linear
def _int_ok(*ms: Tensor) -> bool:
    return all(m.dtype in (torch.int8, torch.int16) for m in ms)


def _mm(a_m: Tensor, b_m: Tensor) -> Tensor:
    """Exact ``a_m @ b_m`` on the CPU: integer kernels up to 16 bits, float64 above."""
    if _int_ok(a_m, b_m):
        return gemm_cpu.int_matmul(a_m, b_m)
    return a_m.double() @ b_m.double()


def linear_forward(route, x_m, x_s, w_m, w_s, w_axis, bias):
    """``x @ w.T + bias`` for 2-d ``x_m [M, K]``, ``w_m [N, K]`` (per-tensor or per-row ``w_s``)."""
    if route == "emulate":
        return F.linear(dequantise(x_m, x_s), dequantise(w_m, w_s, w_axis), bias)
    if route in TRITON:
        from muppet_fx.kernels import gemm_triton

        return gemm_triton.scaled_mm(x_m, x_s, w_m.t(), w_s, bias, b_axis=w_axis,
                                     exact=route == "triton_exact")
    acc = _mm(x_m, w_m.t())
    if w_axis is None:
        return _apply(acc, _exponent(x_s, w_s), bias)
    return _apply(acc, -(x_s.long() + w_s.long()), bias, axis=1)


def linear_grad_input(route, g_m, g_s, w_m, w_s, w_axis):
    """``g @ w`` for ``g_m [M, N]``, ``w_m [N, K]``."""
    if w_axis is not None or route == "emulate":  # a per-row weight scale does not factor out
        return dequantise(g_m, g_s) @ dequantise(w_m, w_s, w_axis)
    if route == "aten":
        return _apply(_mm(g_m, w_m), _exponent(g_s, w_s))
    from muppet_fx.kernels import gemm_triton

    return gemm_triton.scaled_mm(g_m, g_s, w_m, w_s, exact=route == "triton_exact")


def linear_grad_weight(route, g_m, g_s, x_m, x_s):
    """``g.T @ x`` for ``g_m [M, N]``, ``x_m [M, K]``."""
    if route == "aten":
        return _apply(_mm(g_m.t(), x_m), _exponent(g_s, x_s))
    if route in TRITON:
        from muppet_fx.kernels import gemm_triton

        return gemm_triton.scaled_mm(g_m.t(), g_s, x_m, x_s, exact=route == "triton_exact")
    return dequantise(g_m, g_s).t() @ dequantise(x_m, x_s)


# --------------------------------------------------------------------------- convolution
def _int_conv_ok(route, x_m, groups, w_axis) -> bool:
    return route in ("aten", *TRITON) and x_m.dim() == 4 and groups == 1 and w_axis is None \
        and _int_ok(x_m)


def _int8_kernel(route):
    """The int8 GEMM under the integer convolutions: ``torch._int_mm`` (None) or Triton's."""
    if route not in TRITON:
        return None
    from muppet_fx.kernels import gemm_triton

    return gemm_triton.int_mm


def _bias4(bias, y):
    return bias.float().view(1, -1, *([1] * (y.dim() - 2)))


def conv_forward(route, x_m, x_s, w_m, w_s, w_axis, bias, stride, padding, dilation, groups):
    if route == "emulate":
        return torch.convolution(dequantise(x_m, x_s), dequantise(w_m, w_s, w_axis), bias,
                                 stride, padding, dilation, False, [0] * len(stride), groups)
    if _int_conv_ok(route, x_m, groups, w_axis):
        acc = gemm_cpu.conv_forward(x_m, w_m, stride, padding, dilation, mm=_int8_kernel(route))
        y = _apply(acc, _exponent(x_s, w_s))
        return y if bias is None else y.add_(_bias4(bias, y))
    dt = _exact_float(x_m, w_m, k=w_m[0].numel())  # exact on the mantissas as floats
    acc = torch.convolution(x_m.to(dt), w_m.to(dt), None, stride, padding, dilation, False,
                            [0] * len(stride), groups)
    if w_axis is None:
        y = _apply(acc, _exponent(x_s, w_s))
    else:
        y = _apply(acc, -(x_s.long() + w_s.long()), axis=1)
    return y if bias is None else y + _bias4(bias, y)


def conv_grad_input(route, g_m, g_s, w_m, w_s, w_axis, x_shape, stride, padding, dilation, groups):
    if _int_conv_ok(route, g_m, groups, w_axis):
        acc = gemm_cpu.conv_grad_input(g_m, w_m, x_shape, stride, padding, dilation, mm=_int8_kernel(route))
        return _apply(acc, _exponent(g_s, w_s))
    g, w = dequantise(g_m, g_s), dequantise(w_m, w_s, w_axis)
    if route != "emulate" and w_axis is None:
        dt = _exact_float(g_m, w_m, k=w_m.shape[0] * w_m[0, 0].numel())
        g, w = g_m.to(dt), w_m.to(dt)
    gx = torch.ops.aten.convolution_backward(g, g.new_empty(x_shape), w, None, stride, padding,
                                             dilation, False, [0] * len(stride), groups,
                                             [True, False, False])[0]
    return gx.float() if route == "emulate" or w_axis is not None else _apply(gx, _exponent(g_s, w_s))


def conv_grad_weight(route, g_m, g_s, x_m, x_s, w_shape, stride, padding, dilation, groups):
    if _int_conv_ok(route, x_m, groups, None):
        acc = gemm_cpu.conv_grad_weight(g_m, x_m, w_shape, stride, padding, dilation, mm=_int8_kernel(route))
        return _apply(acc, _exponent(g_s, x_s))
    g, x = dequantise(g_m, g_s), dequantise(x_m, x_s)
    if route != "emulate":
        dt = _exact_float(g_m, x_m, k=g_m.numel() // g_m.shape[1])
        g, x = g_m.to(dt), x_m.to(dt)
    gw = torch.ops.aten.convolution_backward(g, x, x.new_empty(w_shape), None, stride, padding,
                                             dilation, False, [0] * len(stride), groups,
                                             [False, True, False])[1]
    return gw.float() if route == "emulate" else _apply(gw, _exponent(g_s, x_s))


# -------------------------------------------------------------------------------- matmul
def matmul_forward(route, a_m, a_s, b_m, b_s):
    """``torch.matmul`` semantics (1-d promotion, broadcasting)."""
    if route == "emulate":
        return torch.matmul(dequantise(a_m, a_s), dequantise(b_m, b_s))
    if a_m.dim() == 2 and b_m.dim() == 2 and route == "aten":
        return _apply(_mm(a_m, b_m), _exponent(a_s, b_s))
    if a_m.dim() == 2 and b_m.dim() == 2 and route in TRITON:
        from muppet_fx.kernels import gemm_triton

        return gemm_triton.scaled_mm(a_m, a_s, b_m, b_s, exact=route == "triton_exact")
    dt = _exact_float(a_m, b_m, k=a_m.shape[-1])
    return _apply(torch.matmul(a_m.to(dt), b_m.to(dt)), _exponent(a_s, b_s))
